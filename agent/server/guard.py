"""The local server's defences at the connection level, in front of aiohttp's protocol:

- a cap on concurrent connections to its TCP port (one past the cap is closed at once and
  counted), so that a flood of idle connections cannot take the descriptors the embedding
  daemon needs;
- a header timeout: a connection that has not sent the end of its first request's headers
  within ``header_timeout_s`` is closed (aiohttp's own keep-alive timer, which starts when a
  connection opens and is not reset by incoming bytes, bounds every later request the
  same way with ``keepalive_timeout_s``);
- rate-limited logging of these events and of malformed requests: at most one WARNING line
  per ``log_interval_s``, with counts, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("agent.server.guard")

_HEADER_END = b"\r\n\r\n"
_WHAT = {
    "refused": "connections refused over the cap of {cap}",
    "header_timeout": "connections closed for sending no complete request headers in {t:g} s",
    "malformed": "malformed HTTP requests answered 400",
}


def descriptor_cap(wanted: int) -> int:
    """``wanted``, but at most half of this process's descriptor limit: the rest stays for
    the daemon's own files, sockets and databases."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // 2))


class EventLog:
    """Counts of noisy events, logged at most once per ``interval_s`` as one WARNING line."""

    def __init__(self, interval_s: float, describe: Callable[[str, int], str]) -> None:
        self.interval_s = interval_s
        self.totals: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._describe = describe
        self._last = -float("inf")
        self._flush: asyncio.TimerHandle | None = None

    def note(self, kind: str) -> None:
        self.totals[kind] += 1
        self._pending[kind] += 1
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self.flush()
        elif self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self._last + self.interval_s - now, self.flush)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._pending:
            return
        self._last = time.monotonic()
        parts = [self._describe(kind, n) for kind, n in sorted(self._pending.items())]
        self._pending.clear()
        log.warning("local server: %s (at most one such line per %g s)", "; ".join(parts),
                    self.interval_s)

    def close(self) -> None:
        self.flush()


class ConnectionGuard:
    """A protocol factory wrapping aiohttp's (``inner``) with the cap and header timeout."""

    def __init__(
        self,
        inner: Callable[[], asyncio.Protocol],
        *,
        max_connections: int,
        header_timeout_s: float,
        log_interval_s: float,
    ) -> None:
        self.inner = inner
        self.max_connections = descriptor_cap(max_connections)
        self.header_timeout_s = header_timeout_s
        self.active = 0
        self.events = EventLog(log_interval_s, self._describe)

    def _describe(self, kind: str, n: int) -> str:
        what = _WHAT[kind].format(cap=self.max_connections, t=self.header_timeout_s)
        return f"{n} {what}"

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)


class _Guarded(asyncio.Protocol):
    """One connection: refused past the cap, else handed to aiohttp's protocol, watched
    until the end of its first request's headers."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._headers_seen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        g = self._guard
        if g.active >= g.max_connections:
            g.events.note("refused")
            transport.abort()
            return
        g.active += 1
        self._transport = transport
        self._inner = g.inner()
        self._timer = asyncio.get_running_loop().call_later(g.header_timeout_s, self._expire)
        self._inner.connection_made(transport)

    def _expire(self) -> None:
        self._timer = None
        if not self._headers_seen and self._transport is not None:
            self._guard.events.note("header_timeout")
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self._headers_seen:
            seen = self._tail + data
            if _HEADER_END in seen:
                self._headers_seen = True
                self._cancel_timer()
            else:
                self._tail = seen[-3:]
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._inner is None:
            return
        self._guard.active -= 1
        inner, self._inner, self._transport = self._inner, None, None
        inner.connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ServerLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's request-handler logger: a malformed request (``BadHttpMessage``,
    ``BadStatusLine``…) is counted into the guard's rate-limited line instead of an ERROR
    with a traceback; anything else goes to ``aiohttp.server`` unchanged."""

    def __init__(self, events: EventLog) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._events = events

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self._events.note("malformed")
            return
        super().exception(msg, *args, exc_info=exc_info, **kw)

    def debug(self, msg: object, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):  # non-HTTP bytes on the port
            self._events.note("malformed")
            return
        super().debug(msg, *args, exc_info=exc_info, **kw)
