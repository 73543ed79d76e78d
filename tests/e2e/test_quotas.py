"""Per-uid quotas and the retention of finished jobs through a running daemon: past
queue.quota_jobs (or queue.quota_payload_bytes) the socket API answers 429 quota_exceeded
naming the limit, the uid's usage and the setting; the CLI prints it in one line and exits
1; finished jobs go after queue.finished_retention_s."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.errors import ApiError
from tests.support.helpers_daemon import start_daemon


def test_past_the_job_quota_the_socket_api_answers_429(tmp_path: Path) -> None:
    f = tmp_path / "slow.bin"
    f.write_bytes(os.urandom(1_000_000))
    env = {"CHRONICLE_AGENT_QUEUE__QUOTA_JOBS": "2",
           "CHRONICLE_AGENT_QUEUE__QUOTA_PAYLOAD_BYTES": "300000",
           "CHRONICLE_AGENT_QUEUE__QUOTA_EXEMPT_ROOT": "false",  # the tests run as root
           "CHRONICLE_AGENT_AGENT__WORKERS": "1",
           "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": "20000"}  # ~50 s each
    with start_daemon(env) as d:
        c = d.client()
        body = {"path": str(f), "asset_type": "checkpoint"}
        jobs = [c.request("POST", "/v1/uploads", body) for _ in range(2)]
        with pytest.raises(ApiError) as e:
            c.request("POST", "/v1/uploads", body)
        assert e.value.status == 429 and e.value.code == "quota_exceeded", e.value
        msg = e.value.message
        assert f"uid {os.getuid()} has 2 queued or running jobs" in msg, msg
        assert "queue.quota_jobs = 2" in msg, msg
        res = d.run_cli("upload", str(f), "--type", "checkpoint")
        assert res.returncode == 1, res.stderr
        assert "quota_exceeded" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        c.request("POST", f"/v1/jobs/{jobs[1]['job_id']}/cancel")  # a slot frees up
        big = {"asset_type": "metrics", "content": "x" * 400_000}
        with pytest.raises(ApiError) as e:
            c.request("POST", "/v1/assets/inline", big)
        assert e.value.status == 429 and "queue.quota_payload_bytes = 300000" in \
            e.value.message, e.value
        third = c.request("POST", "/v1/uploads", body)  # within both quotas again
        with pytest.raises(ApiError) as e:  # a retried job would be live again: refused
            c.request("POST", f"/v1/jobs/{jobs[1]['job_id']}/retry")
        assert e.value.status == 429 and e.value.code == "quota_exceeded", e.value
        c.request("POST", f"/v1/jobs/{third['job_id']}/cancel")
        c.request("POST", f"/v1/jobs/{jobs[1]['job_id']}/retry")  # room for it now
        for j in c.list_jobs():
            if j["state"] in ("queued", "running"):
                c.request("POST", f"/v1/jobs/{j['job_id']}/cancel")


def test_root_is_exempt_by_default(tmp_path: Path) -> None:
    f = tmp_path / "small.bin"
    f.write_bytes(b"x" * 1000)
    with start_daemon({"CHRONICLE_AGENT_QUEUE__QUOTA_JOBS": "1"}) as d:
        c = d.client()
        jobs = [c.request("POST", "/v1/uploads", {"path": str(f), "asset_type": "t"})
                for _ in range(3)]
        for j in jobs:
            assert c.wait_job(j["job_id"], 60)["state"] == "done"


def test_the_daemons_minute_loop_prunes_finished_jobs(tmp_path: Path) -> None:
    """The loop runs once at start, then every minute: a restart shows it without waiting."""
    f = tmp_path / "small.bin"
    f.write_bytes(b"x" * 1000)
    with start_daemon({"CHRONICLE_AGENT_QUEUE__FINISHED_RETENTION_S": "1"}) as d:
        c = d.client()
        job = c.request("POST", "/v1/uploads", {"path": str(f), "asset_type": "t"})
        inline = c.request("POST", "/v1/assets/inline", {"asset_type": "m", "content": "c"})
        for j in (job, inline):
            assert c.wait_job(j["job_id"], 60)["state"] == "done"
        assert len(c.list_jobs()) == 2
        time.sleep(1.5)
        d.restart()
        assert d.client().list_jobs() == [], d.log_tail()
        assert "pruned 2 job(s) finished over 1 s ago" in d.log_text()
