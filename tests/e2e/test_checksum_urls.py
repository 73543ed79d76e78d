"""Checksum-bound upload URLs (API 1.1 ``checksum_urls``): a small component registered with
its SHA-256 gets a URL with the digest signed in. The store (SeaweedFS, or the server's own
disk store) refuses other bytes with ``BadDigest``; finalize then checks existence and size
with one listing per asset and reads nothing back; a late PUT cannot change a ready asset;
the daemon declares digests when the server offers the feature and works without it."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.helpers_daemon import start_daemon
from tests.support.helpers_e2e import (
    FAST_ENV,
    assert_same_tree,
    chronicle_for,
    proxied_daemon,
    socket_get_text,
)
from tests.support.helpers_seaweed import Seaweed, use_seaweed_env
from tests.support.helpers_server import Running, running_server, sha256

MakeServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make(tmp_path: Path, storage_backend: str) -> AsyncIterator[MakeServer]:
    async with AsyncExitStack() as stack:
        n = 0

        async def make(**server: Any) -> Running:
            nonlocal n
            n += 1
            return await stack.enter_async_context(
                running_server(tmp_path / f"s{n}", storage=storage_backend, **server))

        yield make


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes.fromhex(sha256(data))).decode()


async def test_a_bound_url_takes_only_the_declared_bytes(
    make: MakeServer, storage_backend: str,
) -> None:
    s = await make()
    assert "checksum_urls" in (await s.api.get("/v1/health")).body["features"]
    data, other = os.urandom(70_000), os.urandom(70_000)
    plan = await s.api.register([{"name": "w/a.bin", "size": len(data), "sha256": sha256(data)},
                                 {"name": "b.txt", "size": 3}])
    headers = plan["upload_headers"]
    assert list(headers) == ["w/a.bin"]  # b.txt: declared without a digest, not bound
    assert headers["w/a.bin"]["x-amz-checksum-sha256"] == _b64(data)
    if storage_backend.startswith("s3://"):  # SeaweedFS honours create-only PUTs
        assert headers["w/a.bin"]["if-none-match"] == "*"
    else:  # the disk store's own gate shuts upload URLs at finalize
        assert "if-none-match" not in headers["w/a.bin"]
    url = plan["upload_urls"]["w/a.bin"]

    r = await s.api.put_url(url, other, headers["w/a.bin"])  # same size, other bytes
    assert r.status == 400 and "BadDigest" in r.body, r.body
    r = await s.api.put_url(url, data)  # the signed header left out
    assert r.status == 403, r.body
    r = await s.api.put_url(url, data, {"x-amz-checksum-sha256": _b64(other)})  # swapped
    assert r.status in (400, 403), r.body
    assert (await s.api.put_url(url, data, headers["w/a.bin"])).status == 200
    assert (await s.api.put_url(plan["upload_urls"]["b.txt"], b"abc")).status == 200

    done = await s.api.finalize(plan["asset_id"], {"components": {
        "b.txt": {"size": 3, "sha256": sha256(b"abc")}}})  # a.bin: nothing declared again
    assert done.status == 200, done.body
    comps = {c["name"]: c for c in done.body["components"]}
    assert comps["w/a.bin"]["sha256"] == sha256(data) and comps["w/a.bin"]["size"] == len(data)

    # a late PUT through the old URL: other bytes are refused, the same bytes change nothing
    r = await s.api.put_url(url, other, headers["w/a.bin"])
    assert r.status in (400, 403, 409, 412), r.body  # BadDigest or taken (S3), closed (disk)
    r = await s.api.put_url(url, data, headers["w/a.bin"])
    assert r.status in (409, 412), r.body  # the key is taken (S3), UploadClosed (disk)
    got = await s.api.get(f"/v1/assets/{plan['asset_id']}", params={"include_presigned": "1"})
    status, body, _ = await s.api.get_url(got.body["download_urls"]["w/a.bin"])
    assert status == 200 and body == data


async def test_finalize_refuses_a_missing_or_contradicted_bound_component(
    make: MakeServer,
) -> None:
    s = await make()
    data = os.urandom(1000)
    plan = await s.api.register([{"name": "a", "size": len(data), "sha256": sha256(data)}])
    r = await s.api.finalize(plan["asset_id"], {})
    assert r.status == 409 and r.code == "components_missing", r.body
    await s.api.put_url(plan["upload_urls"]["a"], data, plan["upload_headers"]["a"])
    r = await s.api.finalize(plan["asset_id"], {"components": {
        "a": {"size": len(data), "sha256": sha256(b"something else")}}})
    assert r.status == 422 and r.code == "checksum_mismatch", r.body
    assert (await s.api.finalize(plan["asset_id"], {})).status == 200


async def test_declared_again_with_another_digest_the_component_is_read_back(
    make: MakeServer,
) -> None:
    """upload-urls with another size or digest cannot re-bind (URLs bound to the old digest
    may still write): the component loses its binding and is verified as in version 1."""
    s = await make()
    old, new = os.urandom(500), os.urandom(600)
    plan = await s.api.register([{"name": "a", "size": len(old), "sha256": sha256(old)}])
    r = await s.api.post(f"/v1/assets/{plan['asset_id']}/upload-urls", {
        "components": [{"name": "a", "size": len(new), "sha256": sha256(new)}]})
    assert r.status == 200, r.body
    assert "a" not in r.body.get("upload_headers", {})
    assert (await s.api.put_url(r.body["upload_urls"]["a"], new)).status == 200
    r = await s.api.finalize(plan["asset_id"], {"components": {
        "a": {"size": len(new), "sha256": sha256(old)}}})
    assert r.status == 422 and r.code == "checksum_mismatch", r.body  # the bytes were read
    r = await s.api.finalize(plan["asset_id"], {"components": {
        "a": {"size": len(new), "sha256": sha256(new)}}})
    assert r.status == 200, r.body


async def test_without_the_feature_urls_are_version_1(make: MakeServer) -> None:
    s = await make(checksum_urls=False)
    assert "checksum_urls" not in (await s.api.get("/v1/health")).body["features"]
    data = os.urandom(1000)
    plan = await s.api.register([{"name": "a", "size": len(data), "sha256": sha256(data)}])
    assert "upload_headers" not in plan
    assert (await s.api.put_url(plan["upload_urls"]["a"], os.urandom(1000))).status == 200
    r = await s.api.finalize(plan["asset_id"], {"components": {
        "a": {"size": len(data), "sha256": sha256(data)}}})
    assert r.status == 422 and r.code == "checksum_mismatch", r.body  # read back


async def test_s3_finalize_lists_once_and_reads_nothing_back(
    seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Per asset of bound components the server sends SeaweedFS one listing and nothing
    else: no HEAD, no GET of an object, no copy (create-only URLs: the bytes stay)."""
    use_seaweed_env(seaweed, monkeypatch)
    files = {f"f{i}.bin": os.urandom(4096 + i) for i in range(30)}
    async with FaultProxy(seaweed.endpoint) as proxy, running_server(
            tmp_path / "s", storage=f"s3://{seaweed.bucket}?endpoint={proxy.url}") as s:
        plan = await s.api.register([{"name": n, "size": len(d), "sha256": sha256(d)}
                                     for n, d in files.items()])
        for n, d in files.items():
            r = await s.api.put_url(plan["upload_urls"][n], d, plan["upload_headers"][n])
            assert r.status == 200, r.body
        proxy.reset_stats()
        r = await s.api.finalize(plan["asset_id"], {})
        assert r.status == 200, r.body
        methods = [e["method"] for e in proxy.stats()["log"]]
        got = await s.api.get(f"/v1/assets/{plan['asset_id']}", params={"include_presigned": "1"})
        for n, d in files.items():
            status, body, _ = await s.api.get_url(got.body["download_urls"][n])
            assert status == 200 and body == d
    assert methods == ["GET"]  # the listing (ListObjectsV2 is a GET on the bucket)


