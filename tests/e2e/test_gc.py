"""The storage sweep of the local server (API 1.1 "storage may be GC'd").

Leftovers are made by real faults: the store unreachable while an asset is abandoned (a
fault proxy resetting every connection), the server SIGKILLed between a row and the bytes
(crash points ``after_asset_deleted`` and ``before_release``), objects put straight into the
store. The store is listed before and after by an independent client (botocore for S3, the
file system for the disk store). A ready asset and a pending asset's live multipart upload
share the store with the garbage and come through whole: the ready one downloads, the
pending one completes. ``kill -9`` mid-sweep (crash point ``gc_removed:1``), restart: the
rest goes, nothing wrong does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.server.gc import SweepBusy, sweep_lock
from tests.support.faultproxy import FaultProxy
from tests.support.helpers_daemon import clean_env
from tests.support.helpers_seaweed import Seaweed, free_ports, use_seaweed_env
from tests.support.helpers_server import Api, MiB, running_server, sha256

BIG = 6 * MiB  # two parts of 5 MiB (the smallest part size) and 1 MiB
SMALL = 3000


# ---- the store, seen from outside -----------------------------------------------------------


class Outside:
    """Lists the store and puts stray objects into it without the server's code."""

    def __init__(self, kind: str, root: Path, seaweed: Seaweed | None, bucket: str) -> None:
        self.kind, self.root, self.bucket, self.seaweed = kind, root, bucket, seaweed
        self.s3: Any = None
        if seaweed is not None:
            import botocore.session

            self.s3 = botocore.session.get_session().create_client(
                "s3", endpoint_url=seaweed.endpoint, region_name="us-east-1",
                aws_access_key_id=seaweed.access_key, aws_secret_access_key=seaweed.secret_key)

    @property
    def storage_url(self) -> str:
        if self.s3 is None:
            return f"file://{self.root}"
        return f"s3://{self.bucket}?endpoint={self.s3.meta.endpoint_url}"

    def listing(self) -> set[str]:
        """Every object (``key``) and multipart upload (``upload:key:id``) in the store;
        the disk store's nameless files as ``file:…``."""
        if self.s3 is not None:
            found = set()
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
                found |= {o["Key"] for o in page.get("Contents", [])}
            uploads = self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
            return found | {f"upload:{u['Key']}:{u['UploadId']}" for u in uploads}
        found = set()
        for meta in (self.root / "objects").glob("*/*"):
            if meta.name.endswith(".meta"):
                if meta.with_suffix("").exists():
                    found.add(json.loads(meta.read_text())["key"])
            elif not meta.with_name(meta.name + ".meta").exists():
                found.add(f"file:{meta.name}")
        for d in (self.root / "multipart").iterdir():
            key = (d / "KEY").read_text() if (d / "KEY").exists() else "?"
            found.add(f"upload:{key}:{d.name}")
        found |= {f"file:tmp/{p.name}" for p in (self.root / "tmp").iterdir()}
        return found

    def put_stray(self, key: str, data: bytes) -> str:
        """An object put straight into the store, as the store itself would keep it."""
        if self.s3 is not None:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
            return key
        h = hashlib.sha256(key.encode()).hexdigest()
        path = self.root / "objects" / h[:2] / h
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        st = path.stat()
        path.with_name(f"{h}.meta").write_text(json.dumps(
            {"key": key, "size": st.st_size, "sha256": sha256(data), "ino": st.st_ino}))
        return key

    def put_nameless(self, age_s: float = 2 * 3600) -> set[str]:
        """The disk store's wreckage of a crash ``age_s`` ago: a file without its record, a
        body cut short, upload directories whose creation stopped (before it was renamed
        into place, and an older layout's without its KEY)."""
        h = secrets.token_hex(32)
        (self.root / "objects" / h[:2]).mkdir(exist_ok=True)
        made = [self.root / "objects" / h[:2] / h, self.root / "tmp" / secrets.token_hex(12)]
        made[0].write_bytes(os.urandom(100))
        made[1].write_bytes(os.urandom(50))
        uploads = [secrets.token_hex(16), f".new-{secrets.token_hex(16)}"]
        for upload in uploads:
            (self.root / "multipart" / upload).mkdir()
            made.append(self.root / "multipart" / upload)
        then = time.time() - age_s
        for path in made:
            os.utime(path, (then, then))
        return {f"file:{h}", f"file:tmp/{made[1].name}", *(f"upload:?:{u}" for u in uploads)}


