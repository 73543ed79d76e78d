"""``chronicle-agent status --watch``: a live view of a real daemon while it uploads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.helpers_daemon import start_daemon

MiB = 1 << 20


def status_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "status", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_live_view_follows_an_upload(tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(12 * MiB))  # 6 s at the cap: the view sees it run
    env = {"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(2 * MiB)}
    with start_daemon(env) as d:
        job = d.client().request("POST", "/v1/uploads",
                                 {"path": str(f), "asset_type": "checkpoint"})
        res = status_cli(d.env, "--watch", "--json", "--interval", "0.4", "--count", "5")
        assert res.returncode == 0, res.stderr
        frames = [json.loads(line) for line in res.stdout.splitlines()]
        assert len(frames) == 5
        assert all("queue" in fr and "transfer" in fr for fr in frames)
        seen = [j["bytes_done"] for fr in frames for j in fr["active_jobs"]
                if j["job_id"] == job["job_id"] and j["state"] == "running"]
        assert len(seen) >= 2 and seen[-1] > seen[0] > 0, frames  # it moved, live
        # the human view: frames one after another when not on a terminal
        res = status_cli(d.env, "--watch", "--interval", "0.1", "--count", "2")
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("queue:") == 2 and res.stdout.count("-- ") == 2, res.stdout
        assert job["job_id"] in res.stdout or "no running or queued jobs" in res.stdout
        d.client().wait_job(job["job_id"], 60)
    # the daemon is gone: the view says so (and ends with the unreachable exit code)
    res = status_cli(d.env, "--watch", "--interval", "0.1", "--count", "2")
    assert res.returncode == 3 and res.stdout.count("daemon unreachable") == 2, res.stdout
    res = status_cli(d.env, "--watch", "--interval", "0")
    assert res.returncode == 2 and "--interval" in res.stderr
