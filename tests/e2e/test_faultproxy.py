"""tests/support/faultproxy.py, exercised with real sockets: a real upstream, a real proxy process,
real clients (aiohttp and raw sockets)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.faultproxy import FaultProxy, main, parse_rules

MiB = 1 << 20


class Upstream:
    """A tiny object store: PUT stores the body, GET serves it (with Range)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.seen: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            {
                "method": request.method,
                "path_qs": request.path_qs,
                "host": request.headers.get("Host"),
                "content_length": request.headers.get("Content-Length"),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
            }
        )
        if request.method == "PUT":
            data = await request.read()
            self.objects[request.path] = data
            return web.Response(status=200, headers={"ETag": f'"{len(data)}"'})
        obj = self.objects.get(request.path)
        if obj is None:
            return web.Response(status=404, text="no such key")
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
        if match is None:
            return web.Response(body=obj)
        start, end = int(match[1]), min(int(match[2]), len(obj) - 1)
        return web.Response(
            status=206,
            body=obj[start : end + 1],
            headers={"Content-Range": f"bytes {start}-{end}/{len(obj)}"},
        )


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", up.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield up
    finally:
        await runner.cleanup()


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream.url, seed=1) as fp:
        yield fp


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        # aiohttp silently resends an idempotent request (GET, PUT, ...) once when the
        # connection drops; switch that off so a client sees each injected fault, as
        # aiohttp's own test client does.
        s._retry_connection = False
        yield s


async def put_rules(fp: FaultProxy, *rules: dict[str, Any]) -> None:
    await asyncio.to_thread(fp.set_rules, list(rules))


async def stats(fp: FaultProxy) -> dict[str, Any]:
    return await asyncio.to_thread(fp.stats)


async def store(upstream: Upstream, path: str, size: int) -> bytes:
    data = os.urandom(size)
    upstream.objects[path] = data
    return data


