"""What a user sees: usage errors that name what is valid, doctor on the daemon
the environment names, a run that has ended, and the README's ``Run`` snippet as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent import Run
from agent.errors import ApiError, RunEnded
from agent.queue.store import JobState
from tests.support.helpers_daemon import REPO_ROOT, DaemonProc, clean_env

STATES = [s.value for s in JobState]


def test_jobs_state_must_be_a_job_state(daemon: DaemonProc) -> None:
    res = daemon.run_cli("jobs", "--state", "bogus")
    assert res.returncode == 2, res
    assert res.stderr.startswith("usage: chronicle-agent jobs"), res.stderr
    assert "error: argument --state: 'bogus' is not a job state" in res.stderr
    assert "Traceback" not in res.stderr
    for state in STATES:
        assert state in res.stderr.split("choose from", 1)[1]
    assert "lost" in STATES
    for state in ("lost", "queued"):  # every real state is asked of the daemon
        ok = daemon.run_cli("jobs", "--state", state, "--json")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip().startswith('{\n  "jobs": [')


def test_socket_api_refuses_an_unknown_state(daemon: DaemonProc) -> None:
    with pytest.raises(ApiError) as e:
        daemon.client().request("GET", "/v1/jobs?state=bogus")
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert e.value.message.startswith("state: 'bogus' is not a job state (choose from queued,")
    assert all(s in e.value.message for s in STATES)
    assert daemon.client().list_jobs(state="lost") == []


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_doctor_checks_the_daemon_the_environment_names(daemon: DaemonProc,
                                                        tmp_path: Path) -> None:
    """The configuration names another socket and state dir (no daemon there); the daemon
    on the non-default socket that CHRONICLE_AGENT_SOCKET names is the one checked."""
    config = tmp_path / "config.toml"
    configured_sock = daemon.root / "configured.sock"  # short: AF_UNIX paths are
    config.write_text(
        f'[agent]\nsocket_path = "{configured_sock}"\nstate_dir = "{tmp_path / "state"}"\n')
    env = clean_env()
    env["CHRONICLE_AGENT_CONFIG"] = str(config)
    assert daemon.socket_path != configured_sock

    alone = _cli(env, "doctor", "--json")  # the configured socket: nobody there
    assert alone.returncode == 1
    checks = {c["name"]: c for c in json.loads(alone.stdout)["checks"]}
    assert checks["socket"]["status"] == "FAIL"
    assert str(configured_sock) in checks["socket"]["detail"]

    env["CHRONICLE_AGENT_SOCKET"] = str(daemon.socket_path)
    res = _cli(env, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert res.returncode == 0, res.stdout + res.stderr
    assert checks["socket"]["detail"] == (
        f"daemon 0.1.0 answers on {daemon.socket_path} (named by CHRONICLE_AGENT_SOCKET)")
    # its queue, its disk and its embedded Chronicle, not the configured state dir's
    assert checks["queue"]["status"] == "ok" and checks["queue"]["path"] == str(
        daemon.state_dir / "queue.db")
    assert str(daemon.state_dir) in checks["disk"]["detail"]
    health = daemon.client().health()
    assert checks["chronicle"]["status"] == "ok"
    assert checks["chronicle"]["detail"].startswith(f"{health['chronicle_url']} answers")
    assert not (tmp_path / "state").exists()


def _wait_ended(daemon: DaemonProc, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        run = daemon.client().request("GET", f"/v1/runs/{run_id}")
        if run["state"] != "running" or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def test_a_run_that_has_ended_is_refused_at_once(daemon_env: DaemonProc,
                                                 tmp_path: Path) -> None:
    with Run("run_done") as run:
        assert run.info["state"] == "running"
    with pytest.raises(RunEnded) as e:
        Run("run_done")
    assert (e.value.status, e.value.code) == (409, "run_ended")
    assert e.value.message.startswith("run run_done has already ended (finished")
    with pytest.raises(RunEnded):  # the socket API itself
        daemon_env.client().request("POST", "/v1/runs", {"run_id": "run_done"})
    # read-only use of an ended run still works, and nothing was queued for it
    assert Run("run_done", register=False).jobs() == []

    # a run whose process died without finishing: crashed
    script = "from agent import Run\nRun('run_crashed', heartbeat_interval_s=None)\n"
    subprocess.run([sys.executable, "-c", script], env=daemon_env.env, check=True, timeout=60)
    assert _wait_ended(daemon_env, "run_crashed")["state"] != "running"
    with pytest.raises(RunEnded, match=r"^run run_crashed has already ended \(crashed\)"):
        Run("run_crashed")

    # exec: a usage error before the command starts
    mark = tmp_path / "started"
    res = daemon_env.run_cli("exec", "--run", "run_done", "--", "touch", str(mark))
    assert res.returncode == 2, res
    assert res.stderr.startswith("chronicle-agent: error: run run_done has already ended "
                                 "(finished"), res.stderr
    assert "the command was not started" in res.stderr and not mark.exists()
    env = {**daemon_env.env, "METHODIC_RUN_ID": "run_crashed"}  # inherited, the same
    res = subprocess.run([sys.executable, "-m", "agent", "exec", "--", "touch", str(mark)],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and "run run_crashed has already ended" in res.stderr
    assert not mark.exists()
    # a new id still runs the command
    ok = daemon_env.run_cli("exec", "--run", "run_new", "--", "touch", str(mark))
    assert ok.returncode == 0, ok.stderr
    assert mark.exists()


def readme_python_snippet() -> str:
    """The README's ``from agent import Run`` block, as written."""
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if "from agent import Run" in b]
    assert len(found) == 1, f"one Run snippet in README.md, found {len(found)}"
    return found[0]


def test_the_readme_run_snippet_works_as_written(daemon: DaemonProc, tmp_path: Path) -> None:
    """On a fresh machine: a new directory, nothing made beforehand, a real daemon."""
    snippet = readme_python_snippet()
    res = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=daemon.env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    client = daemon.client()
    jobs = client.list_jobs(run_id="run_42")
    assert sorted(j["kind"] for j in jobs) == ["inline", "upload"]
    finals = [client.wait_job(j["job_id"], timeout_s=120) for j in jobs]
    assert [j["state"] for j in finals] == ["done", "done"], finals
    assert _wait_ended(daemon, "run_42")["status"] == "finished"
    # as the README says: the same id again is refused, at once
    again = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=daemon.env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 1
    assert "agent.errors.RunEnded: run run_42 has already ended (finished" in again.stderr
