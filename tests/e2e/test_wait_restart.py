"""``upload --wait`` across a daemon restart: the job survives in the persistent
queue, so the waiting command says the daemon is away, reconnects with backoff and keeps
waiting on the same job; if the daemon stays away past ``--reconnect-s`` it exits 3 saying
the job stays queued. Real daemon processes, stopped with SIGTERM mid-upload; the upload is
kept slow by the bandwidth cap, lifted for the restart so the test does not wait on it."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers_daemon import DaemonProc, start_daemon

SLOW = "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S"
SIZE = 4 << 20  # a minute at 64 KiB/s: the restart comes long before the end
EVENT_TIMEOUT_S = 90.0


@pytest.fixture
def slow_daemon() -> Iterator[DaemonProc]:
    with start_daemon({SLOW: str(64 << 10)}) as d:
        yield d


class Waiter:
    """``chronicle-agent upload PATH --wait --json`` as a process; stderr read line by line."""

    def __init__(self, daemon: DaemonProc, path: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "upload", str(path), "--type", "checkpoint",
             "--wait", "--json", *extra],
            env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,),
                                        daemon=True)
        self._reader.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.err.append(line)
            self.lines.put(line)

    def await_line(self, needle: str) -> str:
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {needle!r} on stderr; so far: {self.err}") from None
            if needle in line:
                return line

    def finish(self) -> tuple[int, str, str]:
        assert self.proc.stdout is not None  # stderr is the reader thread's alone
        out = self.proc.stdout.read()
        self.proc.stdout.close()
        code = self.proc.wait(EVENT_TIMEOUT_S)
        self._reader.join(EVENT_TIMEOUT_S)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code, out, "".join(self.err)


def _running_job(daemon: DaemonProc) -> dict[str, object]:
    client = daemon.client()
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while time.monotonic() < deadline:
        running = client.list_jobs(state="running")  # bytes_done moves a part at a time
        if running:
            return running[0]
        time.sleep(0.1)
    raise AssertionError(f"no upload got going: {client.list_jobs()}")


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "step-1"
    path.mkdir()
    (path / "weights.bin").write_bytes(os.urandom(SIZE))
    return path


def test_upload_wait_follows_the_job_across_a_restart(slow_daemon: DaemonProc,
                                                      tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    waiter = Waiter(slow_daemon, ckpt)
    job = _running_job(slow_daemon)

    slow_daemon.stop()
    line = waiter.await_line("daemon restarting")
    assert f"job {job['job_id']} resumes when it is back" in line
    assert waiter.proc.poll() is None  # still waiting, not dead
    del slow_daemon.env[SLOW]
    slow_daemon.start()

    code, out, err = waiter.finish()
    assert code == 0, err
    assert "Traceback" not in err
    assert f"daemon is back; job {job['job_id']} is " in err
    final = json.loads(out)
    assert (final["job_id"], final["state"]) == (job["job_id"], "done")
    dest = tmp_path / "restored"
    res = slow_daemon.run_cli("download", final["asset_id"], str(dest))
    assert res.returncode == 0, res.stderr
    assert (dest / "weights.bin").read_bytes() == (ckpt / "weights.bin").read_bytes()


def test_upload_wait_gives_up_on_a_daemon_that_stays_away(slow_daemon: DaemonProc,
                                                          tmp_path: Path) -> None:
    waiter = Waiter(slow_daemon, _checkpoint(tmp_path), "--reconnect-s", "1")
    job = _running_job(slow_daemon)
    slow_daemon.stop()

    code, out, err = waiter.finish()
    assert code == 3, err
    assert out == "" and "Traceback" not in err
    assert err.rstrip().endswith(
        f"did not come back within 1 s; job {job['job_id']} stays in its queue and resumes "
        "when it is back (`chronicle-agent jobs` shows it then)"), err
    assert "daemon restarting" in err

    del slow_daemon.env[SLOW]
    slow_daemon.start()  # and so it does
    assert slow_daemon.client().wait_job(str(job["job_id"]), timeout_s=120)["state"] == "done"
