"""What a user sees (issue 11): usage errors that name what is valid, doctor on the daemon
the environment names, a run that has ended, and the README's ``Run`` snippet as written."""

from __future__ import annotations

import pytest

from agent.errors import ApiError
from agent.queue.store import JobState
from tests.helpers_daemon import DaemonProc

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
