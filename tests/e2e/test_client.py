"""The socket client and ``Run``: import cost, error mapping, and what goes on the wire."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.client import SocketClient, default_socket_path
from agent.errors import ApiError, DaemonUnreachable, JobFailed, UsageError
from agent.run import JobHandle, PresignedUpload, Run
from tests.support.helpers_daemon import REPO_ROOT, FakeDaemon, Request, clean_env

HEAVY = ("aiohttp", "pydantic", "pydantic_settings", "anyio", "asyncio", "watchfiles", "sqlite3")


def _job(state: str = "queued", **extra: Any) -> dict[str, Any]:
    job = {
        "job_id": "j1", "kind": "upload", "state": state, "asset_id": None, "run_id": None,
        "bytes_total": 0, "bytes_done": 0, "attempts": 0, "error": None,
    }
    job.update(extra)
    return job


@pytest.fixture
def fake() -> Any:
    with FakeDaemon() as f:
        yield f


@pytest.fixture
def short_tmp() -> Any:
    d = Path(tempfile.mkdtemp(prefix="ca-", dir="/tmp"))
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() else p.rmdir()
    d.rmdir()


# ---- import lightness ---------------------------------------------------------------------


def test_import_agent_and_run_is_light() -> None:
    code = (
        "import sys\n"
        "import agent\n"
        "from agent import Run, JobHandle, DaemonUnreachable, ApiError, JobFailed\n"
        f"heavy = {HEAVY!r}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), cwd=REPO_ROOT,
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "", f"importing agent.Run pulled in: {out.stdout}"


@pytest.mark.parametrize("imports, heavy", [
    ("import agent.transfer.direct, agent.transfer.primitives, agent.chronicle.sync",
     ("aiohttp", "anyio", "asyncio", "watchfiles", "sqlite3", "botocore", "pydantic_settings")),
    # Chronicle() reads the settings: pydantic-settings (which imports asyncio) comes along
    ("from agent import Chronicle",
     ("aiohttp", "anyio", "watchfiles", "sqlite3", "botocore")),
])
def test_the_in_process_paths_import_nothing_heavy(imports: str, heavy: tuple[str, ...]
                                                   ) -> None:
    """``Chronicle()`` and its download with no daemon (agent.transfer.direct, and the
    transfer primitives it shares with the daemon) need no event-loop library, HTTP stack
    or database."""
    code = (f"import sys\n{imports}\nheavy = {heavy!r}\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n")
    out = subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), cwd=REPO_ROOT,
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "", f"{imports} pulled in: {out.stdout}"


def test_lazy_exports() -> None:
    import agent

    assert agent.Run is Run
    assert agent.DaemonUnreachable is DaemonUnreachable
    assert isinstance(agent.__version__, str) and agent.__version__
    with pytest.raises(AttributeError):
        agent.NoSuchThing  # noqa: B018


# ---- socket resolution and unreachable daemons --------------------------------------------


def test_default_socket_path_env_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHRONICLE_AGENT_SOCKET", "/tmp/x/agent.sock")
    assert default_socket_path() == Path("/tmp/x/agent.sock")
    monkeypatch.delenv("CHRONICLE_AGENT_SOCKET")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[agent]\nsocket_path = "/tmp/from-toml.sock"\n')
    monkeypatch.setenv("CHRONICLE_AGENT_CONFIG", str(cfg))
    monkeypatch.delenv("CHRONICLE_AGENT_AGENT__SOCKET_PATH", raising=False)
    assert default_socket_path() == Path("/tmp/from-toml.sock")
    monkeypatch.setenv("CHRONICLE_AGENT_AGENT__SOCKET_PATH", "/tmp/from-env.sock")
    assert default_socket_path() == Path("/tmp/from-env.sock")


def test_default_socket_path_agrees_with_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from agent.config import load_settings

    for key in list(os.environ):
        if key.startswith("CHRONICLE_AGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "rt"))
    assert default_socket_path() == load_settings().socket_path()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[agent]\nsocket_path = "/tmp/cfg.sock"\n')
    monkeypatch.setenv("CHRONICLE_AGENT_CONFIG", str(cfg))
    assert default_socket_path() == load_settings().socket_path() == Path("/tmp/cfg.sock")


def test_missing_socket_is_daemon_unreachable(short_tmp: Path) -> None:
    path = short_tmp / "none.sock"
    with pytest.raises(DaemonUnreachable) as ei:
        SocketClient(path).health()
    msg = str(ei.value)
    assert str(path) in msg
    assert "chronicle-agent daemon" in msg and "CHRONICLE_AGENT_SOCKET" in msg


def test_refused_socket_is_daemon_unreachable(short_tmp: Path) -> None:
    path = short_tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, never listening: what a crashed daemon leaves behind
    try:
        with pytest.raises(DaemonUnreachable) as ei:
            SocketClient(path).health()
        assert str(path) in str(ei.value) and "chronicle-agent daemon" in str(ei.value)
    finally:
        s.close()


def test_run_without_daemon_says_what_to_do(short_tmp: Path) -> None:
    with pytest.raises(DaemonUnreachable, match="chronicle-agent daemon"):
        Run("run_x", socket_path=short_tmp / "none.sock")


# ---- mapping answers ----------------------------------------------------------------------


def test_ok_json_roundtrip(fake: FakeDaemon) -> None:
    fake.routes[("POST", "/echo")] = lambda r: (200, {"got": r.body})
    assert fake.client().request("POST", "/echo", {"a": [1, "é"]}) == {"got": {"a": [1, "é"]}}


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (404, {"error": {"code": "not_found", "message": "no job j9"}}, "not_found", "no job j9"),
        (400, {"error": {"code": "invalid_request", "message": "bad"}}, "invalid_request", "bad"),
        (403, {"error": {"code": "forbidden", "message": "outside roots"}}, "forbidden",
         "outside roots"),
        (500, b"<html>oops</html>", "http_500", "HTTP 500"),
        (503, {"detail": "no error key"}, "http_503", "HTTP 503"),
    ],
)
def test_api_error_mapping(
    fake: FakeDaemon, status: int, body: Any, code: str, message: str
) -> None:
    fake.routes[("GET", "/v1/jobs/j9")] = (status, body)
    with pytest.raises(ApiError) as ei:
        fake.client().get_job("j9")
    assert ei.value.status == status
    assert ei.value.code == code
    assert message in ei.value.message


def test_unserializable_body_is_usage_error(fake: FakeDaemon) -> None:
    with pytest.raises(UsageError, match="not JSON"):
        fake.client().request("POST", "/echo", {"content": {1, 2}})
    assert fake.requests == []


def test_the_guides_ellipsis_placeholder_is_sent_as_a_string(fake: FakeDaemon) -> None:
    """The assets guide's sample writes ``"key_findings": [...]``; it runs as written."""
    fake.routes[("POST", "/echo")] = (200, {})
    fake.client().request("POST", "/echo", {"content": {"key_findings": [...]}})
    assert fake.requests[-1].body == {"content": {"key_findings": ["..."]}}


