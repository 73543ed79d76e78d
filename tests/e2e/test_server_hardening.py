"""The local server's own defences (docs/security.md, "The local server's own defences"):
upload URLs that stop writing once their asset is no longer pending, limits on connections
and request bodies, strict names and types, quiet logs for malformed requests, and Range
edge cases. Real servers over loopback; S3 through SeaweedFS where marked."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from agent.server.storage import MiB
from tests.e2e.test_server import MakeServer, any_srv, make_server, srv
from tests.support.helpers_daemon import start_daemon
from tests.support.helpers_server import Api, Running, sha256

__all__ = ["any_srv", "make_server", "srv"]  # the server tests' fixtures, used by name


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
    plan, asset = await _ready(s, {"w.bin": original, "empty": b""})
    url = plan["upload_urls"]["w.bin"]
    for late in (b"X" * len(original), b"shorter"):
        r = await s.api.put_url(url, late)
        if s.server._core.storage.description.startswith("file://"):
            assert r.status == 409 and "<Code>UploadClosed</Code>" in r.body, r.body
    recorded = {c["name"]: c["sha256"] for c in asset["components"]}
    assert recorded["w.bin"] == sha256(original)
    got = await _download(s, plan["asset_id"])
    assert got["w.bin"] == (200, original) and got["empty"] == (200, b"")
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


# ---- 2. descriptor exhaustion ------------------------------------------------------------


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset: refused over the cap
        return True


FLOOD = 1500


def test_idle_connection_flood_leaves_the_daemon_responsive() -> None:
    _raise_nofile(FLOOD + 500)
    env = {
        "CHRONICLE_AGENT_SERVER__MAX_CONNECTIONS": "200",
        "CHRONICLE_AGENT_SERVER__HEADER_TIMEOUT_S": "2",
        "CHRONICLE_AGENT_SERVER__KEEPALIVE_TIMEOUT_S": "3",
    }
    with start_daemon(env) as d:
        url = json.loads((d.state_dir / "server" / "endpoint.json").read_text())["url"]
        host, port = url.removeprefix("http://").rsplit(":", 1)
        lines_before = len(d.log_text().splitlines())
        socks: list[socket.socket] = []
        try:
            start = time.monotonic()
            for _ in range(FLOOD):  # connected, and never a byte sent
                socks.append(socket.create_connection((host, int(port)), timeout=5))
            t = time.monotonic()
            health = d.client(timeout_s=5).health()
            assert time.monotonic() - t < 2.0, "the socket API was slow under the flood"
            assert health["pid"] == d.pid
            for s in socks:
                s.setblocking(False)
            open_ = socks
            while open_ and time.monotonic() - start < 15:
                time.sleep(0.25)
                open_ = [s for s in open_ if not _closed_by_peer(s)]
            assert not open_, f"{len(open_)} idle connections still open after 15 s"
            t = time.monotonic()
            d.client(timeout_s=5).health()
            assert time.monotonic() - t < 2.0
        finally:
            for s in socks:
                s.close()
        d.stop()
        new = d.log_text().splitlines()[lines_before:]
        assert len(new) < 30, "\n".join(new[:40])
        text = "\n".join(new)
        assert "Traceback" not in text and "EMFILE" not in text and "Too many open" not in text
        assert "connections refused over the cap of 200" in text
        assert "no complete request headers" in text


async def _raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def test_slow_headers_and_idle_keepalive_are_closed(make_server: MakeServer) -> None:
    s = await make_server(header_timeout_s=0.5, keepalive_timeout_s=1.0)
    # headers that never end: closed after the header timeout
    reader, writer = await _raw(s.server.url)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
    t = time.monotonic()
    assert await _closed_within(reader, 5)
    assert time.monotonic() - t < 3
    writer.close()
    # one request, then idle: closed after the keep-alive timeout, not before
    reader, writer = await _raw(s.server.url)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert not await _closed_within(reader, 0.6)  # the header timeout no longer applies
    assert await _closed_within(reader, 3)
    writer.close()


async def test_connections_past_the_cap_are_closed_at_once(make_server: MakeServer) -> None:
    s = await make_server(max_connections=3)
    held = [await _raw(s.server.url) for _ in range(3)]
    reader, writer = await _raw(s.server.url)
    assert await _closed_within(reader, 2)
    writer.close()
    r = held[0]
    r[1].write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await r[0].readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    for _, w in held:
        w.close()


# ---- 4. smaller ones ---------------------------------------------------------------------


GARBAGE = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)) + b"\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    b"NOT-HTTP AT ALL\r\n\r\n",
    b"GET /v1/health HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n",
]


async def test_malformed_requests_log_one_line_without_traceback(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    s = await make_server()
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        for junk in GARBAGE:
            reader, writer = await _raw(s.server.url)
            writer.write(junk)
            answer = await asyncio.wait_for(reader.read(4096), 5)
            assert answer == b"" or answer[9:12] == b"400", answer[:99]
            writer.close()
    assert (await s.api.get("/v1/health")).status == 200
    with_traceback = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not with_traceback, with_traceback[0].getMessage()
    assert not [r for r in caplog.records if "Error handling request" in r.getMessage()]
    lines = [r for r in caplog.records if "malformed HTTP requests" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.getMessage().startswith("UNKNOWN ")]


BAD_NAMES = [
    ("s" * 256 + "/x.bin", "path segment longer than 255 bytes"),
    ("dir/" + "é" * 128, "path segment longer than 255 bytes"),
    ("line\nbreak.bin", "control character U+000A"),
    ("tab\there", "control character U+0009"),
    ("del\x7f", "control character U+007F"),
]


async def test_unstorable_component_names_are_refused_at_registration(any_srv: Running) -> None:
    api = any_srv.api
    for name, rule in BAD_NAMES:
        r = await api.post("/v1/assets", {"asset_type": "x", "components": [name]})
        assert r.status == 400 and r.code == "invalid_request", (name, r.body)
        assert repr(name)[:60] in r.body["error"]["message"] and rule in r.body["error"]["message"]
    for names in (["a", "a/b"], ["d/e/f", "d/e"], ["x/y", {"name": "x", "size": 1}]):
        r = await api.post("/v1/assets", {"asset_type": "x", "components": names})
        assert r.status == 400 and r.code == "invalid_request", (names, r.body)
        assert "both a file and a directory" in r.body["error"]["message"]
    ok = ["s" * 255 + "/x.bin", "a/b", "a/c", "ab", "a.b/c", "ünï/cödé.bin"]
    plan = await api.register([{"name": n, "size": 2} for n in ok])
    body = await api.upload(plan, {n: b"ok" for n in ok})
    r = await api.finalize(plan["asset_id"], body)
    assert r.status == 200 and r.body["state"] == "ready", r.body
    r = await api.post(f"/v1/assets/{plan['asset_id']}/upload-urls", {"components": ["a\nb"]})
    assert r.status == 400 and "U+000A" in r.body["error"]["message"]


async def test_asset_type_is_bounded(srv: Running) -> None:
    for path, extra in (("/v1/assets", {"components": ["c"]}), ("/v1/assets/inline",
                                                                  {"content": "t"})):
        r = await srv.api.post(path, {"asset_type": "t" * 129, **extra})
        assert r.status == 400 and "asset_type" in r.body["error"]["message"], r.body
        r = await srv.api.post(path, {"asset_type": "t" * 512 * 1024, **extra})
        assert r.status == 400, r.status
        r = await srv.api.post(path, {"asset_type": "bad\ntype", **extra})
        assert r.status == 400 and "asset_type" in r.body["error"]["message"], r.body
        r = await srv.api.post(path, {"asset_type": "t" * 128, **extra})
        assert r.status == 201, r.body


async def test_no_error_reveals_the_stores_path(srv: Running) -> None:
    api = srv.api
    root = srv.server.state_dir
    single = await api.register([{"name": "s.bin", "size": 3}])
    multi = await api.register([{"name": "m.bin", "size": 6 * MiB}])
    body_m = await api.upload(multi, {"m.bin": b"m" * (6 * MiB)})
    assert (await api.put_url(single["upload_urls"]["s.bin"], b"abc")).status == 200
    tmp = root / "objects" / "tmp"
    tmp.rmdir()
    tmp.write_text("in the way")  # every write of the store now fails
    try:
        answers = [
            await api.put_url(single["upload_urls"]["s.bin"], b"xyz"),
            await api.finalize(single["asset_id"], {}),
            await api.finalize(multi["asset_id"], body_m),
            await api.post("/v1/assets/inline", {"asset_type": "x", "content": "t"}),
            await api.get("/v1/health"),
        ]
    finally:
        tmp.unlink()
        tmp.mkdir()
    assert [a.status for a in answers][:4] == [500, 500, 500, 500], answers
    for a in answers:
        text = json.dumps(a.body) + " ".join(a.headers.values())
        assert str(root) not in text and "/objects" not in text, text


async def test_unsatisfiable_ranges_answer_416(srv: Running) -> None:
    data = b"0123456789"
    plan, _ = await _ready(srv, {"r": data})
    r = await srv.api.get(f"/v1/assets/{plan['asset_id']}", params={"include_presigned": "1"})
    url = r.body["download_urls"]["r"]
    for value in ("bytes=-0", "bytes=-000", "bytes=5-2", "bytes=10-", "bytes=20-30"):
        status, _, headers = await srv.api.get_url(url, {"Range": value})
        assert status == 416 and headers["Content-Range"] == "bytes */10", (value, status)
    for value, want in (("bytes=-3", b"789"), ("bytes=2-4", b"234"), ("bytes=8-100", b"89")):
        status, got, _ = await srv.api.get_url(url, {"Range": value})
        assert (status, got) == (206, want), value


# ---- 3. memory: JSON bodies in flight ----------------------------------------------------


def _padded_register(size: int) -> bytes:
    head, tail = b'{"asset_type": "x", "components": ["c"], "pad": "', b'"}'
    return head + b"p" * (size - len(head) - len(tail)) + tail


def _post_head(token: str, length: int) -> bytes:
    return (
        f"POST /v1/assets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def _status(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return int(head.split(b" ", 2)[1]), head


async def test_json_bodies_in_flight_share_a_byte_budget(make_server: MakeServer) -> None:
    s = await make_server(json_body_budget_bytes=4 * MiB)
    first = _padded_register(3 * MiB)
    r1, w1 = await _raw(s.server.url)
    w1.write(_post_head(s.token, len(first)) + first[: MiB])  # 3 MiB held, 1 MiB sent
    await w1.drain()
    await asyncio.sleep(0.2)
    second = _padded_register(2 * MiB)
    r2, w2 = await _raw(s.server.url)
    w2.write(_post_head(s.token, len(second)))
    status, head = await _status(r2)
    assert status == 503 and b"Retry-After: 1" in head, head
    w2.close()
    r3, w3 = await _raw(s.server.url)  # one that could never fit
    w3.write(_post_head(s.token, 5 * MiB))
    assert (await _status(r3))[0] == 413
    w3.close()
    w1.write(first[MiB:])  # the first completes, and frees its share
    assert (await _status(r1))[0] == 201
    w1.close()
    r2, w2 = await _raw(s.server.url)
    w2.write(_post_head(s.token, len(second)) + second)
    assert (await _status(r2))[0] == 201
    w2.close()
    assert s.server._core.bodies.used == 0


PUT_BYTES = 96 * MiB
PUTS = 4


def test_concurrent_put_bodies_are_streamed_not_buffered() -> None:
    """4 x 96 MiB single PUTs at once to a daemon's embedded server: its RSS grows by far less
    than one body (whole bodies in memory would add 384 MiB)."""
    env = {"CHRONICLE_AGENT_SERVER__MULTIPART_THRESHOLD_BYTES": str(256 * MiB)}
    with start_daemon(env) as d:
        endpoint = json.loads((d.state_dir / "server" / "endpoint.json").read_text())
        tokens = json.loads(Path(endpoint["tokens_file"]).read_text())["tokens"]
        token = next(iter(tokens))
        proc = psutil.Process(d.pid)

        async def main() -> tuple[int, int]:
            async with aiohttp.ClientSession() as session:
                api = Api(session, endpoint["url"], token)
                names = [f"b{i}" for i in range(PUTS)]
                plan = await api.register([{"name": n, "size": PUT_BYTES} for n in names])
                base = proc.memory_info().rss
                peak = base
                done = asyncio.Event()

                async def sample() -> None:
                    nonlocal peak
                    while not done.is_set():
                        peak = max(peak, proc.memory_info().rss)
                        await asyncio.sleep(0.02)

                async def body() -> AsyncIterator[bytes]:
                    chunk = b"\xab" * MiB
                    for _ in range(PUT_BYTES // MiB):
                        yield chunk

                async def put(name: str) -> None:
                    headers = {"Content-Length": str(PUT_BYTES)}
                    async with session.put(
                        plan["upload_urls"][name], data=body(), headers=headers,
                        skip_auto_headers=("Content-Type",),
                    ) as r:
                        assert r.status == 200, await r.text()

                sampler = asyncio.create_task(sample())
                await asyncio.gather(*(put(n) for n in names))
                done.set()
                await sampler
                return base, peak

        base, peak = asyncio.run(main())
        assert peak - base < 160 * MiB, f"RSS grew by {(peak - base) / MiB:.0f} MiB"


async def test_bodiless_calls_take_nothing_from_the_budget(make_server: MakeServer) -> None:
    s = await make_server(json_body_budget_bytes=MiB)
    plans = [await s.api.register(["c"]) for _ in range(8)]
    for p in plans:  # no Content-Length, no body
        reader, writer = await _raw(s.server.url)
        writer.write(
            f"DELETE /v1/assets/{p['asset_id']} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {s.token}\r\n\r\n".encode()
        )
        assert (await _status(reader))[0] == 204
        writer.close()
    r1, w1 = await _raw(s.server.url)  # a chunked body reserves the largest body allowed
    w1.write(
        f"POST /v1/assets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {s.token}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    assert (await _status(r1))[0] == 413
    w1.close()
