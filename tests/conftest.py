"""Shared pytest fixtures; each owner keeps to its own marked block."""

from __future__ import annotations

# --- daemon fixtures ---
# (owned by the CLI/client part: tests/helpers_daemon.py starts a real daemon process)
import os as _daemon_os  # noqa: E402
from collections.abc import Iterator as _DaemonIterator  # noqa: E402

import pytest as _daemon_pytest  # noqa: E402

from tests.helpers_daemon import DaemonProc, start_daemon  # noqa: E402


@_daemon_pytest.fixture
def daemon() -> _DaemonIterator[DaemonProc]:
    """A real ``chronicle-agent daemon`` in a short temp dir; stopped and removed after."""
    with start_daemon() as d:
        yield d


@_daemon_pytest.fixture
def daemon_env(daemon: DaemonProc, monkeypatch: _daemon_pytest.MonkeyPatch) -> DaemonProc:
    """``daemon``, with this process's environment pointed at it (for in-process ``cli()``
    and ``Run()``)."""
    for key in list(_daemon_os.environ):
        if key.startswith(("CHRONICLE_AGENT_", "METHODIC_RUN_ID")):
            monkeypatch.delenv(key)
    for key in ("CHRONICLE_AGENT_SOCKET", "CHRONICLE_AGENT_AGENT__STATE_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, daemon.env[key])
    return daemon
# --- end daemon fixtures ---
