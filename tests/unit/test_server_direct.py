"""Large PUT bodies read straight from the socket by the thread that writes them (less of
the local server's CPU per byte): stored whole however the client paces them, answered
with ``Connection: close``; cut short, superseded or stalled, they leave nothing behind.
Smaller bodies keep their keep-alive connection."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

from agent.server.disk import DIRECT_MIN_BYTES, POLL_S
from agent.server.storage import MiB
from tests.support.helpers_server import Running, running_server, sha256

BIG = DIRECT_MIN_BYTES + 3 * MiB + 17


async def _open_put(
    url: str, length: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(
        f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
    )
    return reader, writer


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status = int((await reader.readline()).split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _download(srv: Running, asset_id: str, name: str) -> bytes:
    r = await srv.api.get(f"/v1/assets/{asset_id}", params={"include_presigned": "true"})
    assert r.status == 200, r.body
    status, data, _ = await srv.api.get_url(r.body["download_urls"][name])
    assert status == 200
    return data


def _leftovers(state: Path) -> list[Path]:
    return [p for p in state.rglob("*") if p.is_file() and p.parent.name == "tmp"]


async def test_a_large_body_sent_in_bursts_is_stored_whole_then_the_connection_closes(
    tmp_path: Path,
) -> None:
    data = os.urandom(BIG)
    async with running_server(tmp_path / "state") as srv:
        plan = await srv.api.register(["model.bin"])
        reader, writer = await _open_put(plan["upload_urls"]["model.bin"], len(data))
        # bursts with pauses longer than the reader's poll: it waits for more, it does
        # not give up; the first burst is partly buffered by aiohttp before the take-over
        cuts = [0, 300_000, 5 * MiB, 9 * MiB, len(data)]
        for a, b in zip(cuts, cuts[1:], strict=False):
            writer.write(data[a:b])
            await writer.drain()
            await asyncio.sleep(POLL_S * 2.5)
        status, headers, _ = await _answer(reader)
        assert status == 200
        assert headers["etag"].strip('"') == sha256(data)[:32]
        assert headers["connection"] == "close"
        assert await reader.read() == b""  # the server hung up
        writer.close()
        r = await srv.api.finalize(
            plan["asset_id"],
            {"components": {"model.bin": {"size": len(data), "sha256": sha256(data)}}},
        )
        assert r.status == 200, r.body
        assert await _download(srv, plan["asset_id"], "model.bin") == data


async def test_a_small_body_keeps_its_connection(tmp_path: Path) -> None:
    small = os.urandom(DIRECT_MIN_BYTES - 1)
    async with running_server(tmp_path / "state") as srv:
        plan = await srv.api.register(["a.bin", "b.bin"])
        reader, writer = await _open_put(plan["upload_urls"]["a.bin"], len(small))
        writer.write(small)
        status, headers, _ = await _answer(reader)
        assert (status, headers.get("connection", "keep-alive")) == (200, "keep-alive")
        u = urlsplit(plan["upload_urls"]["b.bin"])  # the same connection, again
        writer.write(
            f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Content-Length: 3\r\n\r\nabc".encode()
        )
        status, headers, _ = await _answer(reader)
        assert (status, headers["etag"].strip('"')) == (200, sha256(b"abc")[:32])
        writer.close()


async def test_a_large_body_cut_short_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    data = os.urandom(BIG)
    async with running_server(tmp_path / "state") as srv:
        plan = await srv.api.register(["model.bin"])
        _, writer = await _open_put(plan["upload_urls"]["model.bin"], len(data))
        writer.write(data[: DIRECT_MIN_BYTES + MiB])
        await writer.drain()
        await asyncio.sleep(POLL_S * 2)
        writer.close()  # the client dies mid-body
        for _ in range(100):
            if not _leftovers(tmp_path / "state"):
                break
            await asyncio.sleep(0.05)
        assert _leftovers(tmp_path / "state") == []
        r = await srv.api.finalize(
            plan["asset_id"], {"components": {"model.bin": {"size": len(data)}}}
        )
        assert r.status == 409, r.body
        # the same URL, sent again whole on a new connection, is stored
        r = await srv.api.put_url(plan["upload_urls"]["model.bin"], data)
        assert r.status == 200, r.body


async def test_a_stalled_part_is_superseded_by_a_newer_put_of_it(tmp_path: Path) -> None:
    part = DIRECT_MIN_BYTES + MiB
    data = os.urandom(2 * part - 5)
    async with running_server(
        tmp_path / "state", multipart_threshold_bytes=part, part_size_bytes=part
    ) as srv:
        plan = await srv.api.register([{"name": "big", "size": len(data)}])
        urls = {p["part_number"]: p["url"] for p in plan["multipart"]["big"]["parts"]}
        reader, writer = await _open_put(urls[1], part)
        writer.write(os.urandom(2 * MiB))  # wrong bytes, then a stall
        await writer.drain()
        await asyncio.sleep(POLL_S * 2)
        for n in (1, 2):  # the retry, on its own connection
            r = await srv.api.put_url(urls[n], data[(n - 1) * part : n * part])
            assert r.status == 200, r.body
        status, headers, body = await asyncio.wait_for(_answer(reader), POLL_S * 10)
        assert status == 409 and b"OperationAborted" in body, body
        assert headers["connection"] == "close"
        writer.close()
        r = await srv.api.finalize(
            plan["asset_id"],
            {"components": {"big": {"size": len(data), "sha256": sha256(data)}}},
        )
        assert r.status == 200, r.body
        assert await _download(srv, plan["asset_id"], "big") == data