@pytest.fixture(params=["disk", "s3"])
def outside(request: pytest.FixtureRequest, tmp_path: Path) -> Outside:
    """A store of its own for each test: the sweep takes everything no row of its server
    accounts for, so the session's shared bucket is no place for it."""
    if request.param == "disk":
        return Outside("disk", tmp_path / "objects-root", None, "")
    sw: Seaweed = request.getfixturevalue("seaweed")
    return Outside("s3", tmp_path, sw, f"gc-{secrets.token_hex(5)}")


@pytest.fixture(params=["disk", "s3"])
def own_storage(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``server.storage`` for an in-process server: the disk store, or a bucket of its own
    (not the session's shared one, for the reason above)."""
    if request.param == "disk":
        return ""
    sw: Seaweed = request.getfixturevalue("seaweed")
    use_seaweed_env(sw, monkeypatch)
    return sw.storage_url(f"gc-{secrets.token_hex(5)}")


# ---- a standalone server, as its own process --------------------------------------------------


class ServerProc:
    """``chronicle-agent server`` on a fixed loopback port (disk-store URLs outlive a
    restart), killed and started again by the tests."""

    def __init__(self, root: Path, storage: str, env: dict[str, str]) -> None:
        self.root, self.storage = root, storage
        self.state = root / "srv"
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**clean_env(), **env}
        self.env["XDG_CONFIG_HOME"] = str(root / "cfg")
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "agent", "server", *extra, "--state-dir",
                str(self.state), "--storage", self.storage]

    async def start(self, **settings: str) -> None:
        env = dict(self.env, **{f"CHRONICLE_AGENT_{k.upper()}": v for k, v in settings.items()})
        with open(self.root / "server.log", "ab") as log:
            self.proc = await asyncio.to_thread(
                subprocess.Popen, self.command("--listen", f"127.0.0.1:{self.port}"), env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                assert self.proc.poll() is None, self.log_tail()
                try:
                    async with s.get(f"{self.url}/v1/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"server did not start:\n{self.log_tail()}")

    def token(self) -> str:
        return next(iter(json.loads((self.state / "tokens.json").read_text())["tokens"]))

    async def killed(self) -> int:
        """Wait for the server to die (a crash point); its exit status."""
        assert self.proc is not None
        for _ in range(300):
            if self.proc.poll() is not None:
                return self.proc.returncode
            await asyncio.sleep(0.1)
        raise AssertionError("the server did not die at its crash point")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            await asyncio.to_thread(self.proc.wait, 30)

    def log_tail(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    async def gc(self, *args: str) -> dict[str, Any]:
        """``chronicle-agent server gc --json`` from its own process."""
        res = await asyncio.to_thread(subprocess.run, self.command("gc", "--json", *args),
                                      env=self.env, capture_output=True, text=True,
                                      timeout=120)
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout))


@asynccontextmanager
async def server_proc(tmp_path: Path, outside: Outside) -> AsyncIterator[ServerProc]:
    sw_env = outside.seaweed.env() if outside.seaweed is not None else {}
    env = {**sw_env, "CHRONICLE_AGENT_SERVER__MULTIPART_THRESHOLD_BYTES": str(5 * MiB),
           "CHRONICLE_AGENT_SERVER__PART_SIZE_BYTES": str(5 * MiB)}
    srv = ServerProc(tmp_path, outside.storage_url, env)
    try:
        yield srv
    finally:
        await srv.stop()


async def _make(api: Api, run_id: str, files: dict[str, bytes], *, finish: bool) -> str:
    """An asset of ``run_id`` with ``files`` uploaded; finalized if ``finish``, else left
    pending with every part but the last of each multipart component uploaded."""
    plan = await api.register([{"name": n, "size": len(d), "sha256": sha256(d)}
                               for n, d in files.items()], output_of=run_id)
    if finish:
        body = await api.upload(plan, files)
        r = await api.finalize(plan["asset_id"], body)
        assert r.status == 200, r.body
        return str(plan["asset_id"])
    for name, data in files.items():
        if name in plan.get("multipart", {}):
            mp = plan["multipart"][name]
            p = mp["parts"][0]
            r = await api.put_url(p["url"], data[:mp["part_size"]])
        else:
            r = await api.put_url(plan["upload_urls"][name], data,
                                  plan.get("upload_headers", {}).get(name))
        assert r.status == 200, r.body
    return str(plan["asset_id"])


async def _run(api: Api) -> str:
    r = await api.post("/v1/runs", {"name": "gc"})
    assert r.status in (200, 201), r.body
    return str(r.body["run_id"])


async def _download(api: Api, asset_id: str) -> dict[str, bytes]:
    got = await api.get(f"/v1/assets/{asset_id}", params={"include_presigned": "true"})
    assert got.status == 200 and got.body["state"] == "ready", got.body
    out = {}
    for name, url in got.body["download_urls"].items():
        status, data, _ = await api.get_url(url)
        assert status == 200, (name, status)
        out[name] = data
    return out


async def _complete(api: Api, asset_id: str, files: dict[str, bytes]) -> None:
    """Finish a pending asset left by :func:`_make`: the missing parts, then finalize."""
    listed = (await api.get(f"/v1/assets/{asset_id}/uploads")).body
    body: dict[str, Any] = {}
    urls = (await api.post(f"/v1/assets/{asset_id}/upload-urls", {})).body
    for name, data in files.items():
        spec: dict[str, Any] = {"size": len(data), "sha256": sha256(data)}
        if name in urls.get("multipart", {}):
            mp = urls["multipart"][name]
            done = {p["part_number"]: p["etag"]
                    for p in listed["components"][name].get("parts", [])}
            assert 1 in done, listed  # the part uploaded before the sweep is still there
            for p in mp["parts"]:
                n = p["part_number"]
                if n not in done:
                    r = await api.put_url(p["url"], data[(n - 1) * mp["part_size"]:
                                                         n * mp["part_size"]])
                    assert r.status == 200, r.body
                    done[n] = r.headers["ETag"]
            spec["parts"] = [{"part_number": n, "etag": e} for n, e in sorted(done.items())]
        body[name] = spec
    r = await api.finalize(asset_id, {"components": body})
    assert r.status == 200, r.body


def _of(listing: set[str], *asset_ids: str) -> set[str]:
    return {k for k in listing if any(f"/{a}/" in k for a in asset_ids)}


# ---- the tests ----------------------------------------------------------------------------


async def test_one_sweep_removes_what_faults_left_and_nothing_live(
        tmp_path: Path, outside: Outside) -> None:
    files = {"big.bin": os.urandom(BIG), "small.bin": os.urandom(SMALL)}
    async with server_proc(tmp_path, outside) as srv, aiohttp.ClientSession() as session:
        proxy: FaultProxy | None = None
        if outside.s3 is not None:  # the server reaches the store through a fault proxy
            proxy = FaultProxy(outside.s3.meta.endpoint_url).start()
            srv.storage = f"s3://{outside.bucket}?endpoint={proxy.url}"
        try:
            await srv.start()
            api = Api(session, srv.url, srv.token())
            live_run, dying_run = await _run(api), await _run(api)
            ready = await _make(api, live_run, files, finish=True)
            pending = await _make(api, live_run, files, finish=False)
            deleted = await _make(api, live_run, files, finish=True)
            ended = await _make(api, dying_run, files, finish=False)
            down: list[str] = []
            if proxy is not None:  # the store unreachable while an asset is abandoned
                unreached = await _make(api, live_run, files, finish=False)
                proxy.set_rules([{"action": "reset_request", "forward": False, "times": -1}])
                r = await api.post(f"/v1/assets/{unreached}/abandon", {"reason": "test"})
                assert r.status == 200 and r.body["state"] == "abandoned", r.body
                proxy.clear()
                down.append(unreached)
            await srv.stop()

            # the server killed between the row and the bytes: a delete, an abandon
            await srv.start(debug__crash_point="after_asset_deleted")
            with pytest.raises(aiohttp.ClientError):
                await api.call("DELETE", f"/v1/assets/{deleted}")
            assert await srv.killed() == -9
            await srv.start(debug__crash_point="before_release")
            with pytest.raises(aiohttp.ClientError):
                await api.post(f"/v1/runs/{dying_run}/end", {"status": "failed"})
            assert await srv.killed() == -9

            stray = {outside.put_stray("assets/ast_0123456789abcdef/x.bin", b"orphan"),
                     outside.put_stray("probe/create-only-0123", b"probe")}
            not_ours = outside.put_stray("someone-else/data.bin", b"keep me")
            await srv.start(server__gc_interval_s="0")
            in_flight: set[str] = set()
            if outside.kind == "disk":  # after the start (it clears tmp/)
                stray |= outside.put_nameless()
                # as young as a write in progress: kept whatever the grace period
                in_flight = outside.put_nameless(age_s=0)
            assert (await api.get(f"/v1/assets/{deleted}")).status == 404
            got = (await api.get(f"/v1/assets/{ended}")).body
            assert got["state"] == "abandoned", got

            before = outside.listing()
            garbage = _of(before, deleted, ended, *down) | stray
            assert garbage <= before
            assert all(_of(before, a) for a in (deleted, ended, *down)), (
                [a for a in (deleted, ended, *down) if not _of(before, a)], before)
            keep = _of(before, pending) | {not_ours} | in_flight
            dry = await srv.gc("--dry-run", "--grace", "0")
            assert outside.listing() == before  # a dry run removes nothing
            report = await srv.gc("--grace", "0")
            after = outside.listing()

            removed = before - after
            assert garbage <= removed, sorted(garbage - removed)
            assert keep <= after, sorted(keep - after)
            assert removed - garbage <= _of(before, ready)  # only copies the ready asset left
            listed = {(f"upload:{r['key'] or '?'}:{r['ref']}" if r["kind"] == "upload"
                       else r["key"] or f"file:{r['ref']}") for r in report["removed"]}
            assert listed == removed, sorted(listed ^ removed)  # what it says is what it did
            assert not report["errors"]
            assert [(r["key"], r["ref"]) for r in dry["removed"]] == [
                (r["key"], r["ref"]) for r in report["removed"]]

            assert await _download(api, ready) == files
            await _complete(api, pending, files)
            assert await _download(api, pending) == files
            async with session.get(f"{srv.url}/metrics") as r:
                metrics = await r.text()
            objects = sum(1 for r in report["removed"] if r["kind"] == "object")
            assert f"chronicle_server_gc_objects_removed_total {objects}\n" in metrics, metrics
            assert f"chronicle_server_gc_uploads_aborted_total {len(report['removed']) - objects}" \
                in metrics
            failures = re.search(r"^chronicle_server_release_failures_total (\d+)$", metrics,
                                 re.M)
            assert failures and (int(failures[1]) > 0) is (proxy is not None), metrics
        finally:
            if proxy is not None:
                proxy.stop()


async def test_kill_9_mid_sweep_then_restart_removes_the_rest_and_nothing_wrong(
        tmp_path: Path, outside: Outside) -> None:
    files = {"big.bin": os.urandom(BIG), "small.bin": os.urandom(SMALL)}
    async with server_proc(tmp_path, outside) as srv, aiohttp.ClientSession() as session:
        await srv.start(server__gc_interval_s="0")
        api = Api(session, srv.url, srv.token())
        run = await _run(api)
        ready = await _make(api, run, files, finish=True)
        pending = await _make(api, run, files, finish=False)
        await srv.stop()
        stray = {outside.put_stray(f"assets/ast_gone{i:04d}/f.bin", os.urandom(100))
                 for i in range(250)}
        before = outside.listing()
        keep = before - stray

        # the sweep dies (SIGKILL) after its first batch of removals
        await srv.start(server__gc_interval_s="0.3", server__gc_grace_s="0",
                        debug__crash_point="gc_removed:1")
        assert await srv.killed() == -9
        mid = outside.listing()
        assert keep <= mid and 0 < len(before - mid) < len(stray), len(before - mid)

        await srv.start(server__gc_interval_s="0.3", server__gc_grace_s="0")
        for _ in range(100):
            if not (outside.listing() & stray):
                break
            await asyncio.sleep(0.2)
        after = outside.listing()
        assert not (after & stray), len(after & stray)
        assert keep - _of(keep, ready) <= after
        assert await _download(api, ready) == files
        await _complete(api, pending, files)
        assert await _download(api, pending) == files


async def test_young_leftovers_wait_for_the_grace_period_and_tombstones_for_their_urls(
        tmp_path: Path, own_storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object no row accounts for stays while it is younger than ``gc_grace_s`` (its
    registration may be in flight); on a create-only S3 store a deleted component's empty
    tombstone stays until the upload URLs that could write its key have expired."""
    from agent.server.gc import sweep_storage

    data = os.urandom(SMALL)
    async with running_server(tmp_path / "s", storage=own_storage, gc_interval_s=0,
                              url_expiry_s=3) as s:
        core = s.server._core
        plan = await s.api.register([{"name": "a", "size": len(data), "sha256": sha256(data)}])
        await s.api.finalize(plan["asset_id"], await s.api.upload(plan, {"a": data}))
        assert (await s.api.call("DELETE", f"/v1/assets/{plan['asset_id']}")).status == 204
        orphan = f"assets/ast_{secrets.token_hex(8)}/o.bin"
        await core.storage.put_object(orphan, b"orphan", "application/octet-stream")

        first = await sweep_storage(core, grace_s=3600)
        assert not _mine(first, plan["asset_id"]) and orphan not in _keys(first)
        assert first.too_recent >= 1
        second = await sweep_storage(core, grace_s=0)
        assert orphan in _keys(second) and not _mine(second, plan["asset_id"])
        if core.storage.create_only_puts:  # S3 (SeaweedFS): the delete left a tombstone
            await asyncio.sleep(3.2)  # url_expiry_s: no URL can write the key any more
            third = await sweep_storage(core, grace_s=0)
            assert _keys(third) == {f"assets/{plan['asset_id']}/a"}, _keys(third)


def _keys(report: Any) -> set[str]:
    return {r.item.key for r in report.removed}


def _mine(report: Any, asset_id: str) -> set[str]:
    return {k for k in _keys(report) if k and f"/{asset_id}/" in k}


async def test_sweeps_racing_uploads_never_take_a_live_one(
        tmp_path: Path, own_storage: str) -> None:
    """Sweeps with no grace at all, back to back, while assets are registered, uploaded in
    parts, re-planned and finalized: every asset finalizes and reads back whole (the
    sweep re-checks each batch under the assets' locks)."""
    from agent.server.gc import sweep_storage

    async with running_server(tmp_path / "s", storage=own_storage, gc_interval_s=0,
                              multipart_threshold_bytes=5 * MiB,
                              part_size_bytes=5 * MiB) as s:
        core = s.server._core
        stop = asyncio.Event()
        sweeps = 0

        async def sweeper() -> None:
            nonlocal sweeps
            while not stop.is_set():
                report = await sweep_storage(core, grace_s=0)
                assert not report.errors, report.errors
                sweeps += 1
                await asyncio.sleep(0)

        async def one(i: int) -> None:
            files = {"big.bin": os.urandom(BIG), f"s{i}.bin": os.urandom(SMALL + i)}
            plan = await s.api.register([{"name": n, "size": len(d), "sha256": sha256(d)}
                                         for n, d in files.items()])
            r = await s.api.post(f"/v1/assets/{plan['asset_id']}/upload-urls", {})
            assert r.status == 200, r.body  # re-planned URLs: the same uploads
            body = await s.api.upload({**plan, **r.body}, files)
            r = await s.api.finalize(plan["asset_id"], body)
            assert r.status == 200, r.body
            got = await s.api.get(f"/v1/assets/{plan['asset_id']}",
                                  params={"include_presigned": "true"})
            for name, url in got.body["download_urls"].items():
                status, data, _ = await s.api.get_url(url)
                assert status == 200 and data == files[name], name

        task = asyncio.create_task(sweeper())
        try:
            await asyncio.gather(*(one(i) for i in range(6)))
        finally:
            stop.set()
            await task
        assert sweeps >= 2


async def test_gc_dry_run_reports_a_second_sweep_waits_and_metrics_count(
        tmp_path: Path, own_storage: str) -> None:
    from agent.server.gc import sweep_storage

    async with running_server(tmp_path / "s", storage=own_storage, gc_interval_s=0) as s:
        core = s.server._core
        for i in range(3):
            await core.storage.put_object(f"assets/ast_stray{i}/x", b"x" * (i + 1),
                                          "application/octet-stream")
        dry = await sweep_storage(core, grace_s=0, dry_run=True)
        assert len(dry.removed) == 3 and dry.bytes_removed == 6
        with sweep_lock(s.server.state_dir):
            with pytest.raises(SweepBusy):
                with sweep_lock(s.server.state_dir):
                    pass
        real = await sweep_storage(core, grace_s=0)
        assert {r.item.key for r in real.removed} == {r.item.key for r in dry.removed}
        assert not (await sweep_storage(core, grace_s=0)).removed
        async with s.api.session.get(f"{s.server.url}/metrics") as r:
            text = await r.text()
        assert "chronicle_server_gc_objects_removed_total 3\n" in text, text
        assert "chronicle_server_gc_bytes_removed_total 6\n" in text
        assert "chronicle_server_gc_sweeps_total 2\n" in text  # the dry run is not counted


async def test_a_store_two_servers_use_is_never_swept(
        tmp_path: Path, own_storage: str, caplog: pytest.LogCaptureFixture) -> None:
    """What one server's database does not know may be the other's: the sweep removes
    nothing and says why, and the second server says so when it starts."""
    from agent.server.gc import sweep_storage

    storage = own_storage or f"file://{tmp_path / 'shared'}"
    async with running_server(tmp_path / "a", storage=storage, gc_interval_s=0) as a:
        core = a.server._core
        stray = f"assets/ast_{secrets.token_hex(8)}/x"
        await core.storage.put_object(stray, b"x", "application/octet-stream")
        assert {r.item.key for r in (await sweep_storage(core, grace_s=0, dry_run=True)
                                     ).removed} == {stray}
        async with running_server(tmp_path / "b", storage=storage, gc_interval_s=0):
            assert any("also used by 1 other local server" in r.getMessage()
                       for r in caplog.records if r.levelname == "WARNING")
        report = await sweep_storage(core, grace_s=0)
        assert not report.removed and "also used by other local server" in report.errors[0]
        assert await core.storage.read_small(stray, 10) == b"x"


async def test_server_gc_prints_a_table_and_says_when_another_sweep_runs(
        tmp_path: Path) -> None:
    async with running_server(tmp_path / "s", gc_interval_s=0) as s:
        core = s.server._core
        await core.storage.put_object("assets/ast_stray0000/left.bin", b"x" * 2048,
                                      "application/octet-stream")
        env = {**clean_env(), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
        command = [sys.executable, "-m", "agent", "server", "gc", "--state-dir",
                   str(s.server.state_dir), "--grace", "0"]

        def gc(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*command, *extra], env=env, capture_output=True, text=True,
                                  timeout=60)

        dry = await asyncio.to_thread(gc, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        lines = dry.stdout.splitlines()
        assert lines[0].split() == ["WHAT", "SIZE", "AGE", "KEY", "REASON"], dry.stdout
        assert "assets/ast_stray0000/left.bin" in lines[1] and "no asset row" in lines[1]
        assert lines[-1].startswith("would remove 1 object(s), 2.0 KiB, and 0 multipart")
        with sweep_lock(s.server.state_dir):
            busy = await asyncio.to_thread(gc)
        assert busy.returncode == 1 and "storage sweep" in busy.stderr \
            and "is running" in busy.stderr, busy.stderr
        assert await core.storage.read_small("assets/ast_stray0000/left.bin", 4096)
        done = await asyncio.to_thread(gc)
        assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith(
            "removed 1 object(s)"), done.stdout
        assert await core.storage.read_small("assets/ast_stray0000/left.bin", 4096) is None
        bad = await asyncio.to_thread(gc, "--grace", "-1")
        assert bad.returncode == 2 and "--grace" in bad.stderr
