"""The S3 backend of the local server against SeaweedFS, beyond the shared contract tests in
test_server.py: ListParts paging, bucket creation, what finalize can verify, configuration
errors, and that botocore stays out of a process that does not use S3."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from agent.config import Settings
from agent.errors import ConfigError
from agent.server.runner import start_server
from agent.server.storage import MiB, open_storage
from tests.support.helpers_seaweed import Seaweed, use_seaweed_env
from tests.support.helpers_server import running_server, sha256

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def s3_env(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> Seaweed:
    use_seaweed_env(seaweed, monkeypatch)
    return seaweed


async def test_list_parts_pages_past_1000(s3_env: Seaweed, tmp_path: Path) -> None:
    from agent.server.signing import Signer

    pool = concurrent.futures.ThreadPoolExecutor(8)
    storage = open_storage(s3_env.storage_url(s3_env.bucket), tmp_path, Signer(b"k" * 32), pool)
    await storage.start("http://unused")
    try:
        key = "paging/test.bin"
        upload_id = await storage.create_multipart(key)
        numbers = list(range(1, 1006))
        urls = await storage.presign_parts(key, upload_id, numbers, 600)
        sem = asyncio.Semaphore(16)
        async with aiohttp.ClientSession() as session:

            async def put(n: int) -> None:
                async with (
                    sem,
                    session.put(urls[n], data=b"%d" % n, skip_auto_headers=("Content-Type",)) as r,
                ):
                    assert r.status == 200, await r.text()

            await asyncio.gather(*(put(n) for n in numbers))
        parts = await storage.list_parts(key, upload_id)
        assert parts is not None
        assert [p.part_number for p in parts] == numbers
        assert parts[1004].size == len(b"1005")
        await storage.abort_multipart(key, upload_id)
        assert await storage.list_parts(key, upload_id) is None
    finally:
        await storage.close()
        pool.shutdown()


async def test_sizes_lists_pages_past_1000_and_odd_names(s3_env: Seaweed,
                                                         tmp_path: Path) -> None:
    """Finalize's one listing per asset (checksum-bound components), read without botocore:
    every page, names as stored, nothing outside the prefix, absent keys absent."""
    from agent.server.signing import Signer

    pool = concurrent.futures.ThreadPoolExecutor(8)
    storage = open_storage(s3_env.storage_url(s3_env.bucket), tmp_path, Signer(b"k" * 32), pool)
    await storage.start("http://unused")
    try:
        keys = [f"lst/a/k{i:04d}" for i in range(1003)] + ["lst/a/sp ace+plus/ü & <x>.bin"]
        sem = asyncio.Semaphore(16)
        async with aiohttp.ClientSession() as session:

            async def put(key: str, size: int) -> None:
                url = await storage.presign_put(key, 600)
                async with sem, session.put(url, data=b"x" * size,
                                            skip_auto_headers=("Content-Type",)) as r:
                    assert r.status == 200, await r.text()

            await asyncio.gather(*(put(k, i % 7) for i, k in enumerate(keys)),
                                 put("lst/b/k0001", 3), put("lst/a", 5))
        wanted = [*keys, "lst/b/k0001", "lst/a/missing"]
        found = await storage.sizes("lst/a/", wanted)
        assert found == {k: i % 7 for i, k in enumerate(keys)}
    finally:
        await storage.close()
        pool.shutdown()


async def test_the_bucket_is_created_and_reused(s3_env: Seaweed, tmp_path: Path) -> None:
    url = s3_env.storage_url("t-created-here")
    async with running_server(tmp_path / "a", storage=url) as s:
        r = await s.api.post("/v1/assets/inline", {"asset_type": "x", "content": "one"})
        assert r.status == 201
        assert (await s.api.get("/v1/health")).body["storage"].startswith("s3://t-created-here")
    async with running_server(tmp_path / "a", storage=url) as s:
        got = await s.api.get(f"/v1/assets/{r.body['asset_id']}", params={"include_presigned": "1"})
        status, data, _ = await s.api.get_url(got.body["download_urls"]["content"])
        assert status == 200 and data == b"one"


async def test_big_components_keep_the_declared_digest_unverified(
    s3_env: Seaweed, tmp_path: Path
) -> None:
    """Above verify_sha256_max_bytes the server cannot see the SHA-256 of what S3 holds: it
    records the client's claim (size and part ETags are still checked)."""
    url = s3_env.storage_url(s3_env.bucket) + "&verify_sha256_max_bytes=1024"
    async with running_server(
        tmp_path / "s", storage=url, multipart_threshold_bytes=5 * MiB, part_size_bytes=5 * MiB
    ) as s:
        data = os.urandom(6 * MiB)
        plan = await s.api.register([{"name": "big", "size": len(data)}, "small"])
        body = await s.api.upload(plan, {"big": data, "small": b"tiny"})
        claimed = sha256(b"not the bytes")
        body["components"]["big"]["sha256"] = claimed
        r = await s.api.finalize(plan["asset_id"], body)
        assert r.status == 200, r.body
        comps = {c["name"]: c for c in r.body["components"]}
        assert comps["big"]["sha256"] == claimed and comps["big"]["size"] == len(data)
        assert comps["small"]["sha256"] == sha256(b"tiny")  # small enough: read and hashed


