"""The disk store's multipart uploads: parts written in place in the object being assembled,
completed by a rename after one hash pass."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

from agent.server.storage import MiB
from tests.support.helpers_server import Running, running_server, sha256

SMALL_PARTS = {"multipart_threshold_bytes": 5 * MiB, "part_size_bytes": 5 * MiB}
PART = 5 * MiB


def _slice(data: bytes, n: int) -> bytes:
    return data[(n - 1) * PART : n * PART]


async def _put_parts(srv: Running, plan: dict, name: str, data: bytes, numbers: list[int]) -> None:
    urls = {p["part_number"]: p["url"] for p in plan["multipart"][name]["parts"]}
    for n in numbers:
        r = await srv.api.put_url(urls[n], _slice(data, n))
        assert r.status == 200, r.body


async def _stalled_put(
    url: str, length: int, sent: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A part PUT that announces ``length`` bytes, sends ``sent`` and then nothing."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    head = (
        f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    writer.write(head.encode() + sent)
    await writer.drain()
    return reader, writer


async def _parts_listed(srv: Running, asset_id: str, name: str) -> list[int]:
    r = await srv.api.get(f"/v1/assets/{asset_id}/uploads")
    return [p["part_number"] for p in r.body["components"][name]["parts"]]


async def test_a_cut_short_resend_unmarks_the_part_and_a_restart_accepts_the_rest(
    tmp_path: Path,
) -> None:
    data = os.urandom(2 * PART + 123)
    async with running_server(tmp_path / "state", **SMALL_PARTS) as srv:
        plan = await srv.api.register([{"name": "big", "size": len(data)}])
        asset_id = plan["asset_id"]
        await _put_parts(srv, plan, "big", data, [1, 2, 3])
        urls = {p["part_number"]: p["url"] for p in plan["multipart"]["big"]["parts"]}
        # part 2 sent again, cut short: its range changed, so it is no longer stored whole
        _, writer = await _stalled_put(urls[2], PART, b"x" * MiB)
        for _ in range(200):
            if await _parts_listed(srv, asset_id, "big") == [1, 3]:
                break
            await asyncio.sleep(0.02)
        assert await _parts_listed(srv, asset_id, "big") == [1, 3]
        writer.close()
        r = await srv.api.finalize(asset_id, {"components": {"big": {"size": len(data)}}})
        assert (r.status, r.code) == (409, "components_missing"), r.body
        assert "part 2 " in r.body["error"]["message"]
    async with running_server(tmp_path / "state", **SMALL_PARTS) as srv:
        assert await _parts_listed(srv, asset_id, "big") == [1, 3]
        r = await srv.api.post(
            f"/v1/assets/{asset_id}/upload-urls", {"components": ["big"], "parts": {"big": [2]}}
        )
        assert r.status == 200, r.body
        await _put_parts(srv, r.body, "big", data, [2])
        r = await srv.api.finalize(
            asset_id, {"components": {"big": {"size": len(data), "sha256": sha256(data)}}}
        )
        assert r.status == 200, r.body
        assert r.body["components"][0]["sha256"] == sha256(data)
        r = await srv.api.get(f"/v1/assets/{asset_id}", params={"include_presigned": "1"})
        url = r.body["download_urls"]["big"]
        status, got, _ = await srv.api.get_url(url)
        assert status == 200 and got == data
        middle = {"Range": f"bytes={PART - 5}-{PART + 4}"}
        status, got, _ = await srv.api.get_url(url, headers=middle)
        assert status == 206 and got == data[PART - 5 : PART + 5]
        leftovers = list((srv.server.state_dir / "objects" / "multipart").iterdir())
        assert leftovers == []


async def test_a_newer_put_of_a_part_takes_over_from_a_stalled_one(tmp_path: Path) -> None:
    data = os.urandom(PART + 7)
    async with running_server(tmp_path / "state", **SMALL_PARTS) as srv:
        plan = await srv.api.register([{"name": "big", "size": len(data)}])
        urls = {p["part_number"]: p["url"] for p in plan["multipart"]["big"]["parts"]}
        reader, writer = await _stalled_put(urls[1], PART, b"y" * (PART // 2))
        await asyncio.sleep(0.2)
        r = await asyncio.wait_for(srv.api.put_url(urls[1], _slice(data, 1)), 10)
        assert r.status == 200, r.body
        writer.write(b"y" * (PART - PART // 2))  # the older one finishes: it may not mark
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(4096), 10)
        assert b" 409 " in reply.split(b"\r\n")[0] and b"OperationAborted" in reply
        writer.close()
        await _put_parts(srv, plan, "big", data, [2])
        r = await srv.api.finalize(
            plan["asset_id"], {"components": {"big": {"size": len(data), "sha256": sha256(data)}}}
        )
        assert r.status == 200, r.body


async def test_a_part_over_the_planned_size_is_refused(tmp_path: Path) -> None:
    async with running_server(tmp_path / "state", **SMALL_PARTS) as srv:
        plan = await srv.api.register([{"name": "big", "size": 2 * PART}])
        url = plan["multipart"]["big"]["parts"][0]["url"]
        r = await srv.api.put_url(url, b"z" * (PART + 1))
        assert r.status == 400 and "<Code>EntityTooLarge</Code>" in r.body


async def test_parts_with_a_gap_or_off_plan_sizes_are_not_assembled(tmp_path: Path) -> None:
    data = os.urandom(3 * PART)
    async with running_server(tmp_path / "state", **SMALL_PARTS) as srv:
        plan = await srv.api.register([{"name": "big", "size": len(data)}])
        body = await srv.api.upload(plan, {"big": data})
        parts = body["components"]["big"]["parts"]
        gap = {"size": 2 * PART, "parts": [parts[0], parts[2]]}
        r = await srv.api.finalize(plan["asset_id"], {"components": {"big": gap}})
        assert (r.status, r.code) == (422, "checksum_mismatch"), r.body
        urls = {p["part_number"]: p["url"] for p in plan["multipart"]["big"]["parts"]}
        r = await srv.api.put_url(urls[2], _slice(data, 2)[:-1])  # short, and not the last
        assert r.status == 200
        r = await srv.api.finalize(plan["asset_id"], {"components": {"big": {"size": len(data)}}})
        assert (r.status, r.code) == (422, "checksum_mismatch"), r.body
        await _put_parts(srv, plan, "big", data, [2])
        r = await srv.api.finalize(plan["asset_id"], {})
        assert r.status == 200, r.body
        assert r.body["components"][0]["sha256"] == sha256(data)


async def test_a_put_in_flight_cannot_write_into_the_completed_object(tmp_path: Path) -> None:
    data = os.urandom(2 * PART + 7)
    async with running_server(tmp_path / "state", **SMALL_PARTS) as srv:
        plan = await srv.api.register([{"name": "big", "size": len(data)}])
        body = await srv.api.upload(plan, {"big": data})
        first = body["components"]["big"]["parts"][:1]
        urls = {p["part_number"]: p["url"] for p in plan["multipart"]["big"]["parts"]}
        reader, writer = await _stalled_put(urls[3], 7, b"")
        await asyncio.sleep(0.2)
        # finalized as one part: part 3's PUT is still being received
        r = await srv.api.finalize(
            plan["asset_id"], {"components": {"big": {"size": PART, "parts": first}}}
        )
        assert r.status == 200, r.body
        writer.write(b"q" * 7)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(4096), 10)
        assert b" 404 " in reply.split(b"\r\n")[0] and b"NoSuchUpload" in reply
        writer.close()
        r = await srv.api.get(f"/v1/assets/{plan['asset_id']}", params={"include_presigned": "1"})
        status, got, _ = await srv.api.get_url(r.body["download_urls"]["big"])
        assert status == 200 and got == data[:PART]
