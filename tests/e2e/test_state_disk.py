"""A full state disk stops intake with a clear error and loses nothing already queued:
work in flight ends properly once space returns."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from agent.errors import ApiError
from tests.support.helpers_daemon import start_daemon


def fill_completely(fs: Path) -> Path:
    filler = fs / "filler"
    block = b"\0" * 65536
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_full_state_disk_refuses_new_work_and_keeps_the_queue(
    tiny_fs: Path, tmp_path: Path
) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(os.urandom(200_000))
    env = {"CHRONICLE_AGENT_AGENT__STATE_DIR": str(tiny_fs / "state"),
           # the embedded server keeps its bytes elsewhere: only the queue is on the tiny disk
           "CHRONICLE_AGENT_SERVER__STATE_DIR": str(tmp_path / "server"),
           "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": "50000"}  # about 4 s
    with start_daemon(env) as daemon:
        client = daemon.client()
        first = client.request("POST", "/v1/uploads", {"path": str(f), "asset_type": "x"})
        filler = fill_completely(tiny_fs)
        refused = None
        for i in range(200):  # SQLite may absorb a few rows in pages it already holds
            try:
                client.request("POST", "/v1/uploads", {"path": str(f), "asset_type": f"x{i}"})
            except ApiError as e:
                refused = e
                break
        assert refused is not None, "a full state disk never refused new work"
        assert refused.status == 507 and refused.code == "state_disk_full", refused.message
        assert "queued work is kept" in refused.message
        assert daemon.running, daemon.log_tail(60)  # the daemon is still up
        filler.unlink()
        done = client.wait_job(first["job_id"], 60)
        assert done["state"] == "done", done
        again = client.request("POST", "/v1/uploads", {"path": str(f), "asset_type": "y"})
        assert client.wait_job(again["job_id"], 60)["state"] == "done"