async def test_presigned_put_urls_sign_no_content_type(s3_env: Seaweed, tmp_path: Path) -> None:
    async with running_server(tmp_path / "s", storage=s3_env.storage_url(s3_env.bucket)) as s:
        plan = await s.api.register(["a"])
        url = plan["upload_urls"]["a"]
        assert "X-Amz-Signature=" in url and "X-Amz-SignedHeaders=host" in url
        assert "content-type" not in url.lower()


async def test_s3_configuration_errors_stop_start_up(
    s3_env: Seaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_option = Settings(
        agent={"state_dir": tmp_path / "a"},
        server={"storage": s3_env.storage_url("b") + "&colour=blue"},
    )
    with pytest.raises(ConfigError, match="colour"):
        await start_server(bad_option, embedded=True)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    no_creds = Settings(
        agent={"state_dir": tmp_path / "b"}, server={"storage": s3_env.storage_url("b")}
    )
    with pytest.raises(ConfigError, match="credentials"):
        await start_server(no_creds, embedded=True)
    assert not (tmp_path / "b" / "server" / "endpoint.json").exists()


@pytest.mark.parametrize("storage", ["", "file:///tmp/x", "ftp://nope", "s3://"])
def test_storage_url_parsing(storage: str, tmp_path: Path) -> None:
    from agent.server.disk import DiskStorage
    from agent.server.signing import Signer

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        if storage.startswith(("ftp", "s3")):
            with pytest.raises(ConfigError, match="server.storage"):
                open_storage(storage, tmp_path, Signer(b"k" * 32), pool)
        else:
            got = open_storage(storage, tmp_path, Signer(b"k" * 32), pool)
            assert isinstance(got, DiskStorage)
            assert got.root == (Path("/tmp/x") if storage else tmp_path / "objects")
    finally:
        pool.shutdown()


def test_a_disk_backed_server_never_imports_botocore(tmp_path: Path) -> None:
    code = f"""
import asyncio, sys
from agent.config import Settings
from agent.server.runner import start_server

async def main():
    s = await start_server(Settings(agent={{"state_dir": {str(tmp_path)!r}}}), embedded=True)
    await s.stop()

asyncio.run(main())
assert "botocore" not in sys.modules, "botocore was imported"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_AGENT_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


async def test_finalize_copies_are_retried_like_botocores_calls(
    s3_env: Seaweed, tmp_path: Path
) -> None:
    """The server's own CopyObject at finalize is a presigned request over aiohttp: SlowDown
    and a reset are retried (as botocore's standard mode retries its calls), not turned
    into a failed finalize."""
    from tests.support.faultproxy import FaultProxy

    data = os.urandom(3000)
    async with FaultProxy(s3_env.endpoint) as proxy, running_server(
            tmp_path / "s", storage=f"s3://{s3_env.bucket}?endpoint={proxy.url}",
            checksum_urls=False) as s:
        plan = await s.api.register([{"name": "a.bin", "size": len(data)}])
        assert (await s.api.put_url(plan["upload_urls"]["a.bin"], data)).status == 200
        proxy.set_rules([
            {"action": "status", "code": "s3_slowdown", "method": "PUT",
             "path_regex": "/ready/", "times": 1},
            {"action": "reset_request", "method": "PUT", "path_regex": "/ready/", "times": 1},
        ])
        r = await s.api.finalize(plan["asset_id"], {"components": {
            "a.bin": {"size": len(data), "sha256": sha256(data)}}})
        assert r.status == 200, r.body
        copies = [e for e in proxy.stats()["log"]
                  if e["method"] == "PUT" and "/ready/" in e["path"]]
        assert [e["fault"] for e in copies] == ["status", "reset_request", None], copies
        got = await s.api.get(f"/v1/assets/{plan['asset_id']}", params={"include_presigned": "1"})
        assert (await s.api.get_url(got.body["download_urls"]["a.bin"]))[1] == data
