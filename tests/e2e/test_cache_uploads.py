"""A watched checkpoint's snapshot, once uploaded, is kept in the node-local cache,
so a restore on the same node makes no GET at the store (counted at a proxy in front of
it) and lands byte-exact; the trainer's own files are untouched (mode, content), and with
``download.cache_uploads = false`` the restore fetches."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from tests.e2e.test_download import download, gets
from tests.support.helpers_e2e import assert_same_tree, proxied_daemon
from tests.support.helpers_watch import FAST_WATCH_ENV, wait_jobs_terminal


def checkpoint(out: Path) -> Path:
    ck = out / "checkpoint-1"
    ck.mkdir(parents=True)
    (ck / "model.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (ck / "shards").mkdir()
    (ck / "shards" / "0.bin").write_bytes(os.urandom(70_000))
    (ck / "_SUCCESS").write_bytes(b"")
    return ck


def env_for(out: Path, **extra: str) -> dict[str, str]:
    rules = [{"path": f"{out}/checkpoint-*", "run_id": "run_cache", "seal": ["marker"]}]
    return {**FAST_WATCH_ENV, "CHRONICLE_AGENT_WATCH": json.dumps(rules), **extra}


def test_a_restore_of_this_nodes_upload_comes_from_the_cache(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with proxied_daemon(env_for(out)) as (daemon, proxy):
        ck = checkpoint(out)
        modes = {p: p.stat().st_mode for p in ck.rglob("*") if p.is_file()}
        job = wait_jobs_terminal(daemon, 1)[0]
        assert job["state"] == "done", job
        aid = job["asset_id"]
        entry = daemon.state_dir / "cache" / "objects" / aid
        for _ in range(200):  # the snapshot is moved in by the watcher's cleanup
            if (entry / "model.bin").exists():
                break
            daemon.client().request("GET", "/v1/health")
            time.sleep(0.05)
        assert (entry / "shards" / "0.bin").exists(), daemon.log_tail()
        assert f"cache: {aid} kept from its upload" in daemon.log_text()
        proxy.reset_stats()
        final = download(daemon, aid, tmp_path / "restored")
        assert final["result"]["cached"] is True
        assert gets(proxy, aid) == []  # not one byte from the store
        assert_same_tree(ck, tmp_path / "restored")
        assert {p: p.stat().st_mode for p in ck.rglob("*") if p.is_file()} == modes
        assert all(stat.S_IMODE(m) != 0o444 for m in modes.values())


def test_without_cache_uploads_the_restore_fetches(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with proxied_daemon(env_for(out, CHRONICLE_AGENT_DOWNLOAD__CACHE_UPLOADS="false")) as (
            daemon, proxy):
        ck = checkpoint(out)
        job = wait_jobs_terminal(daemon, 1)[0]
        aid = job["asset_id"]
        proxy.reset_stats()
        final = download(daemon, aid, tmp_path / "restored")
        assert final["result"]["cached"] is False
        assert len(gets(proxy, aid)) == 2  # model.bin, shards/0.bin (_SUCCESS is empty)
        assert_same_tree(ck, tmp_path / "restored")