async def test_passthrough_put_get_50mib(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(50 * MiB)
    url = f"{proxy.url}/bucket/big?X-Amz-Signature=secret123&X-Amz-Expires=60"
    async with session.put(url, data=io.BytesIO(data)) as resp:
        assert resp.status == 200
        assert resp.headers["ETag"] == f'"{len(data)}"'
    seen = upstream.seen[-1]
    assert seen["host"] == proxy.netloc
    assert seen["path_qs"] == "/bucket/big?X-Amz-Signature=secret123&X-Amz-Expires=60"
    assert seen["content_length"] == str(len(data))
    assert seen["transfer_encoding"] is None
    assert upstream.objects["/bucket/big"] == data

    async with session.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == data
    async with session.get(url, headers={"Range": "bytes=1000-1999"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        assert await resp.read() == data[1000:2000]

    # A Host the client chose is forwarded as is (SigV4 signs it).
    async with session.put(
        f"{proxy.url}/bucket/small", data=b"x" * 10, headers={"Host": "bucket.s3.example:9000"}
    ) as resp:
        assert resp.status == 200
    assert upstream.seen[-1]["host"] == "bucket.s3.example:9000"

    st = await stats(proxy)
    assert st["requests"] == 4
    assert st["bytes_up"] == len(data) + 10
    assert st["bytes_down"] >= len(data) + 1000
    assert [(e["method"], e["path"], e["status"]) for e in st["log"]] == [
        ("PUT", "/bucket/big", 200),
        ("GET", "/bucket/big", 200),
        ("GET", "/bucket/big", 206),
        ("PUT", "/bucket/small", 200),
    ]
    assert "secret123" not in json.dumps(st)


async def test_chunked_request_body_is_forwarded(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([i]) * 100_000

    async with session.put(f"{proxy.url}/b/chunked", data=gen()) as resp:
        assert resp.status == 200
    assert upstream.seen[-1]["transfer_encoding"] == "chunked"
    assert upstream.objects["/b/chunked"] == b"".join(bytes([i]) * 100_000 for i in range(5))


def _raw_request(port: int, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head.encode())
    return sock


def _port(fp: FaultProxy) -> int:
    return int(fp.netloc.rsplit(":", 1)[1])


async def test_reset_request_sends_rst(proxy: FaultProxy, upstream: Upstream) -> None:
    await put_rules(proxy, {"action": "reset_request", "method": "PUT", "after_bytes": 65536})

    def client() -> None:
        with _raw_request(
            _port(proxy), f"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: {4 * MiB}\r\n\r\n"
        ) as sock:
            sock.sendall(b"a" * 65536)
            with pytest.raises(ConnectionResetError):
                sock.recv(1024)

    await asyncio.to_thread(client)
    st = await stats(proxy)
    assert st["faults"] == {"reset_request": 1}
    assert st["log"][-1] == {
        "method": "PUT",
        "path": "/b/k",
        "status": None,
        "fault": "reset_request",
    }
    assert "/b/k" not in upstream.objects


async def test_reset_request_seen_by_aiohttp_then_recovers(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    await put_rules(proxy, {"action": "reset_request", "after_bytes": MiB, "forward": False})
    data = os.urandom(8 * MiB)
    with pytest.raises(aiohttp.ClientError):
        async with session.put(f"{proxy.url}/b/k", data=io.BytesIO(data)) as resp:
            await resp.read()
    # times=1: the fault is used up, the same request goes through now.
    async with session.put(f"{proxy.url}/b/k", data=io.BytesIO(data)) as resp:
        assert resp.status == 200
    assert upstream.objects["/b/k"] == data
    assert len(upstream.seen) == 1  # forward=false: the upstream never saw the first


async def test_status_presets(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    await put_rules(
        proxy,
        {"action": "status", "preset": "s3_slowdown", "method": "PUT"},
        {"action": "status", "code": "expired", "method": "GET"},
    )
    async with session.put(f"{proxy.url}/b/k", data=b"z" * MiB) as resp:
        assert resp.status == 503
        assert resp.headers["Content-Type"] == "application/xml"
        assert await resp.text() == (
            "<Error><Code>SlowDown</Code><Message>Please reduce your request rate."
            "</Message></Error>"
        )
    async with session.get(f"{proxy.url}/b/k?sig=1") as resp:
        assert resp.status == 403
        body = await resp.text()
        assert "<Code>AccessDenied</Code>" in body
        assert "<Message>Request has expired</Message>" in body
    assert upstream.seen == []
    # Both faults were used up; the same keep-alive session goes on normally.
    async with session.put(f"{proxy.url}/b/k", data=b"ok") as resp:
        assert resp.status == 200
    st = await stats(proxy)
    assert st["faults"] == {"status": 2}
    assert [e["status"] for e in st["log"]] == [503, 403, 200]


async def test_status_custom_and_early(proxy: FaultProxy, upstream: Upstream) -> None:
    await put_rules(
        proxy,
        {
            "action": "status",
            "code": 500,
            "body": "boom",
            "headers": {"Retry-After": "1"},
            "path_regex": "^/custom",
        },
        {"action": "status", "code": 400, "early": True, "path_regex": "^/early"},
    )

    def client() -> tuple[bytes, bytes]:
        with _raw_request(
            _port(proxy), "PUT /custom HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        ) as sock:
            custom = sock.recv(4096)
        # Early: the answer comes before any body byte is sent.
        with _raw_request(
            _port(proxy), f"PUT /early HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MiB}\r\n\r\n"
        ) as sock:
            early = b""
            while b"\r\n\r\n" not in early:
                early += sock.recv(4096)
        return custom, early

    custom, early = await asyncio.to_thread(client)
    assert custom.startswith(b"HTTP/1.1 500 ")
    assert b"Retry-After: 1\r\n" in custom
    assert custom.endswith(b"\r\n\r\nboom")
    assert early.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in early
    assert upstream.seen == []


async def test_stall_response_trips_client_timeout(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    await store(upstream, "/b/k", MiB)
    await put_rules(proxy, {"action": "stall_response", "after_bytes": 1000, "seconds": 5})
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        async with session.get(
            f"{proxy.url}/b/k", timeout=aiohttp.ClientTimeout(sock_read=0.5)
        ) as resp:
            assert resp.status == 200
            await resp.read()
    assert time.monotonic() - started < 3


async def test_stall_request_trips_client_timeout(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    await put_rules(proxy, {"action": "stall_request", "after_bytes": 65536, "seconds": 5})
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        async with session.put(
            f"{proxy.url}/b/k",
            data=io.BytesIO(os.urandom(16 * MiB)),
            timeout=aiohttp.ClientTimeout(total=0.7),
        ) as resp:
            await resp.read()
    assert time.monotonic() - started < 3


async def test_stall_request_then_continues(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    await put_rules(proxy, {"action": "stall_request", "after_bytes": MiB, "seconds": 0.4})
    data = os.urandom(4 * MiB)
    started = time.monotonic()
    async with session.put(f"{proxy.url}/b/k", data=io.BytesIO(data)) as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.4
    assert upstream.objects["/b/k"] == data


async def test_stall_request_then_close(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    await put_rules(
        proxy, {"action": "stall_request", "after_bytes": 1000, "seconds": 0.2, "then_close": True}
    )
    with pytest.raises(aiohttp.ClientError):
        async with session.put(f"{proxy.url}/b/k", data=io.BytesIO(os.urandom(MiB))) as resp:
            await resp.read()


async def test_truncate_response(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    data = await store(upstream, "/b/k", MiB)
    await put_rules(proxy, {"action": "truncate_response", "after_bytes": 1000})
    async with session.get(f"{proxy.url}/b/k") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(MiB)
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
    assert received == data[:1000]


async def test_truncate_response_with_reset(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    await store(upstream, "/b/k", MiB)
    await put_rules(proxy, {"action": "truncate_response", "after_bytes": 1000, "reset": True})
    with pytest.raises(aiohttp.ClientError):
        async with session.get(f"{proxy.url}/b/k") as resp:
            await resp.read()


async def test_corrupt_response_flips_one_bit(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    data = await store(upstream, "/b/k", 3 * MiB)
    offset = MiB + 12345
    await put_rules(proxy, {"action": "corrupt_response", "offset": offset, "times": 2})
    async with session.get(f"{proxy.url}/b/k") as resp:
        got = await resp.read()
    assert len(got) == len(data)
    assert [i for i in range(len(data)) if got[i] != data[i]] == [offset]
    assert got[offset] ^ data[offset] == 0x01

    # The offset is relative to the body this response carries (here a range).
    async with session.get(f"{proxy.url}/b/k", headers={"Range": f"bytes={MiB}-{4 * MiB}"}) as r:
        part = await r.read()
    expected = data[MiB:]
    assert len(part) == len(expected)
    assert [i for i in range(len(part)) if part[i] != expected[i]] == [offset]


async def test_corrupt_request_flips_one_bit_on_its_way_up(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(3 * MiB)
    offset = 2 * MiB + 7
    await put_rules(proxy, {"action": "corrupt_request", "method": "PUT", "offset": offset,
                            "times": 1})
    async with session.put(f"{proxy.url}/b/k", data=io.BytesIO(data)) as resp:
        assert resp.status == 200
    got = upstream.objects["/b/k"]
    assert [i for i in range(len(data)) if got[i] != data[i]] == [offset]
    async with session.put(f"{proxy.url}/b/k", data=io.BytesIO(data)) as resp:  # once only
        assert resp.status == 200
    assert upstream.objects["/b/k"] == data


async def test_truncate_response_drop_head_loses_the_answer_only(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    await put_rules(proxy, {"action": "truncate_response", "method": "PUT", "drop_head": True,
                            "times": 1})
    with pytest.raises(aiohttp.ClientError):
        async with session.put(f"{proxy.url}/b/lost", data=b"abc") as resp:
            await resp.read()
    assert upstream.objects["/b/lost"] == b"abc"  # the upstream did the work


async def test_delay(proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession) -> None:
    await put_rules(proxy, {"action": "delay", "seconds": 0.3})
    started = time.monotonic()
    async with session.put(f"{proxy.url}/b/k", data=b"abc") as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.3


async def test_after_times_and_matching(
    proxy: FaultProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    await store(upstream, "/a/x", 10)
    await put_rules(
        proxy,
        {
            "action": "status",
            "code": 500,
            "method": "GET",
            "path_regex": r"^/a/.*\?part=",
            "after": 2,
            "times": 2,
        },
        {"action": "status", "code": 404, "method": "PUT", "times": -1},
    )
    statuses = []
    for _ in range(6):
        async with session.get(f"{proxy.url}/a/x?part=1") as resp:
            statuses.append(resp.status)
    assert statuses == [200, 200, 500, 500, 200, 200]
    async with session.get(f"{proxy.url}/a/x") as resp:  # path_regex does not match
        assert resp.status == 200
    for _ in range(3):
        async with session.put(f"{proxy.url}/a/y", data=b"1") as resp:
            assert resp.status == 404

    st = await stats(proxy)
    assert st["requests"] == 10
    assert st["faults"] == {"status": 5}
    assert [(r["matched"], r["fired"]) for r in st["by_rule"]] == [(6, 2), (3, 3)]
    assert [e["status"] for e in st["log"]] == [200, 200, 500, 500, 200, 200, 200, 404, 404, 404]

    await asyncio.to_thread(proxy.reset_stats)
    st = await stats(proxy)
    assert (st["requests"], st["faults"], st["log"], st["bytes_up"]) == (0, {}, [], 0)


async def test_probability_is_seeded(upstream: Upstream) -> None:
    rules = [{"action": "status", "code": 503, "probability": 0.5}]

    async def run() -> list[int]:
        async with (
            FaultProxy(upstream.url, rules=rules, seed=7) as fp,
            aiohttp.ClientSession() as s,
        ):
            out = []
            for _ in range(20):
                async with s.get(f"{fp.url}/missing") as resp:
                    out.append(resp.status)
            return out

    first, second = await run(), await run()
    assert first == second
    assert set(first) == {503, 404}


async def test_control_api(proxy: FaultProxy) -> None:
    await asyncio.to_thread(proxy.add_rule, {"action": "delay", "seconds": 0})
    await asyncio.to_thread(proxy.add_rule, {"action": "corrupt_response", "offset": 3})
    assert [r["action"] for r in await asyncio.to_thread(proxy.rules)] == [
        "delay",
        "corrupt_response",
    ]
    with pytest.raises(ValueError, match="unknown action"):
        await asyncio.to_thread(proxy.set_rules, [{"action": "explode"}])
    with pytest.raises(ValueError, match="unknown keys"):
        await asyncio.to_thread(proxy.set_rules, [{"action": "delay", "secs": 1}])
    assert len(await asyncio.to_thread(proxy.rules)) == 2  # a bad PUT changes nothing
    await asyncio.to_thread(proxy.clear)
    assert await asyncio.to_thread(proxy.rules) == []


def test_rule_validation() -> None:
    assert parse_rules({"rules": [{"action": "status", "preset": "expired"}]})[0].code == 403
    assert parse_rules([{"action": "status", "code": 404}])[0].body == b""
    for bad in (
        {"action": "status"},
        {"action": "status", "code": 99},
        {"action": "status", "preset": "nope"},
        {"action": "delay", "seconds": -1},
        {"action": "reset_request", "after_bytes": "10"},
        {"action": "reset_request", "after_bytes": True},
        {"action": "delay", "path_regex": "("},
        {"action": "delay", "times": -2},
        {"action": "delay", "probability": 2},
    ):
        with pytest.raises(ValueError):
            parse_rules([bad])


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--upstream", "http://127.0.0.1:1", "--rules", '[{"action": "x"}]']) == 2
    assert "unknown action" in capsys.readouterr().err
    assert main(["--upstream", "https://127.0.0.1:1"]) == 2
    assert main(["--upstream", "http://127.0.0.1:1", "--listen", "nope"]) == 2


def test_sync_helper_with_initial_rules_and_stop(upstream_sync: str) -> None:
    import urllib.error
    import urllib.request

    rules = [{"action": "status", "preset": "s3_slowdown"}]
    with FaultProxy(upstream_sync, rules=rules) as fp:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{fp.url}/x", timeout=5)
        with info.value as err:
            assert err.code == 503
            assert b"SlowDown" in err.read()
        proc = fp._proc
        assert proc is not None
    assert proc.returncode is not None


@pytest.fixture
def upstream_sync() -> str:
    """An address nobody needs to answer on: status rules never reach the upstream."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
