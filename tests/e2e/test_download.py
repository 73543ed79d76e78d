"""Downloads for real: a real daemon whose storage traffic goes through the fault proxy, real
files, a real tmpfs that fills up.

- a daemon killed mid-download (crash point ``mid_download:N@1``) resumes with ``Range`` after
  the restart; the destination never holds a partial file;
- a truncated response is resumed, a corrupted byte is fetched again and never accepted;
- a destination on a tiny filesystem: the job waits in the queue (``disk_full``, shown by
  ``jobs``) and resumes once space returns; past its attempts it fails and ``retry`` resumes;
- the node-local cache: two concurrent downloads of one asset cause one fetch, least
  recently used entries are evicted under a small cap, materialization is a hardlink on the
  same filesystem (same inode) and a copy across filesystems, and it survives a restart.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.helpers_daemon import DaemonProc
from tests.support.helpers_e2e import (
    MiB,
    assert_same_tree,
    chronicle_for,
    fill_up,
    proxied_daemon,
    write_random,
)

WAIT_S = 90


def upload(daemon: DaemonProc, src: Path) -> str:
    client = daemon.client()
    job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "checkpoint"})
    final = client.wait_job(job["job_id"], WAIT_S)
    assert final["state"] == "done", final
    return str(final["asset_id"])


def start_download(daemon: DaemonProc, asset_id: str, dest: Path, **extra: Any) -> str:
    job = daemon.client().request("POST", "/v1/downloads",
                                  {"asset_id": asset_id, "dest": str(dest), **extra})
    return str(job["job_id"])


def download(daemon: DaemonProc, asset_id: str, dest: Path) -> dict[str, Any]:
    final = daemon.client().wait_job(start_download(daemon, asset_id, dest), WAIT_S)
    assert final["state"] == "done", (final, daemon.log_tail())
    return final


def gets(proxy: FaultProxy, asset_id: str) -> list[dict[str, Any]]:
    """The storage GETs the proxy saw for one asset."""
    return [e for e in proxy.stats()["log"]
            if e["method"] == "GET" and e["path"].startswith("/storage/")
            and f"/{asset_id}/" in e["path"]]


def tree(root: Path) -> Path:
    root.mkdir(parents=True)
    write_random(root / "model.bin", 3 * MiB + 123)
    (root / "sub").mkdir()
    (root / "sub" / "opt.pt").write_bytes(os.urandom(200_000))
    (root / "empty").write_bytes(b"")
    return root


def killed_mid_download(daemon: DaemonProc, proxy: FaultProxy, src: Path,
                        dest: Path) -> tuple[str, str]:
    """Upload ``src``, then download it into ``dest`` with the daemon's crash point
    (``mid_download:N@2``, armed by a restart here) killing it midway: (asset id, job id).
    The proxy's counters start at the download; nothing is at the destination."""
    daemon.stop()
    daemon.start()  # second start: the crash point is armed now
    aid = upload(daemon, src)
    proxy.reset_stats()
    job_id = start_download(daemon, aid, dest)
    assert daemon.proc is not None
    daemon.proc.wait(60)  # it kills itself at the crash point
    assert daemon.proc.returncode == -9, daemon.log_tail()
    assert not dest.exists()  # never a partial file at the destination
    return aid, job_id


def no_partials(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".chronicle-partial-" in p.name]