async def test_s3_a_deleted_assets_bytes_do_not_come_back(
    seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The asset is deleted while its upload URL is still valid: a late PUT of the same
    bytes through it is refused (the key holds a tombstone) and an old GET URL never serves
    the bytes again."""
    use_seaweed_env(seaweed, monkeypatch)
    data = os.urandom(5000)
    async with running_server(tmp_path / "s", storage=seaweed.storage_url(seaweed.bucket)) as s:
        plan = await s.api.register([{"name": "a", "size": len(data), "sha256": sha256(data)}])
        url, headers = plan["upload_urls"]["a"], plan["upload_headers"]["a"]
        assert (await s.api.put_url(url, data, headers)).status == 200
        assert (await s.api.finalize(plan["asset_id"], {})).status == 200
        got = await s.api.get(f"/v1/assets/{plan['asset_id']}", params={"include_presigned": "1"})
        get_url = got.body["download_urls"]["a"]
        assert (await s.api.get_url(get_url))[1] == data
        assert (await s.api.put_url(url, data, headers)).status == 412  # ready: key taken
        assert (await s.api.call("DELETE", f"/v1/assets/{plan['asset_id']}")).status == 204
        assert (await s.api.put_url(url, data, headers)).status == 412  # deleted: still taken
        status, body, _ = await s.api.get_url(get_url)
        assert body != data and len(body) < len(data), (status, body[:100])


# ---- the daemon --------------------------------------------------------------------------


def _small_tree(root: Path, n: int = 12, size: int = 1000) -> Path:
    for i in range(n):
        p = root / f"d{i % 3}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size + i))
    return root


def _upload_done(daemon: Any, src: Path) -> dict[str, Any]:
    client = daemon.client()
    job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "ckpt"})
    done: dict[str, Any] = client.wait_job(job["job_id"], 60)
    assert done["state"] == "done", (done, daemon.log_tail())
    return done


@pytest.mark.parametrize("feature", [True, False], ids=["bound", "version-1"])
def test_the_daemon_uploads_with_and_without_the_feature(tmp_path: Path, feature: bool) -> None:
    src = _small_tree(tmp_path / "src")
    env = dict(FAST_ENV, CHRONICLE_AGENT_SERVER__CHECKSUM_URLS=str(feature).lower())
    with start_daemon(env) as daemon:
        done = _upload_done(daemon, src)
        dest = tmp_path / "dl"
        chronicle_for(daemon).assets.download(done["asset_id"], dest)
        assert_same_tree(src, dest)
        said = "offers no checksum-bound upload URLs" in daemon.log_text()
        assert said is not feature


@pytest.mark.parametrize("later", [True, False], ids=["declared-later", "all-at-register"])
def test_small_files_are_declared_while_the_first_ones_upload(tmp_path: Path,
                                                              later: bool) -> None:
    """With API 1.1 asset_keys, register declares the first 64 small files and the rest
    are declared in growing batches (256, 1024, ...) while those upload; without it, all at
    register. Either way every component is bound and nothing is read back."""
    src = _small_tree(tmp_path / "src", 400, 500)
    env = dict(FAST_ENV, CHRONICLE_AGENT_SERVER__ASSET_KEYS=str(later).lower())
    with start_daemon(env) as daemon:
        done = _upload_done(daemon, src)
        said = "registered (64 components; 336 more declared while these upload)"
        assert (said in daemon.log_text()) is later, daemon.log_tail()
        assert ("registered (400 components)" in daemon.log_text()) is not later
        chron = chronicle_for(daemon)
        got = chron.assets.get(done["asset_id"])
        assert len(got.components) == 400 and all(c.sha256 for c in got.components)
        dest = tmp_path / "dl"
        chron.assets.download(done["asset_id"], dest)
        assert_same_tree(src, dest)


def test_a_file_rewritten_after_register_fails_as_source_changed(tmp_path: Path) -> None:
    """The daemon dies after register (its digests declared); the file is rewritten in
    place with the same size and modification time; after the restart the upload finds
    the bytes are not the declared ones and fails once with source_changed (no loop)."""
    src = _small_tree(tmp_path / "src")
    victim = src / "d1" / "f4.bin"
    env = dict(FAST_ENV, CHRONICLE_AGENT_DEBUG__CRASH_POINT="after_register@1")
    with start_daemon(env) as daemon:
        client = daemon.client()
        job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "ckpt"})
        assert daemon.proc is not None
        daemon.proc.wait(60)
        assert daemon.proc.returncode == -9, daemon.log_tail()
        st = victim.stat()
        with open(victim, "r+b") as f:
            f.write(os.urandom(st.st_size))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert victim.stat().st_mtime_ns == st.st_mtime_ns
        daemon.start()
        final = daemon.client().wait_job(job["job_id"], 60)
        assert final["state"] == "failed", (final, daemon.log_tail())
        assert final["error"]["code"] == "source_changed"
        assert "f4.bin" in final["error"]["message"]
        assert "SHA-256 differs" in final["error"]["message"]
        assert final["attempts"] <= 2, final


@pytest.mark.parametrize("store", ["disk", "s3"])
def test_bytes_damaged_in_flight_are_refused_and_sent_again(
    tmp_path: Path, store: str, request: pytest.FixtureRequest,
) -> None:
    """A proxy flips one byte of one PUT: the store refuses it (BadDigest), the daemon sends
    the file again and the asset is byte-exact; the retry is counted in /metrics."""
    seaweed = request.getfixturevalue("seaweed") if store == "s3" else None
    src = _small_tree(tmp_path / "src")
    with proxied_daemon(seaweed=seaweed) as (daemon, proxy):
        proxy.set_rules([{"action": "corrupt_request", "method": "PUT",
                          "path_regex": r"f4\.bin", "offset": 100, "times": 1}])
        client = daemon.client()
        job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "ckpt"})
        done = client.wait_job(job["job_id"], 60)
        assert done["state"] == "done", (done, daemon.log_tail())
        refused = [e for e in proxy.stats()["log"] if e.get("fault") == "corrupt_request"]
        assert len(refused) == 1 and refused[0]["status"] == 400, proxy.stats()["log"]
        metrics = socket_get_text(daemon.socket_path, "/metrics")
        assert 'retries_total{cause="bad_digest"}' in metrics
        dest = tmp_path / "dl"
        chronicle_for(daemon).assets.download(done["asset_id"], dest)
        assert_same_tree(src, dest)


def test_bytes_damaged_every_time_fail_the_job_without_looping(tmp_path: Path) -> None:
    src = _small_tree(tmp_path / "src")
    env = {"CHRONICLE_AGENT_UPLOAD__MAX_ATTEMPTS": "3",
           "CHRONICLE_AGENT_UPLOAD__JOB_MAX_ATTEMPTS": "1"}
    with proxied_daemon(env) as (daemon, proxy):
        proxy.set_rules([{"action": "corrupt_request", "method": "PUT",
                          "path_regex": r"f4\.bin", "offset": 0, "times": -1}])
        client = daemon.client()
        job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "ckpt"})
        final = client.wait_job(job["job_id"], 60)
        assert final["state"] == "failed", (final, daemon.log_tail())
        assert final["error"]["code"] == "bad_digest", final
        puts = [e for e in proxy.stats()["log"] if e["method"] == "PUT" and
                "f4.bin" in e["path"]]
        assert len(puts) == 3, puts  # upload.max_attempts, then it stops
        assert "WARNING" in daemon.log_text()


def test_a_put_whose_answer_was_lost_is_not_sent_twice_in_vain(
    tmp_path: Path, seaweed: Seaweed,
) -> None:
    """SeaweedFS takes a PUT but its answer is cut: the daemon sends it again, the store
    answers 412 (the key is taken, by these bytes: every URL for it binds their digest) and
    the daemon counts the file as sent."""
    src = _small_tree(tmp_path / "src")
    with proxied_daemon(seaweed=seaweed) as (daemon, proxy):
        proxy.set_rules([{"action": "truncate_response", "method": "PUT",
                          "path_regex": r"f4\.bin", "drop_head": True, "times": 1}])
        client = daemon.client()
        job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "ckpt"})
        done = client.wait_job(job["job_id"], 60)
        assert done["state"] == "done", (done, daemon.log_tail())
        puts = [e["status"] for e in proxy.stats()["log"]
                if e["method"] == "PUT" and "f4.bin" in e["path"]]
        assert puts == [200, 412], proxy.stats()["log"]
        dest = tmp_path / "dl"
        chronicle_for(daemon).assets.download(done["asset_id"], dest)
        assert_same_tree(src, dest)