def test_non_json_success_is_api_error(fake: FakeDaemon) -> None:
    fake.routes[("GET", "/v1/health")] = (200, b"not json")
    with pytest.raises(ApiError, match="non-JSON"):
        fake.client().health()


def test_hang_up_is_daemon_unreachable(fake: FakeDaemon) -> None:
    fake.routes[("GET", "/v1/health")] = (0, None)
    with pytest.raises(DaemonUnreachable, match="broke"):
        fake.client().health()


def test_slow_answer_is_daemon_unreachable(fake: FakeDaemon) -> None:
    def slow(r: Request) -> tuple[int, Any]:
        time.sleep(1.0)
        return 200, {}

    fake.routes[("GET", "/v1/health")] = slow
    with pytest.raises(DaemonUnreachable, match="did not answer"):
        fake.client(timeout_s=0.2).health()


def test_list_jobs_query_and_ids_are_quoted(fake: FakeDaemon) -> None:
    fake.routes[("GET", "/v1/jobs")] = (200, {"jobs": [_job()]})
    assert fake.client().list_jobs(run_id="run 1", state="failed") == [_job()]
    assert fake.requests[-1].query == {"run_id": "run 1", "state": "failed"}
    fake.client().list_jobs()
    assert fake.requests[-1].query == {}
    with pytest.raises(ApiError):
        fake.client().get_job("a/b")
    assert fake.requests[-1].path == "/v1/jobs/a%2Fb"


def test_wait_job_loops_until_terminal(fake: FakeDaemon) -> None:
    states = iter(["running", "running", "done"])
    fake.routes[("GET", "/v1/jobs/j1/wait")] = lambda r: (200, _job(next(states)))
    assert fake.client().wait_job("j1")["state"] == "done"
    waits = [r for r in fake.requests if r.path.endswith("/wait")]
    assert len(waits) == 3
    assert all(0 < float(r.query["timeout_s"]) <= 30 for r in waits)


def test_wait_job_timeout(fake: FakeDaemon) -> None:
    def running(r: Request) -> tuple[int, Any]:
        time.sleep(min(float(r.query["timeout_s"]), 0.1))
        return 200, _job("running")

    fake.routes[("GET", "/v1/jobs/j1/wait")] = running
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="still running"):
        fake.client().wait_job("j1", timeout_s=0.3)
    assert time.monotonic() - t0 < 3


