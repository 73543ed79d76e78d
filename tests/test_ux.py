"""What a user sees (issue 11): usage errors that name what is valid, doctor on the daemon
the environment names, a run that has ended, and the README's ``Run`` snippet as written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ApiError
from agent.queue.store import JobState
from tests.helpers_daemon import DaemonProc, clean_env

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
