"""Moving bytes to and from presigned URLs: streaming bodies from disk with an exact
Content-Length, hashing in the same read pass, a progress watchdog for stalls, and the
classification of storage answers (S3-style XML errors, expired URLs).

Presigned URLs carry their signature in the query string; :func:`redact` is what every log
line and error message uses to show one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiohttp.payload
import anyio
import anyio.to_thread

from agent.errors import (
    Stalled,
    TransferError,
)
from agent.priority import hash_step, run_bulk
from agent.transfer.limits import Limits
from agent.transfer.primitives import classify_storage_answer

Opener = Callable[[str], int]
"""Opens a source file for reading, in a worker thread, with the rights of whoever the
bytes are read for (see agent.fsid): a descriptor."""


def open_plain(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def redact(url: str) -> str:
    """A URL fit for a log line: scheme, host and path, never the query (the signature)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query else "")


def create_only(headers: dict[str, str] | None) -> bool:
    """Whether a PUT with these headers is create-only (``If-None-Match: *``): a 412 then
    says the key is taken, by the very bytes its URL binds (sent by an attempt whose answer
    was lost)."""
    return any(k.lower() == "if-none-match" for k in headers or {})


class Watchdog:
    """Cuts a transfer that moves no byte for ``stall_s``: call :meth:`kick` on progress."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._timeout: asyncio.Timeout | None = None

    def kick(self) -> None:
        if self._timeout is not None:
            self._timeout.reschedule(asyncio.get_running_loop().time() + self.stall_s)

    def arm(self, timeout: asyncio.Timeout) -> None:
        self._timeout = timeout

    async def throttled(self, limits: Limits, n: int) -> None:
        """Wait for the bandwidth limit: our own pacing, not a stall, so not watched."""
        if self._timeout is not None:
            self._timeout.reschedule(None)
        try:
            await limits.throttle(n)
        finally:
            self.kick()


async def file_chunks(
    path: str,
    offset: int,
    length: int,
    chunk_bytes: int,
    hasher: Any | None,
    on_bytes: Callable[[int], None],
    limits: Limits,
    watchdog: Watchdog | None = None,
    opener: Opener | None = None,
) -> AsyncIterator[bytes]:
    """Yield ``length`` bytes of ``path`` from ``offset``, read (and hashed) in a thread,
    never more than one chunk held at a time."""
    fd = await anyio.to_thread.run_sync(opener or open_plain, path)
    try:
        pos, end = offset, offset + length

        def read(n: int, at: int) -> bytes:
            data = os.pread(fd, n, at)
            if hasher is not None:
                hasher.update(data)
            return data

        while pos < end:
            n = min(chunk_bytes, end - pos)
            data = await run_bulk(read, n, pos)
            if len(data) != n:
                raise SourceShrank(f"{path}: file ended at byte {pos + len(data)}, expected {end}")
            pos += n
            if watchdog is not None:
                await watchdog.throttled(limits, n)
            else:
                await limits.throttle(n)
            on_bytes(n)
            yield data
    finally:
        os.close(fd)


class SourceShrank(TransferError):
    code = "source_changed"


BodyMaker = Callable[[Callable[[int], None], Watchdog], Awaitable[Any]]


async def _put(
    session: aiohttp.ClientSession,
    url: str,
    length: int,
    make_body: BodyMaker,
    *,
    stall_s: float,
    on_bytes: Callable[[int], None],
    what: str,
    content_type: str | None = None,
) -> str | None:
    """PUT a body of exactly ``length`` bytes, cut after ``stall_s`` without progress.
    Returns the ETag as storage returned it; on failure the bytes counted are taken back."""
    headers = {"Content-Length": str(length)}
    if content_type:
        headers["Content-Type"] = content_type
    watchdog = Watchdog(stall_s)
    sent = 0

    def count(n: int) -> None:
        nonlocal sent
        sent += n
        on_bytes(n)

    try:
        async with asyncio.timeout(stall_s) as timeout:
            watchdog.arm(timeout)
            body = await make_body(count, watchdog)
            async with session.put(
                url, data=body, headers=headers, skip_auto_headers=("Content-Type",)
            ) as resp:
                watchdog.kick()
                if resp.status >= 300:
                    raise classify_storage_answer(resp.status, await resp.read(), what)
                await resp.read()
                return resp.headers.get("ETag")
    except TimeoutError:
        on_bytes(-sent)
        raise Stalled(f"{what}: no progress for {stall_s:g}s (stalled)") from None
    except BaseException:
        on_bytes(-sent)
        raise


async def put_file(
    session: aiohttp.ClientSession,
    url: str,
    path: str,
    offset: int,
    length: int,
    *,
    chunk_bytes: int,
    limits: Limits,
    stall_s: float,
    on_bytes: Callable[[int], None],
    content_type: str | None = None,
    what: str,
    opener: Opener | None = None,
) -> tuple[str | None, str]:
    """PUT ``length`` bytes of ``path`` at ``offset``, hashed in the same read pass.
    Returns (ETag as returned, SHA-256 hex of the bytes sent)."""
    hasher = hashlib.sha256()

    async def body(count: Callable[[int], None], watchdog: Watchdog) -> Any:
        chunks = file_chunks(path, offset, length, chunk_bytes, hasher, count, limits, watchdog,
                             opener)
        if length <= chunk_bytes:  # small bodies are read whole: one thread hop, bytes
            return b"".join([c async for c in chunks])
        return chunks

    etag = await _put(session, url, length, body, stall_s=stall_s, on_bytes=on_bytes,
                      what=what, content_type=content_type)
    return etag, hasher.hexdigest()


async def hash_file(path: str, size: int, chunk_bytes: int,
                    opener: Opener | None = None) -> str:
    """SHA-256 of a whole file, read sequentially into one reused buffer, in short bulk
    calls (:func:`agent.priority.hash_step`: the progress floor can boost the next one). A
    cancelled caller stops at the end of the current call."""
    h = hashlib.sha256()
    view = memoryview(bytearray(max(chunk_bytes, 4 << 20)))
    f = await run_bulk(lambda: os.fdopen((opener or open_plain)(path), "rb", buffering=0))
    try:
        remaining = size
        while remaining > 0:
            n = await run_bulk(hash_step, f, h, view, remaining)
            if not n:
                raise SourceShrank(f"{path}: file is shorter than {size} bytes")
            remaining -= n
    finally:
        await anyio.to_thread.run_sync(f.close)
    return h.hexdigest()


class SendfilePayload(aiohttp.payload.Payload):
    """A slice of a file sent with sendfile(2): the kernel moves the bytes from the page
    cache to the socket, so no byte is copied through Python and no buffer is held. Sent in
    pieces so that progress, the stall watchdog and the bandwidth limit see it move."""

    _autoclose = True

    def __init__(
        self,
        path: str,
        offset: int,
        length: int,
        *,
        piece_bytes: int,
        limits: Limits,
        on_bytes: Callable[[int], None],
        watchdog: Watchdog,
        opener: Opener | None = None,
    ) -> None:
        super().__init__(path, content_type=None)
        self._opener = opener or open_plain
        self._size = length
        self._path, self._offset = path, offset
        self._piece = piece_bytes
        self._limits, self._on_bytes, self._watchdog = limits, on_bytes, watchdog

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file slice has no text form")

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, self._size)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        if self._consumed:
            raise RuntimeError("payload already sent")
        self._consumed = True
        writer.send_headers()
        await writer.drain()
        transport = writer.transport
        if transport is None:
            raise ConnectionResetError("connection lost before the body was sent")
        loop = asyncio.get_running_loop()
        fd = await anyio.to_thread.run_sync(self._opener, self._path)
        f = os.fdopen(fd, "rb", buffering=0)
        try:
            pos, end = self._offset, self._offset + (self._size or 0)
            while pos < end:
                n = min(self._piece, end - pos)
                await self._watchdog.throttled(self._limits, n)
                sent = await loop.sendfile(transport, f, pos, n)
                if sent != n:
                    raise SourceShrank(f"{self._path}: file ended at byte {pos + sent}")
                pos += n
                self._on_bytes(n)
                self._watchdog.kick()
        finally:
            await anyio.to_thread.run_sync(f.close)
        writer.length = 0  # everything declared was sent, outside the writer's own count


async def put_file_sendfile(
    session: aiohttp.ClientSession,
    url: str,
    path: str,
    offset: int,
    length: int,
    *,
    piece_bytes: int,
    limits: Limits,
    stall_s: float,
    on_bytes: Callable[[int], None],
    what: str,
    opener: Opener | None = None,
) -> str | None:
    """PUT a slice of a file with sendfile(2); returns the ETag as storage returned it."""

    async def body(count: Callable[[int], None], watchdog: Watchdog) -> Any:
        return SendfilePayload(path, offset, length, piece_bytes=piece_bytes, limits=limits,
                               on_bytes=count, watchdog=watchdog, opener=opener)

    return await _put(session, url, length, body, stall_s=stall_s, on_bytes=on_bytes, what=what)