# ---- resume, faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_kill_mid_download_resumes_with_range(tmp_path: Path, cache: bool) -> None:
    src = tmp_path / "src"
    write_random(src / "big.bin", 24 * MiB)
    (src / "small.txt").write_text("small")
    env = {"CHRONICLE_AGENT_DEBUG__CRASH_POINT": "mid_download:10485760@2",
           "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(40 * MiB)}
    if not cache:
        env["CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES"] = "0"
    with proxied_daemon(env) as (daemon, proxy):
        dest = tmp_path / "dest"
        aid, job_id = killed_mid_download(daemon, proxy, src, dest)  # after 10 MiB of big.bin
        partial = (daemon.state_dir / "cache" / "fill" / aid) if cache else next(
            p for p in tmp_path.iterdir() if ".chronicle-partial-" in p.name)
        kept = (partial / "big.bin").stat().st_size
        assert kept >= 10 * MiB
        sent_before = proxy.stats()["bytes_down"]
        daemon.start()
        final = daemon.client().wait_job(job_id, WAIT_S)
        assert final["state"] == "done", (final, daemon.log_tail())
        assert_same_tree(src, dest)
        assert no_partials(tmp_path)
        assert "resuming from byte" in daemon.log_text()
        assert len(gets(proxy, aid)) == 3  # big.bin twice (the second one ranged), small once
        resent = proxy.stats()["bytes_down"] - sent_before
        assert resent <= 24 * MiB - kept + 1000  # only what was missing, not from byte 0


def test_truncated_response_is_resumed(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    with proxied_daemon() as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        proxy.set_rules([{"action": "truncate_response", "method": "GET",
                          "path_regex": "model\\.bin", "after_bytes": 2 * MiB}])
        dest = tmp_path / "dest"
        final = download(daemon, aid, dest)
        assert final["attempts"] == 1  # retried request by request, not job by job
        assert_same_tree(src, dest)
        model = [e for e in gets(proxy, aid) if e["path"].endswith("model.bin")]
        assert [e["fault"] for e in model] == ["truncate_response", None]
        assert proxy.stats()["bytes_down"] < 3 * MiB + 2 * MiB + 400_000  # resumed, not again
        assert "resuming from byte" in daemon.log_text()


def test_corrupted_byte_is_fetched_again_never_accepted(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    with proxied_daemon() as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        proxy.set_rules([{"action": "corrupt_response", "method": "GET",
                          "path_regex": "model\\.bin", "offset": 1_000_000}])
        dest = tmp_path / "dest"
        download(daemon, aid, dest)
        assert_same_tree(src, dest)
        model = [e for e in gets(proxy, aid) if e["path"].endswith("model.bin")]
        assert [e["fault"] for e in model] == ["corrupt_response", None]
        metrics = proxy.stats()
        assert metrics["faults"] == {"corrupt_response": 1}

        # corrupted every time: the job fails, nothing is left at the destination or cached
        other = tree(tmp_path / "src2")
        aid2 = upload(daemon, other)
        proxy.set_rules([{"action": "corrupt_response", "method": "GET",
                          "path_regex": "model\\.bin", "offset": 5, "times": -1}])
        dest2 = tmp_path / "dest2"
        final = daemon.client().wait_job(start_download(daemon, aid2, dest2), WAIT_S)
        assert final["state"] == "failed"
        assert final["error"]["code"] == "checksum_mismatch", final
        assert not dest2.exists() and no_partials(tmp_path)
        assert not (daemon.state_dir / "cache" / "objects" / aid2).exists()
        assert not (daemon.state_dir / "cache" / "fill" / aid2 / "model.bin").exists()


def test_invalidated_refused_deprecated_warned(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    with proxied_daemon() as (daemon, _proxy):
        aid = upload(daemon, src)
        chron = chronicle_for(daemon)
        chron.assets.deprecate(aid, reason="superseded by the Re=2000 sweep")
        res = daemon.run_cli("download", aid, str(tmp_path / "d1"))
        assert res.returncode == 0, res.stderr
        assert "deprecated: superseded by the Re=2000 sweep" in res.stderr
        chron.assets.invalidate(aid, reason="labeling bug in the source data")
        res = daemon.run_cli("download", aid, str(tmp_path / "d2"))
        assert res.returncode == 1
        assert "asset_invalid" in res.stderr and "labeling bug" in res.stderr
        assert not (tmp_path / "d2").exists() and no_partials(tmp_path)
        res = daemon.run_cli("download", aid, str(tmp_path / "d3"), "--allow-invalid", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["asset_id"] == aid
        assert_same_tree(src, tmp_path / "d3")


# ---- a full disk ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
def test_full_disk_waits_in_the_queue_and_resumes(
    tmp_path: Path, tiny_fs: Path, cache: bool
) -> None:
    """The destination is on an 8 MiB tmpfs with about 1.5 MiB free. Without the cache the
    fetch itself runs out of space (staging beside the destination); with it (the cache is on
    the big disk) the copy into the destination does."""
    src = tmp_path / "src"
    write_random(src / "a.bin", 2 * MiB)
    write_random(src / "b.bin", 2 * MiB)
    env = {"CHRONICLE_AGENT_DOWNLOAD__DISK_FULL_RETRY_S": "0.3"}
    if not cache:
        env["CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES"] = "0"
    with proxied_daemon(env) as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        filler = fill_up(tiny_fs, int(1.5 * MiB))
        dest = tiny_fs / "dest"
        job_id = start_download(daemon, aid, dest)
        deadline = time.monotonic() + 30
        while True:
            job = daemon.client().get_job(job_id)
            if job["error"] and job["error"]["code"] == "disk_full":
                break
            assert job["state"] not in ("done", "failed"), job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["state"] in ("queued", "running")
        assert "no space left on device" in job["error"]["message"]
        res = daemon.run_cli("jobs", "--json")
        [listed] = [j for j in json.loads(res.stdout)["jobs"] if j["job_id"] == job_id]
        assert listed["error"]["code"] == "disk_full"
        res = daemon.run_cli("jobs")
        assert "disk_full: " in res.stdout
        assert not dest.exists()
        time.sleep(0.5)  # another attempt or two while the disk stays full
        kept = sum(p.stat().st_size for p in tiny_fs.rglob("*.bin"))
        sent_before = proxy.stats()["bytes_down"]
        filler.unlink()  # space returns
        final = daemon.client().wait_job(job_id, WAIT_S)
        assert final["state"] == "done", final
        assert_same_tree(src, dest)
        assert no_partials(tiny_fs)
        if cache:  # the fill completed once; only the copy into the destination waited
            assert len(gets(proxy, aid)) == 2
            assert os.stat(dest / "a.bin").st_ino != os.stat(
                daemon.state_dir / "cache" / "objects" / aid / "a.bin").st_ino
        else:  # what was written before the disk filled up was not fetched again
            assert kept > 0
            assert proxy.stats()["bytes_down"] - sent_before <= 4 * MiB - kept + 1000


def test_full_disk_past_its_attempts_fails_cleans_up_and_retry_completes(
    tmp_path: Path, tiny_fs: Path
) -> None:
    src = tmp_path / "src"
    write_random(src / "a.bin", 3 * MiB)
    env = {"CHRONICLE_AGENT_DOWNLOAD__DISK_FULL_RETRY_S": "0.2",
           "CHRONICLE_AGENT_UPLOAD__JOB_MAX_ATTEMPTS": "2",
           "CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES": "0"}
    with proxied_daemon(env) as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        filler = fill_up(tiny_fs, int(1.5 * MiB))
        dest = tiny_fs / "dest"
        final = daemon.client().wait_job(start_download(daemon, aid, dest), WAIT_S)
        assert final["state"] == "failed" and final["error"]["code"] == "disk_full", final
        assert final["attempts"] == 2
        assert not dest.exists()
        # a failed download leaves nothing behind: its partial files gave the disk back
        assert [p for p in tiny_fs.iterdir() if ".chronicle-partial-" in p.name] == []
        filler.unlink()
        res = daemon.run_cli("retry", final["job_id"])
        assert res.returncode == 0, res.stderr
        final = daemon.client().wait_job(final["job_id"], WAIT_S)
        assert final["state"] == "done", final
        assert_same_tree(src, dest)


# ---- the cache ------------------------------------------------------------------------------


def test_two_concurrent_downloads_of_one_asset_fetch_once(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    with proxied_daemon() as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        proxy.set_rules([{"action": "delay", "method": "GET", "path_regex": "/storage/",
                          "seconds": 1.0, "times": -1}])
        jobs = [start_download(daemon, aid, tmp_path / f"run{i}") for i in range(2)]
        finals = [daemon.client().wait_job(j, WAIT_S) for j in jobs]
        assert [f["state"] for f in finals] == ["done", "done"], finals
        for i in range(2):
            assert_same_tree(src, tmp_path / f"run{i}")
        assert len(gets(proxy, aid)) == 2  # each component fetched once (the empty one: never)
        assert sorted(bool(f["result"]["cached"]) for f in finals) == [False, True]
        log = daemon.log_text()
        assert log.count(f"cache: {aid} filled") == 1
        assert log.count(f"cache: {aid} served from the cache") == 1


def test_cache_hardlinks_and_survives_a_restart(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    with proxied_daemon() as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        download(daemon, aid, tmp_path / "a")
        entry = daemon.state_dir / "cache" / "objects" / aid
        for name in ("model.bin", "sub/opt.pt", "empty"):
            st = os.stat(tmp_path / "a" / name)
            assert st.st_ino == os.stat(entry / name).st_ino  # a hardlink: the same inode
            assert st.st_mode & 0o777 == 0o444  # read-only: it is the cache's copy too
        assert len(gets(proxy, aid)) == 2  # the empty component needs no GET
        health = daemon.client().health()
        assert health["cache"]["entries"] == 1
        assert health["cache"]["bytes"] == 3 * MiB + 123 + 200_000

        daemon.restart()
        final = download(daemon, aid, tmp_path / "b")
        assert final["result"]["cached"] is True
        assert len(gets(proxy, aid)) == 2  # nothing fetched: the index survived
        assert_same_tree(src, tmp_path / "b")

        # a hardlinked file changed in place (root can) is never served again
        target = tmp_path / "b" / "sub" / "opt.pt"
        with open(target, "r+b") as f:
            f.write(b"tampered")
        final = download(daemon, aid, tmp_path / "c")
        assert final["result"]["cached"] is False
        assert (tmp_path / "c" / "sub" / "opt.pt").read_bytes() == (
            src / "sub" / "opt.pt").read_bytes()
        assert len(gets(proxy, aid)) == 4
        assert "was changed on disk" in daemon.log_text()


def test_cache_evicts_least_recently_used_under_its_cap(tmp_path: Path) -> None:
    env = {"CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES": str(int(3.5 * MiB))}
    with proxied_daemon(env) as (daemon, proxy):
        ids = {}
        for name in ("a", "b", "c"):
            write_random(tmp_path / name / "data.bin", int(1.5 * MiB))
            ids[name] = upload(daemon, tmp_path / name)
        write_random(tmp_path / "huge" / "data.bin", 4 * MiB)
        ids["huge"] = upload(daemon, tmp_path / "huge")
        objects = daemon.state_dir / "cache" / "objects"

        def cached() -> set[str]:
            return {n for n, i in ids.items() if (objects / i).exists()}

        download(daemon, ids["a"], tmp_path / "dl-a1")
        download(daemon, ids["b"], tmp_path / "dl-b1")
        assert cached() == {"a", "b"}
        download(daemon, ids["a"], tmp_path / "dl-a2")  # a is now the most recently used
        download(daemon, ids["c"], tmp_path / "dl-c1")  # 4.5 MiB > 3.5: b goes
        assert cached() == {"a", "c"}
        assert "evicting " + ids["b"] in daemon.log_text()
        proxy.reset_stats()
        download(daemon, ids["b"], tmp_path / "dl-b2")  # fetched again; a goes now
        assert len(gets(proxy, ids["b"])) == 1
        assert cached() == {"b", "c"}
        final = download(daemon, ids["huge"], tmp_path / "dl-huge")  # over the cap: bypass
        assert final["result"]["cached"] is False
        assert cached() == {"b", "c"}
        assert_same_tree(tmp_path / "huge", tmp_path / "dl-huge")
        assert daemon.client().health()["cache"]["bytes"] <= int(3.5 * MiB)


# ---- without a daemon ---------------------------------------------------------------------


def test_without_a_daemon_the_sdk_downloads_in_process(tmp_path: Path) -> None:
    """``Chronicle(url=…, token=…).assets.download`` with no daemon running streams the bytes
    itself, with the same guarantees: a truncated response is resumed, a corrupted byte is
    fetched again, nothing partial lands at the destination."""
    import hashlib
    import urllib.request

    from agent.chronicle import contract
    from agent.chronicle import models as m
    from tests.support.helpers_e2e import free_port
    from tests.support.helpers_standalone import standalone_server

    port = free_port()
    files = {"weights.bin": os.urandom(3 * MiB), "cfg/run.json": b'{"lr": 0.1}'}
    with FaultProxy(f"http://127.0.0.1:{port}") as proxy, standalone_server(
            tmp_path / "srv", {"user_alice": []}, listen=f"127.0.0.1:{port}",
            public_url=proxy.url) as srv:
        chron = srv.client("user_alice")
        plan = chron.send(contract.register("checkpoint", list(files)))
        for name, data in files.items():
            req = urllib.request.Request(plan.upload_urls[name], data=data, method="PUT")
            with urllib.request.urlopen(req) as r:
                assert r.status == 200
        chron.send(contract.finalize(plan.asset_id, {
            n: m.FinalizeComponent(size=len(d), sha256=hashlib.sha256(d).hexdigest())
            for n, d in files.items()}))
        proxy.reset_stats()
        proxy.set_rules([
            {"action": "truncate_response", "method": "GET", "path_regex": "weights",
             "after_bytes": MiB},
            {"action": "corrupt_response", "method": "GET", "path_regex": "run\\.json",
             "offset": 3},
        ])
        res = chron.assets.download(plan.asset_id, tmp_path / "dest")
        assert res["job_id"] is None and res["cached"] is False
        for name, data in files.items():
            assert (tmp_path / "dest" / name).read_bytes() == data
        assert sorted(f["name"] for f in res["files"]) == sorted(files)
        assert [e["fault"] for e in proxy.stats()["log"]].count(None) == 2
        assert proxy.stats()["bytes_down"] < 3 * MiB + MiB + 100
        assert no_partials(tmp_path)
