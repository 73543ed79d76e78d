"""HTTP(S) GETs whose body a worker thread reads straight from the socket into a reused
buffer and hands to a sink (a write in place, a hash): no Python object per chunk, no
event-loop wakeup per chunk, one thread hop per several MiB.

aiohttp's client makes every chunk a ``bytes`` object, wakes the event loop for it and
needs a thread hop to write it: a verified 2 x 1 GiB download cost the daemon 3.56 CPU-s
per GiB that way, 2.08 with this reader and the changes that came with it
(benchmarks/README.md). HTTPS goes through the same reader on a TLS socket with the trust
aiohttp uses (``ssl.create_default_context()``). A body sent chunked or without a length
keeps aiohttp's path (:class:`NotDirect`).

A call to :meth:`RawGet.advance` returns after at most ``want`` body bytes or
:data:`POLL_S` without any, so the async side keeps the stall watchdog, the bandwidth
limit, progress, crash points and cancellation (a cancelled transfer waits at most one
poll for its thread). Idle keep-alive connections are reused (:class:`Pool`); one that
the server closed meanwhile is replaced once, before any byte of the answer."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from agent.errors import PeerClosed, RetryableError, Stalled

POLL_S = 0.5
"""Longest a thread waits for the socket before it hands control back."""
BUFFER_BYTES = 256 * 1024
"""Each worker thread's receive buffer (reused for every GET it serves)."""
HEAD_MAX_BYTES = 64 * 1024
ERROR_BODY_MAX_BYTES = 64 * 1024
MAX_IDLE_PER_HOST = 64

Key = tuple[str, str, int]
"""Scheme, host, port."""
Sink = Callable[[memoryview, int], None]
"""Called in the worker thread with body bytes and their offset from the body's start."""

_local = threading.local()


def _buffer() -> memoryview:
    buf: memoryview | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(BUFFER_BYTES))
    return buf


def takes(url: str) -> bool:
    """Whether the direct reader serves this URL (HTTP or HTTPS)."""
    head = url[:8].lower()
    return head.startswith("http://") or head == "https://"


class NotDirect(Exception):
    """An answer the direct reader does not take (a chunked body): fetch it another way."""


