"""Download progress: ``chronicle-agent download`` draws bytes, rate and
ETA on a terminal (a real pseudo-terminal) and prints only its result otherwise;
``status --watch`` shows a running download beside uploads."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.test_download import upload
from tests.support.helpers_e2e import MiB, assert_same_tree, proxied_daemon, write_random

SLOW = {"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(4 * MiB),
        "CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES": "0"}


def _on_a_terminal(cmd: list[str], env: dict[str, str], timeout_s: float = 60) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal: (exit code, what it drew)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower, close_fds=True)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(10), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


def test_download_draws_progress_on_a_terminal_and_not_in_a_pipe(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "model.bin", 12 * MiB)
    with proxied_daemon(SLOW) as (daemon, _):
        aid = upload(daemon, src)
        code, drawn = _on_a_terminal(
            [sys.executable, "-m", "agent", "download", aid, str(tmp_path / "dest")],
            daemon.env)
        assert code == 0, drawn
        assert_same_tree(src, tmp_path / "dest")
        frames = [f for f in re.split(r"[\r\n]", drawn) if "%" in f]
        assert len(frames) >= 2, drawn  # redrawn while it ran
        running = [f for f in frames if "running" in f]
        assert any(re.search(r"\d+(\.\d+)? [KMG]?i?B/s", f) and "ETA" in f
                   for f in running), frames
        assert "100%" in frames[-1]

        piped = daemon.run_cli("download", aid, str(tmp_path / "b"))
        assert piped.returncode == 0, piped.stderr
        assert "%" not in piped.stderr and "ETA" not in piped.stderr, piped.stderr


def test_status_watch_shows_a_running_download(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "model.bin", 16 * MiB)
    with proxied_daemon(SLOW) as (daemon, _):
        aid = upload(daemon, src)
        job = daemon.client().request("POST", "/v1/downloads",
                                      {"asset_id": aid, "dest": str(tmp_path / "dest")})
        watch = daemon.run_cli("status", "--watch", "--json", "--count", "3",
                               "--interval", "0.5")
        assert watch.returncode == 0, watch.stderr
        frames = [json.loads(line) for line in watch.stdout.splitlines()]
        seen = [j for f in frames for j in f["active_jobs"] if j["job_id"] == job["job_id"]]
        assert seen and all(j["kind"] == "download" for j in seen), frames
        assert seen[-1]["bytes_total"] == 16 * MiB
        assert any(0 < j["bytes_done"] < 16 * MiB for j in seen), seen
        final = daemon.client().wait_job(job["job_id"], 90)
        assert final["state"] == "done", final
