"""The local server's own defences (docs/security.md, "The local server's own defences"):
upload URLs that stop writing once their asset is no longer pending, limits on connections
and request bodies, strict names and types, quiet logs for malformed requests, and Range
edge cases. Real servers over loopback; S3 through SeaweedFS where marked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from agent.server.storage import MiB
from tests.helpers_server import Running, running_server, sha256

SMALL_PARTS = {"multipart_threshold_bytes": 5 * MiB, "part_size_bytes": 5 * MiB}

MakeServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[MakeServer]:
    async with AsyncExitStack() as stack:
        n = 0

        async def make(**server: Any) -> Running:
            nonlocal n
            n += 1
            return await stack.enter_async_context(running_server(tmp_path / f"state{n}", **server))

        yield make


@pytest.fixture
async def srv(make_server: MakeServer) -> Running:
    return await make_server(**SMALL_PARTS)


@pytest.fixture
async def any_srv(make_server: MakeServer, storage_backend: str) -> Running:
    return await make_server(storage=storage_backend, **SMALL_PARTS)


async def _ready(s: Running, files: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Register, upload and finalize ``files``; (the registration's plan, the ready asset)."""
    plan = await s.api.register([{"name": n, "size": len(d)} for n, d in files.items()])
    body = await s.api.upload(plan, files)
    r = await s.api.finalize(plan["asset_id"], body)
    assert r.status == 200 and r.body["state"] == "ready", r.body
    return plan, r.body


async def _download(s: Running, asset_id: str) -> dict[str, tuple[int, bytes]]:
    r = await s.api.get(f"/v1/assets/{asset_id}", params={"include_presigned": "true"})
    assert r.status == 200, r.body
    out = {}
    for name, url in r.body["download_urls"].items():
        status, data, _ = await s.api.get_url(url)
        out[name] = (status, data)
    return out


# ---- 1. upload URLs outlive their purpose ---------------------------------------------------


async def test_late_single_put_cannot_change_a_ready_asset(any_srv: Running) -> None:
    s = any_srv
    original = b"the bytes that were finalized" * 100
    plan, asset = await _ready(s, {"w.bin": original})
    url = plan["upload_urls"]["w.bin"]
    for late in (b"X" * len(original), b"shorter"):
        r = await s.api.put_url(url, late)
        if s.server._core.storage.description.startswith("file://"):
            assert r.status == 409 and "<Code>UploadClosed</Code>" in r.body, r.body
    recorded = {c["name"]: c["sha256"] for c in asset["components"]}
    assert recorded["w.bin"] == sha256(original)
    got = await _download(s, plan["asset_id"])
    assert got["w.bin"] == (200, original)
    assert sha256(got["w.bin"][1]) == recorded["w.bin"]


async def test_late_part_put_after_finalize_fails(any_srv: Running) -> None:
    s = any_srv
    data = bytes(range(256)) * (6 * MiB // 256)
    plan, asset = await _ready(s, {"big": data})
    part1 = plan["multipart"]["big"]["parts"][0]["url"]
    r = await s.api.put_url(part1, b"Y" * (5 * MiB))
    assert r.status == 404 and "NoSuchUpload" in r.body, r.body  # the upload id is gone
    got = await _download(s, plan["asset_id"])
    assert got["big"] == (200, data)
    assert asset["components"][0]["sha256"] == sha256(data)


async def test_late_put_after_delete_does_not_bring_bytes_back(any_srv: Running) -> None:
    s = any_srv
    plan, _ = await _ready(s, {"d.bin": b"soon deleted"})
    aid = plan["asset_id"]
    r = await s.api.get(f"/v1/assets/{aid}", params={"include_presigned": "true"})
    get_url = r.body["download_urls"]["d.bin"]
    assert (await s.api.call("DELETE", f"/v1/assets/{aid}")).status == 204
    late = await s.api.put_url(plan["upload_urls"]["d.bin"], b"resurrected!")
    if s.server._core.storage.description.startswith("file://"):
        assert late.status == 409, late.body
    status, body, _ = await s.api.get_url(get_url)
    assert status == 404, body


async def test_disk_put_refused_once_abandoned_or_deleted_while_pending(srv: Running) -> None:
    for end in ("abandon", "delete"):
        plan = await srv.api.register([{"name": "p.bin", "size": 4}])
        aid = plan["asset_id"]
        if end == "abandon":
            r = await srv.api.post(f"/v1/assets/{aid}/abandon", {"reason": "test"})
            assert r.status == 200
        else:
            assert (await srv.api.call("DELETE", f"/v1/assets/{aid}")).status == 204
        r = await srv.api.put_url(plan["upload_urls"]["p.bin"], b"late")
        assert r.status == 409 and "UploadClosed" in r.body, (end, r.body)
    # while pending, the same kind of URL still writes
    plan = await srv.api.register([{"name": "p.bin", "size": 4}])
    assert (await srv.api.put_url(plan["upload_urls"]["p.bin"], b"okay")).status == 200