def test_wait_job_rides_out_a_short_outage(short_tmp: Path) -> None:
    """The daemon restarting while a caller waits: the wait carries on."""
    path = short_tmp / "later.sock"
    result: dict[str, Any] = {}

    def waiter() -> None:
        try:
            result["job"] = SocketClient(path).wait_job("j1", unreachable_grace_s=10)
        except Exception as e:  # pragma: no cover - reported below
            result["error"] = e

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.8)
    fake = FakeDaemon({("GET", "/v1/jobs/j1/wait"): (200, _job("done"))})
    try:
        os.rename(fake.socket_path, path)
        t.join(10)
    finally:
        fake.close()
    assert result.get("job", {}).get("state") == "done", result


def test_wait_job_gives_up_after_grace(short_tmp: Path) -> None:
    with pytest.raises(DaemonUnreachable):
        SocketClient(short_tmp / "none.sock").wait_job("j1", unreachable_grace_s=0)


# ---- Run and JobHandle on the wire ---------------------------------------------------------


@pytest.fixture
def run_fake(fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    monkeypatch.delenv("METHODIC_RUN_ID", raising=False)
    counter = iter(range(1, 1000))

    def new_job(kind: str) -> Any:
        return lambda r: (202, _job(kind=kind, job_id=f"j{next(counter)}", run_id=(r.body or {})
                                    .get("run_id")))

    fake.routes.update({
        ("POST", "/v1/runs"): lambda r: (201, {"run_id": r.body["run_id"], "lease_s": 60}),
        ("POST", "/v1/assets/inline"): new_job("inline"),
        ("POST", "/v1/uploads"): new_job("upload"),
        ("POST", "/v1/assets/presigned"): (201, {
            "asset_id": "asset_1",
            "upload_urls": {"model.safetensors": "http://s/u1", "metadata.json": "http://s/u2"},
            "multipart": {"model.safetensors": {"part_size_bytes": 5}},
            "expires_at": "2030-01-01T00:00:00Z",
        }),
        ("POST", "/v1/assets/asset_1/components"): new_job("component"),
        ("POST", "/v1/assets/-/components"): new_job("component"),
        ("POST", "/v1/assets/asset_1/finalize"): new_job("finalize"),
    })
    for rid in ("run_a", "run_env"):
        fake.routes[("POST", f"/v1/runs/{rid}/finish")] = lambda r: (200, {"status": r.body})
        fake.routes[("POST", f"/v1/runs/{rid}/heartbeat")] = (200, {})
    return fake


def test_run_registers_with_pid(run_fake: FakeDaemon) -> None:
    run = Run("run_a", socket_path=run_fake.socket_path, heartbeat_interval_s=None)
    assert run.run_id == "run_a"
    assert run_fake.requests[0].path == "/v1/runs"
    assert run_fake.requests[0].body == {"run_id": "run_a", "pid": os.getpid()}


def test_run_id_from_env_or_generated(
    run_fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METHODIC_RUN_ID", "run_env")
    assert Run(socket_path=run_fake.socket_path, heartbeat_interval_s=None).run_id == "run_env"
    monkeypatch.delenv("METHODIC_RUN_ID")
    run = Run(socket_path=run_fake.socket_path, heartbeat_interval_s=None)
    assert run.run_id.startswith("run_") and len(run.run_id) > 8
    assert "METHODIC_RUN_ID" not in os.environ
    assert run_fake.requests[-1].body["run_id"] == run.run_id


def test_run_register_false_sends_nothing(run_fake: FakeDaemon) -> None:
    Run("run_a", socket_path=run_fake.socket_path, register=False)
    assert run_fake.requests == []


def test_guide_samples_on_the_wire(run_fake: FakeDaemon, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.safetensors", "metadata.json"):
        (out / name).write_bytes(b"x" * 10)
    run = Run("run_a", socket_path=run_fake.socket_path, heartbeat_interval_s=None)

    h = run.upload_asset(
        asset_type="takeaways_report",
        content={"summary": "Loss converged at step 12000", "key_findings": []},
    )
    assert isinstance(h, JobHandle) and h.job_id == "j1"
    assert run_fake.requests[-1].body == {
        "asset_type": "takeaways_report",
        "content": {"summary": "Loss converged at step 12000", "key_findings": []},
        "run_id": "run_a",
    }
    run.upload_asset("notes", "# hi", content_type="text/markdown", visibility="team")
    assert run_fake.requests[-1].body["content_type"] == "text/markdown"
    assert run_fake.requests[-1].body["visibility"] == "team"

    upload_info = run.create_asset_presigned(
        asset_type="checkpoint", components=["model.safetensors", "metadata.json"]
    )
    assert isinstance(upload_info, PresignedUpload)
    assert upload_info.asset_id == "asset_1"
    assert upload_info.expires_at == "2030-01-01T00:00:00Z"
    assert upload_info.multipart == {"model.safetensors": {"part_size_bytes": 5}}
    assert run_fake.requests[-1].body == {
        "asset_type": "checkpoint",
        "components": ["model.safetensors", "metadata.json"],
        "run_id": "run_a",
    }
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for filename, url in upload_info.upload_urls.items():
            run.upload_component(url, local_path=Path(f"./out/{filename}"),
                                 content_type="application/octet-stream")
            req = run_fake.requests[-1]
            assert req.path == "/v1/assets/asset_1/components"
            assert req.body == {"url": url, "path": str(out / filename),
                                "content_type": "application/octet-stream"}
    finally:
        os.chdir(cwd)
    run.upload_component("http://other/url", local_path=out / "metadata.json")
    assert run_fake.requests[-1].path == "/v1/assets/-/components"
    run.upload_component(name="metadata.json", local_path=out / "metadata.json")
    assert run_fake.requests[-1].path == "/v1/assets/asset_1/components"
    assert run_fake.requests[-1].body == {
        "name": "metadata.json", "path": str(out / "metadata.json")
    }

    fin = run.finalize_asset(upload_info.asset_id)
    assert run_fake.requests[-1].path == "/v1/assets/asset_1/finalize"
    assert fin.last["kind"] == "finalize"

    d = run.upload_directory_async(out, visibility="private")
    assert run_fake.requests[-1].path == "/v1/uploads"
    assert run_fake.requests[-1].body == {
        "path": str(out), "asset_type": "checkpoint", "run_id": "run_a", "visibility": "private",
    }
    assert d.last["kind"] == "upload"


def test_run_usage_errors(run_fake: FakeDaemon, tmp_path: Path) -> None:
    run = Run("run_a", socket_path=run_fake.socket_path, heartbeat_interval_s=None)
    n = len(run_fake.requests)
    with pytest.raises(UsageError, match="no such file"):
        run.upload_directory_async(tmp_path / "missing")
    with pytest.raises(UsageError, match="no such file"):
        run.upload_component("http://s/u1", local_path=tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="url"):
        run.upload_component(local_path=tmp_path / "f")
    with pytest.raises(UsageError, match="asset_id"):
        run.upload_component(name="unknown", local_path=tmp_path / "f")
    assert len(run_fake.requests) == n  # nothing reached the daemon


def test_context_manager_finishes(run_fake: FakeDaemon) -> None:
    with Run("run_a", socket_path=run_fake.socket_path, heartbeat_interval_s=None):
        pass
    assert run_fake.requests[-1].path == "/v1/runs/run_a/finish"
    assert run_fake.requests[-1].body == {"status": "finished"}
    with pytest.raises(ZeroDivisionError):
        with Run("run_a", socket_path=run_fake.socket_path, heartbeat_interval_s=None):
            1 / 0  # noqa: B018
    assert run_fake.requests[-1].body == {"status": "failed"}


def test_heartbeat_thread(run_fake: FakeDaemon) -> None:
    run = Run("run_a", socket_path=run_fake.socket_path, heartbeat_interval_s=0.05)
    deadline = time.monotonic() + 5
    while not any(r.path.endswith("/heartbeat") for r in run_fake.requests):
        assert time.monotonic() < deadline, "no heartbeat sent"
        time.sleep(0.02)
    run.finish()
    assert run._heartbeat_thread is not None
    run._heartbeat_thread.join(2)
    assert not run._heartbeat_thread.is_alive()


def test_job_handle(fake: FakeDaemon) -> None:
    client = fake.client()
    fake.routes[("GET", "/v1/jobs/j1")] = (200, _job("running", asset_id="asset_9"))
    fake.routes[("POST", "/v1/jobs/j1/cancel")] = (200, _job("cancelled"))
    h = JobHandle(client, _job())
    assert h.asset_id == "asset_9"  # unknown locally: asks the daemon
    assert h.state == "running"
    assert h.job()["asset_id"] == "asset_9"
    fake.routes[("GET", "/v1/jobs/j1/wait")] = (200, _job("done", asset_id="asset_9"))
    assert h.wait()["state"] == "done"
    fake.routes[("GET", "/v1/jobs/j1/wait")] = (
        200, _job("failed", error={"code": "storage_refused", "message": "403"})
    )
    with pytest.raises(JobFailed) as ei:
        h.wait()
    assert ei.value.code == "storage_refused" and "failed" in str(ei.value)
    assert h.wait(raise_on_failure=False)["state"] == "failed"
    assert h.cancel()["state"] == "cancelled"