class Pool:
    """Idle keep-alive connections, per scheme, host and port. ``tls``: the context for
    HTTPS (default: the system's trust, as aiohttp's)."""

    def __init__(self, connect_timeout_s: float, tls: ssl.SSLContext | None = None) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._tls = tls
        self._idle: dict[Key, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def take(self, key: Key) -> tuple[socket.socket, bool]:
        """A connection to ``key``, and whether it was used before."""
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        scheme, host, port = key
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                try:
                    sock = self._context().wrap_socket(sock, server_hostname=host)
                except BaseException:
                    sock.close()
                    raise
        except ssl.SSLCertVerificationError as e:
            raise RetryableError(f"{host}:{port}: TLS certificate not trusted "
                                 f"({e.verify_message})", code="tls_untrusted") from None
        except TimeoutError:
            raise RetryableError(f"cannot connect to {host}:{port} "
                                 f"within {self.connect_timeout_s:g}s",
                                 code="connect_failed") from None
        except OSError as e:
            raise RetryableError(f"cannot connect to {host}:{port} ({e.strerror or e})",
                                 code="connect_failed") from None
        return sock, False

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                self._tls = ssl.create_default_context()
                self._tls.set_alpn_protocols(["http/1.1"])
            return self._tls

    def give(self, key: Key, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self._closed and len(idle) < MAX_IDLE_PER_HOST:
                idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for s in socks:
            s.close()


class RawGet:
    """One GET of ``url``, advanced by worker-thread calls (never two at once)."""

    method = "GET"

    def __init__(self, pool: Pool, url: str, headers: dict[str, str] | None = None,
                 expect_length: int | None = None) -> None:
        u = urlsplit(url)
        scheme = u.scheme.lower()
        if scheme not in ("http", "https") or not u.hostname:
            raise NotDirect(f"not an HTTP URL: {u.scheme}")
        self.pool = pool
        self.key: Key = (scheme, u.hostname, u.port or (443 if scheme == "https" else 80))
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        lines = [f"{self.method} {target} HTTP/1.1", f"Host: {u.netloc.rpartition('@')[2]}",
                 "Accept-Encoding: identity", "User-Agent: chronicle-agent"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock: socket.socket | None = None
        self.reused = False
        self.head = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.length = -1
        """The body's length (Content-Length), once the head has come."""
        self.expect_length = expect_length
        self.accepted = False
        """A 200 or 206 of the expected length: its body goes to the sink. Any other answer
        stops after its head (:meth:`read_error_body` reads what it says)."""
        self.received = 0
        self.done = False
        self.keep_alive = True
        self._early = b""  # body bytes that came with the head

    # ---- worker-thread side ------------------------------------------------------------

    def advance(self, sink: Sink, want: int) -> int:
        """Send the request if not yet sent, read the head if not yet read, then up to
        ``want`` body bytes into ``sink``: how many (0 when the socket was quiet for
        POLL_S). Sets :attr:`status` once the head is in and :attr:`done` at the body's
        end (the connection then goes back to the pool)."""
        if self.sock is None:
            self._send()
        if not self.status and not self._read_head():
            return 0
        if not self.accepted:
            return 0
        return self._body(sink, want)

    def _body(self, sink: Sink, want: int) -> int:
        got = 0
        if self._early:
            if len(self._early) > self.length - self.received:
                self.close()
                raise PeerClosed(f"storage sent more than the {self.length} bytes it announced")
            view = memoryview(self._early)[:want]
            self._early = self._early[len(view):]
            sink(view, self.received)
            self.received += len(view)
            got = len(view)
        buf = _buffer()
        sock = self.sock
        assert sock is not None
        filled = 0  # the buffer is filled before the sink gets it: fewer, larger writes
        while True:
            room = min(len(buf) - filled, want - got - filled,
                       self.length - self.received - filled)
            n = 0
            if room > 0:
                try:
                    n = sock.recv_into(buf[filled:], room)
                except TimeoutError:
                    room = 0  # quiet: hand over what there is
                except OSError as e:
                    self.close()
                    raise PeerClosed(f"connection error after {self.received + filled} of "
                                     f"{self.length} bytes ({e.strerror or e})") from None
                else:
                    if not n:
                        self.close()
                        raise PeerClosed(f"connection closed after {self.received + filled} "
                                         f"of {self.length} bytes")
            filled += n
            if filled and (room <= n):  # full, at the end, or quiet
                sink(buf[:filled], self.received)
                self.received += filled
                got += filled
                filled = 0
            if room <= 0 and not filled:
                break
        if self.received == self.length:
            self._finish()
        return got

    def read_error_body(self) -> bytes:
        """The (bounded) body of an answer that is not a success, for its error code."""
        out = bytearray()
        while self.sock is not None and not self.done and len(out) < ERROR_BODY_MAX_BYTES:
            if not self._body(lambda v, _at: out.extend(v), ERROR_BODY_MAX_BYTES - len(out)):
                break
        if not self.done:
            self.close()
        return bytes(out)

    def close(self) -> None:
        """Drop the connection (an answer not read to its end cannot be reused)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _send(self) -> None:
        self.sock, self.reused = self.pool.take(self.key)
        self.sock.settimeout(POLL_S)
        try:
            self._transmit(self.sock)
        except OSError:
            if not self.reused:
                self.close()
                raise
            self._fresh()

    def _transmit(self, sock: socket.socket) -> None:
        sock.sendall(self.request)

    def _fresh(self) -> socket.socket:
        """A reused connection that the server had closed: once more on a new one."""
        self.close()
        sock, _ = self.pool.take(self.key)
        self.sock, self.reused = sock, False
        sock.settimeout(POLL_S)
        self._transmit(sock)
        return sock

    def _read_head(self) -> bool:
        sock = self.sock
        assert sock is not None
        while True:
            end = self.head.find(b"\r\n\r\n")
            if end > HEAD_MAX_BYTES or (end < 0 and len(self.head) > HEAD_MAX_BYTES):
                self.close()
                raise PeerClosed(f"storage sent a response head over {HEAD_MAX_BYTES} bytes")
            if end >= 0:
                self._parse(bytes(self.head[:end]))
                self._early = bytes(self.head[end + 4:])
                self.head = bytearray()
                return True
            try:
                chunk = sock.recv(16384)
            except TimeoutError:
                return False
            except OSError as e:
                chunk = b""
                err = e.strerror or str(e)
            else:
                err = "closed"
            if not chunk:
                if self.reused and not self.head:
                    sock = self._fresh()
                    continue
                self.close()
                raise PeerClosed(f"connection {err} before the answer's head was whole")
            self.head += chunk

    def _parse(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            self.close()
            raise PeerClosed(f"not an HTTP answer: {lines[0][:80]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.close()
            raise NotDirect("the body is sent chunked")
        conn = self.headers.get("connection", "").lower()
        self.keep_alive = parts[0] == "HTTP/1.1" and "close" not in conn
        length = self.headers.get("content-length")
        if length is None or not length.isdigit():
            self.close()
            raise NotDirect("the answer has no Content-Length")
        self.length = int(length)
        self.accepted = self.status in (200, 206) and self.expect_length in (None, self.length)

    def _finish(self) -> None:
        self.done = True
        if self.sock is not None and self.keep_alive:
            self.pool.give(self.key, self.sock)
            self.sock = None
        else:
            self.close()


class RawPut(RawGet):
    """One PUT of a body held in memory (a small file read whole), sent and answered in one
    worker-thread call (:meth:`run`) on a pooled keep-alive connection: no aiohttp request
    object, no event-loop wake-up and no second thread hop per file. Used for the small
    components of an upload (agent.transfer.upload), where aiohttp's request path was a
    quarter of the daemon's CPU per file (docs/tuning.md)."""

    method = "PUT"

    def __init__(self, pool: Pool, url: str, body: memoryview,
                 headers: dict[str, str] | None = None, stall_s: float = 30.0,
                 stop: threading.Event | None = None) -> None:
        super().__init__(pool, url, {"Content-Length": str(len(body)), **(headers or {})})
        self.body = body
        self.stall_s = stall_s
        self.stop = stop
        self._last = 0.0
        """When bytes last moved (time.monotonic())."""

    def run(self) -> tuple[int, dict[str, str], bytes]:
        """Send the request and read the answer: its status, headers and (for an error,
        bounded) body. Raises :class:`agent.errors.Stalled` after ``stall_s`` without a
        byte moving either way, :class:`agent.errors.PeerClosed` on a broken connection,
        ``Cancelled`` once ``stop`` is set."""
        self._last = time.monotonic()
        try:
            try:
                self._send()
            except OSError as e:  # the answer may be in already (refused early)
                if self.sock is None:
                    raise PeerClosed(f"connection error while sending ({e.strerror or e})"
                                     ) from None
            while not self.status:
                if not self._read_head():
                    self._quiet("waiting for the answer")
            if not 200 <= self.status < 300:
                return self.status, self.headers, self.read_error_body()
            while not self.done:
                if not self._body(_discard, self.length - self.received):
                    self._quiet("reading the answer")
            return self.status, self.headers, b""
        except NotDirect:  # chunked or unsized answer: its status is enough; not reused
            self.close()
            if not self.status:
                raise
            return self.status, self.headers, b""
        except BaseException:
            self.close()
            raise

    def _quiet(self, doing: str) -> None:
        """A poll without any byte: give up once stalled or stopped."""
        if self.stop is not None and self.stop.is_set():
            raise Cancelled()
        if time.monotonic() - self._last >= self.stall_s:
            raise Stalled(f"no progress for {self.stall_s:g}s {doing} (stalled)")

    def _transmit(self, sock: socket.socket) -> None:
        """The head and the body, a ``send`` at a time: a slow uplink is not a stall as
        long as bytes move."""
        for data in (memoryview(self.request), self.body):
            sent = 0
            while sent < len(data):
                try:
                    n = sock.send(data[sent:])
                except TimeoutError:
                    self._quiet("sending")
                    continue
                sent += n
                self._last = time.monotonic()


class Cancelled(Exception):
    """A direct request given up because its caller was cancelled."""


def _discard(_view: memoryview, _at: int) -> None:
    pass
