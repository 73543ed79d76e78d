"""The direct GET and small-PUT paths (agent.transfer.rawget): HTTP(S) bodies read by worker
threads straight from the socket, small bodies sent and answered in one thread call.

Against a real aiohttp server on loopback, over HTTP and over TLS (a self-signed
certificate made by openssl; a pool that does not trust it refuses it): keep-alive
connections are reused, one the server closed while idle is replaced without an error, a
chunked answer is handed back untouched (``NotDirect``), an error answer stops at its head
and its body says why, a body cut short names how far it got, a 206 carries exactly the
range asked for, an oversized head is refused. Through a real daemon: a storage whose
answers come chunked (a fault proxy that re-frames them) still downloads byte-exact, over
aiohttp; ``download.range_streams`` bounds the ranges in flight (counted at the proxy).
PUTs: the exact body arrives, on a kept-alive connection that is replaced once the server
closed it; an error answer comes with its body; a server that does not answer is a stall
after ``stall_s``; a set ``stop`` ends the wait; an answer sent chunked still gives its
status. (Through the daemon, every small-file upload test takes this path.)"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from agent.errors import PeerClosed, RetryableError, Stalled
from agent.transfer import rawget
from tests.e2e.test_download import download, gets, upload
from tests.support.helpers_e2e import MiB, assert_same_tree, proxied_daemon

BLOB = os.urandom(3 * MiB + 17)


class Site:
    """An aiohttp server in its own thread; remembers each request's client port."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.ports: list[int] = []
        self.bodies: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.url = ""
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/blob", self.blob)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/forbidden", self.forbidden)
        app.router.add_get("/cut", self.cut)
        app.router.add_get("/big-head", self.big_head)
        app.router.add_put("/put", self.put)
        app.router.add_put("/put-expired", self.forbidden)
        app.router.add_put("/put-silent", self.silent)
        app.router.add_put("/put-chunked", self.chunked)
        self.runner = web.AppRunner(app, keepalive_timeout=0.3)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.tls)
        self.loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        ready.set()
        self.loop.run_forever()

    def _seen(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.ports.append(peer[1] if peer else -1)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        rng = request.http_range
        if rng.start is not None:
            part = BLOB[rng]
            return web.Response(status=206, body=part, headers={
                "Content-Range": f"bytes {rng.start}-{rng.start + len(part) - 1}/{len(BLOB)}"})
        return web.Response(body=BLOB)

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        await resp.write_eof()
        return resp

    async def forbidden(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=403, content_type="application/xml", body=(
            b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"))

    async def cut(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b"y" * 100)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def put(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        body = await request.read()
        self.bodies.append(body)
        return web.Response(headers={"ETag": '"e1"', "X-Got": request.headers.get("X-Test", "")})

    async def silent(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(3)  # longer than the stall, short enough for the teardown
        return web.Response()

    async def big_head(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"z", headers={f"X-Pad-{i}": "p" * 1000 for i in range(70)})

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), and its key."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(params=["http", "https"])
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def site(scheme: str, cert: tuple[Path, Path]) -> Iterator[Site]:
    tls = None
    if scheme == "https":
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*cert)
    s = Site(tls)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def pool(cert: tuple[Path, Path]) -> Iterator[rawget.Pool]:
    p = rawget.Pool(5, ssl.create_default_context(cafile=str(cert[0])))  # trusts the site
    try:
        yield p
    finally:
        p.close()


def fetch(pool: rawget.Pool, url: str, headers: dict[str, str] | None = None,
          expect: int | None = None) -> tuple[rawget.RawGet, bytes]:
    get = rawget.RawGet(pool, url, headers, expect_length=expect)
    out = bytearray()

    def sink(view: memoryview, at: int) -> None:
        assert at == len(out)
        out.extend(view)

    deadline = time.monotonic() + 20
    while not get.done and time.monotonic() < deadline:
        get.advance(sink, 1 * MiB)
        if get.status and not get.accepted:
            break
    return get, bytes(out)


def test_keep_alive_is_reused_and_a_connection_closed_while_idle_is_replaced(
        site: Site, pool: rawget.Pool) -> None:
    for _ in range(2):
        get, body = fetch(pool, f"{site.url}/blob", expect=len(BLOB))
        assert get.done and body == BLOB
    assert site.ports[0] == site.ports[1]  # one connection, kept alive
    time.sleep(0.8)  # past the server's keep-alive timeout: it closed the connection
    get, body = fetch(pool, f"{site.url}/blob", expect=len(BLOB))
    assert body == BLOB and not get.reused
    assert site.ports[2] != site.ports[1]


def test_a_range_comes_as_exactly_those_bytes(site: Site, pool: rawget.Pool) -> None:
    get, body = fetch(pool, f"{site.url}/blob", {"Range": "bytes=1000-2000999"},
                      expect=2_000_000)
    assert get.status == 206 and body == BLOB[1000:2001000]
    get, body = fetch(pool, f"{site.url}/blob", {"Range": "bytes=0-9"}, expect=5)
    assert get.status == 206 and not get.accepted and body == b""  # not what was asked
    get.close()


def test_a_chunked_answer_is_left_to_another_path(site: Site, pool: rawget.Pool) -> None:
    called = []
    get = rawget.RawGet(pool, f"{site.url}/chunked")
    with pytest.raises(rawget.NotDirect, match="chunked"):
        while not get.done:
            get.advance(lambda v, at: called.append(at), MiB)
    assert not called


def test_an_error_answer_stops_at_its_head_and_says_why(site: Site, pool: rawget.Pool) -> None:
    get, body = fetch(pool, f"{site.url}/forbidden", expect=10)
    assert get.status == 403 and not get.accepted and body == b""
    assert b"<Code>AccessDenied</Code>" in get.read_error_body()


def test_a_body_cut_short_says_how_far_it_got(site: Site, pool: rawget.Pool) -> None:
    with pytest.raises(PeerClosed, match="after 100 of 1000 bytes"):
        fetch(pool, f"{site.url}/cut", expect=1000)


def test_an_oversized_head_is_refused(site: Site, pool: rawget.Pool) -> None:
    with pytest.raises(PeerClosed, match="head over"):
        fetch(pool, f"{site.url}/big-head")


@pytest.mark.parametrize("scheme", ["https"])
def test_a_certificate_the_system_does_not_trust_is_refused(site: Site) -> None:
    untrusting = rawget.Pool(5)  # the system's trust, as aiohttp's: not this self-signed one
    try:
        with pytest.raises(RetryableError, match="TLS certificate not trusted") as e:
            fetch(untrusting, f"{site.url}/blob", expect=len(BLOB))
        assert e.value.code == "tls_untrusted"
        assert site.ports == []  # no request was sent
    finally:
        untrusting.close()


def test_a_store_that_answers_chunked_still_downloads_byte_exact(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.bin").write_bytes(os.urandom(300_000))
    (src / "mid.bin").write_bytes(os.urandom(2 * MiB + 5))
    (src / "big.bin").write_bytes(os.urandom(5 * MiB + 3))  # ranged: over range_bytes
    (src / "empty").write_bytes(b"")
    env = {"CHRONICLE_AGENT_DOWNLOAD__RANGE_BYTES": str(4 * MiB),
           "CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES": "0"}
    with proxied_daemon(env) as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        proxy.set_rules([{"action": "chunk_response", "method": "GET", "times": -1}])
        dest = tmp_path / "dest"
        download(daemon, aid, dest)
        assert_same_tree(src, dest)
        faults = [e["fault"] for e in gets(proxy, aid)]
        assert faults and set(faults) == {"chunk_response"}  # every GET came chunked


@pytest.mark.parametrize("streams", [1, 3])
def test_range_streams_bounds_the_ranges_of_one_component_in_flight(
        tmp_path: Path, streams: int) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(6 * MiB + 1))  # 7 ranges of 1 MiB
    env = {"CHRONICLE_AGENT_DOWNLOAD__RANGE_BYTES": str(1 * MiB),
           "CHRONICLE_AGENT_DOWNLOAD__RANGE_STREAMS": str(streams),
           "CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES": "0"}
    with proxied_daemon(env) as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        proxy.set_rules([{"action": "delay", "method": "GET", "seconds": 0.4, "times": -1}])
        dest = tmp_path / "dest"
        download(daemon, aid, dest)
        assert_same_tree(src, dest)
        stats = proxy.stats()
        assert len(gets(proxy, aid)) == 7
        assert stats["max_inflight"] == streams  # each GET waits 0.4 s: they overlap


def test_a_put_sends_the_exact_body_on_a_kept_alive_connection(
        site: Site, pool: rawget.Pool) -> None:
    body = memoryview(os.urandom(300_000))
    for _ in range(2):
        status, headers, _ = rawget.RawPut(pool, f"{site.url}/put", body,
                                           {"X-Test": "bound"}).run()
        assert status == 200 and headers["etag"] == '"e1"' and headers["x-got"] == "bound"
    assert site.bodies == [bytes(body)] * 2
    assert site.ports[0] == site.ports[1]  # one connection, kept alive
    time.sleep(0.8)  # past the server's keep-alive timeout: it closed the connection
    put = rawget.RawPut(pool, f"{site.url}/put", body[:10])
    assert put.run()[0] == 200 and not put.reused
    assert site.bodies[2] == bytes(body[:10]) and site.ports[2] != site.ports[1]


def test_a_refused_put_comes_with_the_answer_s_body(site: Site, pool: rawget.Pool) -> None:
    status, _, body = rawget.RawPut(pool, f"{site.url}/put-expired", memoryview(b"x" * 1000)
                                    ).run()
    assert status == 403 and b"Request has expired" in body


def test_a_put_nobody_answers_is_a_stall_and_a_stop_ends_it_sooner(
        site: Site, pool: rawget.Pool) -> None:
    t0 = time.monotonic()
    with pytest.raises(Stalled, match="no progress for 1s waiting for the answer"):
        rawget.RawPut(pool, f"{site.url}/put-silent", memoryview(b"x"), stall_s=1).run()
    assert 1 <= time.monotonic() - t0 < 1 + 2 * rawget.POLL_S
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(rawget.Cancelled):
        rawget.RawPut(pool, f"{site.url}/put-silent", memoryview(b"x"), stall_s=60,
                      stop=stop).run()
    assert time.monotonic() - t0 < 0.2 + 2 * rawget.POLL_S


def test_a_put_answered_chunked_still_gives_its_status(site: Site, pool: rawget.Pool) -> None:
    put = rawget.RawPut(pool, f"{site.url}/put-chunked", memoryview(b"abc"))
    assert put.run()[0] == 200 and put.sock is None  # not reused: its body was not read
