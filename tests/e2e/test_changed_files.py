"""A file that changes after it was registered never becomes part of a ready asset: the
job fails with ``source_changed`` and abandons what it had sent; a retry uploads the file as
it is then."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_e2e import FAST_ENV, MiB, assert_same_tree, chronicle_for, write_random

SLOW = dict(FAST_ENV, CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S=str(8 * MiB),
            CHRONICLE_AGENT_UPLOAD__CONCURRENCY="2")


def _rewrite_in_place(path: Path) -> None:
    """What torch.save onto an existing file does: same inode, new bytes."""
    ino = path.stat().st_ino
    with open(path, "r+b") as f:
        left = path.stat().st_size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    assert path.stat().st_ino == ino


def _wait_bytes(daemon: DaemonProc, job_id: str, at_least: int) -> None:
    deadline = time.monotonic() + 30
    while daemon.client().get_job(job_id)["bytes_done"] < at_least:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize(("size", "rate"), [(30 * MiB, 8 * MiB), (6 * MiB, 2 * MiB)],
                         ids=["multipart", "single-put"])
def test_rewrite_in_place_mid_upload_fails_then_retry_uploads_new_bytes(
    tmp_path: Path, size: int, rate: int
) -> None:
    src = tmp_path / "ckpt"
    write_random(src / "last.pt", size)
    (src / "meta.json").write_text("{}")
    env = dict(SLOW, CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S=str(rate))
    with start_daemon(env) as daemon:
        client = daemon.client()
        job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "ckpt"})
        _wait_bytes(daemon, job["job_id"], rate + 1)
        _rewrite_in_place(src / "last.pt")
        final = client.wait_job(job["job_id"], 60)
        assert final["state"] == "failed"
        assert final["error"]["code"] == "source_changed"
        assert "last.pt" in final["error"]["message"]
        assert "retry" in final["error"]["message"]
        chron = chronicle_for(daemon)
        assert chron.assets.get(final["asset_id"]).state == "abandoned"

        again = client.retry_job(job["job_id"])
        done = client.wait_job(again["job_id"], 120)
        assert done["state"] == "done", done
        assert done["asset_id"] != final["asset_id"]
        dest = tmp_path / "dl"
        chron.assets.download(done["asset_id"], dest)
        assert_same_tree(src, dest)  # the new bytes, whole


def test_deleted_file_fails_clearly(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    write_random(src / "a.bin", 30 * MiB)
    with start_daemon(SLOW) as daemon:
        client = daemon.client()
        job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "ckpt"})
        _wait_bytes(daemon, job["job_id"], MiB)
        (src / "a.bin").unlink()
        final = client.wait_job(job["job_id"], 60)
        assert final["state"] == "failed"
        assert final["error"]["code"] == "source_changed"
        assert "deleted" in final["error"]["message"] or "changed" in final["error"]["message"]
