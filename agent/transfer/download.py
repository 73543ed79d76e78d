"""Downloading an asset into a directory.

1. One ``GET …?include_presigned=true``: metadata, validity flags and a read URL per
   component (Chronicle checks read access; the URLs go to nobody but this job). An
   invalidated asset is refused unless ``allow_invalid``; a deprecated one downloads with
   its reason as a warning; a missing one is also dropped from the cache.
2. The bytes: through the node-local cache (:mod:`agent.transfer.cache`) when the asset
   fits under its cap, else straight into a staging directory beside the destination. Either
   way components stream concurrently (the global transfer limit applies), each into its own
   file, resumed with ``Range`` from whatever an earlier attempt left, and verified by size
   and SHA-256 (a mismatch discards the file and fetches it again; it is never accepted).
3. The cache entry is materialized into the staging directory (hardlink on the same
   filesystem, else copy), which is then renamed onto the destination at once. On any
   failure the destination holds no partial file.

With ``include`` / ``exclude`` patterns (:mod:`agent.transfer.selection`) only the selected
components are fetched, verified and placed; through the cache, only those the asset's
entry does not hold yet (an entry holds any subset of its asset's components).

A full disk (ENOSPC) raises :class:`~agent.errors.DiskFull`: the worker puts the job back in
the queue with a delay and the partial files stay for the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import anyio.to_thread

from agent.access import check_dest
from agent.chronicle import contract
from agent.chronicle import models as m
from agent.config import DownloadSection
from agent.errors import (
    AssetInvalid,
    DiskFull,
    NotFound,
    RetryableError,
    UrlExpired,
    UsageError,
    VerificationError,
)
from agent.fsid import Identity, Refused, call_as, run_as
from agent.priority import hash_step, run_bulk
from agent.transfer import rawget
from agent.transfer.cache import AssetCache
from agent.transfer.groups import one_error
from agent.transfer.http import Watchdog, redact
from agent.transfer.primitives import (
    check_component_name,
    classify_storage_answer,
    is_disk_full,
    staging_path,
)
from agent.transfer.selection import filtered
from agent.transfer.upload import Engine, Progress

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20
RANGE_READ_BUFFER_BYTES = 256 << 10
"""The same for each of a ranged component's streams (up to upload.concurrency of them at
once): a quarter, so their buffers together stay near one whole-file stream's."""
WHOLE_BYTES = 1 << 20
"""A component of at most this many bytes is read whole and written in one thread call."""
DIRECT_STEP_BYTES = 8 << 20
"""Body bytes a worker thread reads (and writes) per call on the direct path."""
READ_BUFFER_BYTES = 1 << 20
"""aiohttp's receive buffer for a download (it holds up to twice this per stream before it
stops reading the socket): fewer wake-ups per GiB than its 64 KiB default, memory bounded.
Measured: 4 MiB saved about 8% CPU and cost about 50 MB of peak RSS."""


@dataclass
class DownloadResult:
    asset: m.Asset
    files: list[dict[str, Any]]
    warnings: list[str]
    cached: bool
    """True when the bytes came from the node-local cache without a fetch."""
    fetched: int = 0
    """The components fetched from the store (the others came from the cache)."""
    fetched_bytes: int = 0


async def download_asset(
    engine: Engine,
    job_id: str,
    asset_id: str,
    dest: str,
    allow_invalid: bool,
    progress: Progress,
    token: str | None = None,
    cache: AssetCache | None = None,
    ident: Identity | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> DownloadResult:
    """Everything at the destination (the check, the staging directory beside it, its
    files, the final rename) is done with ``ident``'s rights (agent.fsid): the files are
    the caller's from birth, and nothing the caller plants there can send the daemon's
    writes anywhere the caller could not write itself. ``include`` / ``exclude``: only the
    components these patterns select (:mod:`agent.transfer.selection`)."""
    try:
        return await _download(engine, job_id, asset_id, dest, allow_invalid, progress, token,
                               cache, ident, include, exclude)
    except (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        # what the caller's own rights refuse, or what the caller put in the way
        uid = ident.uid if ident is not None else os.geteuid()
        cls = Refused if isinstance(e, PermissionError) else UsageError
        raise cls(f"cannot download into {dest} as uid {uid}: {e.strerror}: "
                  f"{e.filename}") from None


async def _download(
    engine: Engine, job_id: str, asset_id: str, dest: str, allow_invalid: bool,
    progress: Progress, token: str | None, cache: AssetCache | None, ident: Identity | None,
    include: list[str] | None = None, exclude: list[str] | None = None,
) -> DownloadResult:
    await run_as(ident, check_dest, dest)
    try:
        asset = await engine.chronicle.send(
            contract.get_asset(asset_id, include_presigned=True), token=token)
    except NotFound:
        if cache is not None:
            await cache.drop(asset_id)
        raise
    warnings = check_asset(asset, allow_invalid)
    wanted = filtered(asset, include, exclude)  # the asset itself when that is all of it
    staging = staging_path(dest, job_id)
    await run_as(ident, lambda: os.makedirs(staging, mode=0o700, exist_ok=True))
    total = sum(c.size or 0 for c in wanted.components)
    await engine.queue.do(engine.queue.s.set_progress, job_id, bytes_total=total)
    if cache is not None and cache.usable_for(asset, wanted):

        async def fill(fill_dir: Any, names: list[str]) -> list[dict[str, Any]]:
            return await _Fetcher(engine, subset(wanted, names), token, progress).fetch_all(
                fill_dir)

        async with cache.use(asset, fill, frozenset(c.name for c in wanted.components)
                             ) as entry:
            progress.add(-progress.bytes_done)  # from here: bytes in place at the destination
            files = await cache.materialize(entry, staging, progress.add, ident)
        fetched, fetched_bytes = entry.fetched, entry.fetched_bytes
    else:
        files = await _Fetcher(engine, wanted, token, progress).fetch_all(staging, ident)
        fetched, fetched_bytes = len(files), total
    await run_as(ident, _move_into_place, staging, dest)
    files.sort(key=lambda f: f["name"])
    return DownloadResult(asset, files, warnings, fetched == 0, fetched, fetched_bytes)


def subset(asset: m.Asset, names: list[str]) -> m.Asset:
    """The asset as if it held only the components ``names``."""
    keep = set(names)
    return asset.model_copy(update={"components": [c for c in asset.components
                                                   if c.name in keep]})


def check_asset(asset: m.Asset, allow_invalid: bool) -> list[str]:
    """Refuse what must not be downloaded; the warnings for what may."""
    aid = asset.asset_id
    if asset.invalidated is not None and not allow_invalid:
        raise AssetInvalid(409, "asset_invalid",
                           f"asset {aid} is invalidated ({asset.invalidated.reason}); "
                           "pass allow_invalid (--allow-invalid) to download it anyway")
    if asset.state != "ready":
        raise UsageError(f"asset {aid} is {asset.state}, not ready", code="asset_not_ready")
    warnings = []
    if asset.deprecated is not None:
        warnings.append(f"asset {aid} is deprecated: {asset.deprecated.reason}")
    if asset.invalidated is not None:
        warnings.append(f"asset {aid} is invalidated: {asset.invalidated.reason} "
                        "(downloaded because allow_invalid was given)")
    return warnings


def _move_into_place(staging: str, dest: str) -> None:
    if os.path.isdir(dest):
        os.rmdir(dest)  # empty, checked before; fails loudly if someone wrote into it
    os.rename(staging, dest)


def discard_staging(dest: str, job_id: str) -> None:
    shutil.rmtree(staging_path(dest, job_id), ignore_errors=True)


class _Fetcher:
    """Fetches an asset's components into a directory, concurrently, each resumed and
    verified; refreshes the URLs once they expire."""

    def __init__(self, engine: Engine, asset: m.Asset, token: str | None,
                 progress: Progress) -> None:
        self.e = engine
        self.asset = asset
        self.token = token
        self.progress = progress
        self.urls = dict(asset.download_urls or {})

    async def refresh(self) -> None:
        a = await self.e.chronicle.send(
            contract.get_asset(self.asset.asset_id, include_presigned=True), token=self.token)
        self.urls = dict(a.download_urls or {})

    async def fetch_all(self, target_dir: Any,
                        ident: Identity | None = None) -> list[dict[str, Any]]:
        """Into ``target_dir``, with ``ident``'s rights (None: the daemon's own, for the
        node-local cache)."""
        files: list[dict[str, Any]] = []
        root = str(target_dir)
        here = await run_as(ident, _files_under, root)  # what an earlier attempt left

        async def one(comp: m.Component) -> None:
            name = check_component_name(comp.name)
            if name not in self.urls:
                raise VerificationError(f"Chronicle gave no download URL for {name!r}")
            target = os.path.join(root, *name.split("/"))
            args = (self.e, name, lambda: self.urls[name], self.refresh, target, comp,
                    self.progress, ident)
            if (comp.size or 0) > self.e.settings.download.range_bytes:
                sha = await _Ranged(*args).fetch()
            else:
                sha = await _fetch(*args, resume=name in here)
            files.append({"name": name, "size": comp.size or 0, "sha256": sha})

        with one_error():
            async with anyio.create_task_group() as tg:
                for comp in self.asset.components:
                    tg.start_soon(one, comp)
        return files


async def _fetch(
    engine: Engine,
    name: str,
    url_of: Callable[[], str],
    refresh: Callable[[], Awaitable[None]],
    target: str,
    comp: m.Component,
    progress: Progress,
    ident: Identity | None,
    resume: bool = True,
) -> str:
    """Fetch one component into ``target``, resuming from what is there (``resume``: an
    earlier attempt left a file there); verify it."""
    size = comp.size or 0
    up = engine.settings.upload
    what = f"GET {name}"

    async def attempt() -> str:
        if not resume and 0 < size <= WHOLE_BYTES and rawget.takes(url_of()):
            have, h = 0, hashlib.sha256()  # nothing to resume: one thread call does all
        else:
            have, h = await run_as(ident, _prepare_resume, target, size, what)
        if have:
            log.info("%s: resuming from byte %d of %d", what, have, size)
        progress.add(have)
        got = 0
        try:
            if have < size:
                async with engine.limits.slots:
                    got = await _get_into(engine, url_of(), target, have, size, h, progress,
                                          up.stall_timeout_s, what, ident)
        except UrlExpired:
            await refresh()
            raise RetryableError(f"{what}: URL expired", code="url_expired") from None
        finally:
            progress.add(-(have + got))
        sha: str = h.hexdigest()
        if comp.sha256 and sha != comp.sha256:
            await run_as(ident, os.unlink, target)
            raise RetryableError(f"{what}: SHA-256 mismatch, fetching again",
                                 code="checksum_mismatch")
        progress.add(size)
        return sha

    try:
        sha: str = await engine.retry.run(attempt, what,
                                          lambda e: engine.metrics.retry(e.code))
    except RetryableError as e:
        if e.code == "checksum_mismatch":
            raise VerificationError(f"{what}: SHA-256 does not match after retries",
                                    code="checksum_mismatch") from e
        raise
    return sha


def _prepare_resume(target: str, size: int, what: str) -> tuple[int, Any]:
    """What an earlier attempt left in ``target``: its length and a hash of it (a file
    longer than the component is emptied)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    h = hashlib.sha256()
    have = 0
    try:
        if not os.path.exists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        else:
            have = os.path.getsize(target)
            if have > size:
                os.truncate(target, 0)
                have = 0
            with open(target, "rb") as f:
                while chunk := f.read(4 << 20):
                    h.update(chunk)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(f"{what}: no space left on device creating {target}") from None
        raise
    if have < size:  # a disk already full: ask storage for nothing
        _check_space(target, min(size - have, 1 << 20), what)
    return have, h


def _files_under(root: str) -> set[str]:
    """The files under ``root`` by their '/'-separated relative names."""
    found = set()
    for top, _dirs, names in os.walk(root):
        rel = os.path.relpath(top, root)
        for n in names:
            found.add(n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}")
    return found


def _check_space(target: str, need: int, what: str) -> None:
    st = os.statvfs(os.path.dirname(target))
    if st.f_bavail * st.f_frsize < need:
        raise DiskFull(f"{what}: no space left on device for {target} "
                       f"({st.f_bavail * st.f_frsize} bytes free)")


Buffer = bytes | bytearray | memoryview


def _write_at(fd: int, chunks: list[Buffer], at: int, h: Any | None, target: str,
              what: str) -> None:
    """Write ``chunks`` back to back at ``at`` (one ``pwritev``) and hash them. On a full
    disk the file is cut back to the end of what was written whole (the bytes before it are
    the component's, in order), so a later attempt resumes from a file that is all good."""
    views = [memoryview(c) for c in chunks]
    total = sum(len(v) for v in views)
    done = 0
    try:
        while done < total:
            n = os.pwritev(fd, views, at + done)
            done += n
            while views and n >= len(views[0]):  # a short write: go on after what went out
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
    except OSError as e:
        if is_disk_full(e):
            os.ftruncate(fd, at + done)
            raise DiskFull(f"{what}: no space left on device writing {target} "
                           f"({at + done} bytes in place)") from None
        raise
    if h is not None:
        for c in chunks:
            h.update(c)


async def _get_into(
    engine: Engine, url: str, target: str, have: int, size: int, h: Any | None,
    progress: Progress | _Counted, stall_s: float, what: str, ident: Identity | None,
    end: int | None = None, write: Callable[..., None] = _write_at,
) -> int:
    """Bytes ``have`` to ``end`` (default: the end) of a ``size``-byte object into
    ``target`` at their place, through ``write`` (``_write_at``, or a comparison); how
    many arrived."""
    whole = not have and end is None and size <= WHOLE_BYTES and write is _write_at
    if rawget.takes(url):
        try:
            if whole:
                return await _get_whole_direct(engine, url, target, size, h, progress,
                                               stall_s, what, ident)
            return await _get_direct(engine, url, target, have, size, h, progress, stall_s,
                                     what, ident, end, write)
        except rawget.NotDirect as e:
            log.debug("%s: %s; through aiohttp", what, e)
    if whole:
        return await _get_whole(engine, url, target, size, h, progress, stall_s, what, ident)
    end = size if end is None else end
    ranged = have > 0 or end < size
    headers = {"Range": f"bytes={have}-{end - 1}"} if ranged else {}
    watchdog = Watchdog(stall_s)
    got = 0
    log.debug("%s <- %s bytes %d-%d", what, redact(url), have, end - 1)
    fd = await run_as(ident, os.open, target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        async with asyncio.timeout(stall_s) as t:
            watchdog.arm(t)
            bufsize = RANGE_READ_BUFFER_BYTES if end < size else READ_BUFFER_BYTES
            async with engine.session.get(url, headers=headers,
                                          read_bufsize=bufsize) as resp:
                if resp.status not in (200, 206):
                    raise classify_storage_answer(resp.status, await resp.read(), what)
                if ranged and resp.status == 200:
                    raise RetryableError(f"{what}: storage ignored Range", code="range_ignored")
                pos = have
                batch: list[bytes] = []
                batch_bytes = 0
                while True:
                    # whatever arrived, without joining it; written and hashed in batches
                    chunk = await resp.content.readany()
                    if chunk:
                        if pos + batch_bytes + len(chunk) > end:
                            raise RetryableError(f"{what}: storage sent more than "
                                                 f"{end - have} bytes", code="too_long")
                        batch.append(chunk)
                        batch_bytes += len(chunk)
                        watchdog.kick()
                    if batch and (batch_bytes >= READ_CHUNK_BYTES or not chunk):
                        await run_bulk(write, fd, batch, pos, h, target, what)
                        n, batch, batch_bytes = batch_bytes, [], 0
                        pos += n
                        got += n
                        progress.add(n)
                        engine.metrics.received(n)
                        engine.crash.progress("mid_download", progress.bytes_done)
                        await watchdog.throttled(engine.limits, n)
                    if not chunk:
                        break
                if pos != end:
                    raise RetryableError(f"{what}: got {pos - have} of {end - have} bytes",
                                         code="truncated")
    except TimeoutError:
        raise RetryableError(f"{what}: no progress for {stall_s:g}s", code="stalled") from None
    finally:
        os.close(fd)
    return got


def _refused_head(get: rawget.RawGet, expected: int, ranged: bool, what: str) -> Exception:
    """Why an answer whose head :class:`rawget.RawGet` did not accept is refused (its
    error body, if any, already read)."""
    if get.status in (200, 206):
        get.close()
        if ranged and get.status == 200:
            return RetryableError(f"{what}: storage ignored Range", code="range_ignored")
        return RetryableError(f"{what}: storage sent {get.length} bytes, not {expected}",
                              code="too_long" if get.length > expected else "truncated")
    return classify_storage_answer(get.status, get.read_error_body(), what)


@contextlib.asynccontextmanager
async def _watched(stall_s: float, what: str) -> AsyncIterator[Watchdog]:
    """A stall watchdog over the body: no progress for ``stall_s`` is a ``stalled`` retry."""
    watchdog = Watchdog(stall_s)
    try:
        async with asyncio.timeout(stall_s) as t:
            watchdog.arm(t)
            yield watchdog
    except TimeoutError:
        raise RetryableError(f"{what}: no progress for {stall_s:g}s", code="stalled") from None


async def _received_whole(engine: Engine, progress: Progress | _Counted, n: int) -> None:
    """A whole small component is in place: count it, and pace by the bandwidth limit."""
    progress.add(n)
    engine.metrics.received(n)
    await engine.limits.throttle(n)


async def _advance(get: rawget.RawGet, step: Callable[[], int], expected: int,
                   ranged: bool, what: str) -> int:
    """One worker-thread call of a direct GET: body bytes it placed; raises on an answer
    that is not the one asked for."""
    n = await run_bulk(step)
    if get.status and not get.accepted:
        raise await run_bulk(_refused_head, get, expected, ranged, what)
    return n


async def _get_direct(
    engine: Engine, url: str, target: str, have: int, size: int, h: Any | None,
    progress: Progress | _Counted, stall_s: float, what: str, ident: Identity | None,
    end: int | None, write: Callable[..., None],
) -> int:
    """:func:`_get_into` over HTTP(S), read by worker threads from the socket
    (:mod:`agent.transfer.rawget`)."""
    end = size if end is None else end
    ranged = have > 0 or end < size
    get = rawget.RawGet(engine.pool, url, {"Range": f"bytes={have}-{end - 1}"} if ranged
                        else None, expect_length=end - have)
    log.debug("%s <- %s bytes %d-%d", what, redact(url), have, end - 1)
    fd = await run_as(ident, os.open, target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def sink(view: memoryview, at: int) -> None:
        write(fd, [view], have + at, h, target, what)

    got = 0
    try:
        async with _watched(stall_s, what) as watchdog:
            while not get.done:
                n = await _advance(get, partial(get.advance, sink, DIRECT_STEP_BYTES),
                                   end - have, ranged, what)
                if n:
                    got += n
                    watchdog.kick()
                    progress.add(n)
                    engine.metrics.received(n)
                    engine.crash.progress("mid_download", progress.bytes_done)
                    await watchdog.throttled(engine.limits, n)
    finally:
        get.close()
        os.close(fd)
    return got


async def _get_whole_direct(
    engine: Engine, url: str, target: str, size: int, h: Any, progress: Progress | _Counted,
    stall_s: float, what: str, ident: Identity | None,
) -> int:
    """:func:`_get_whole` over HTTP(S): usually one worker-thread call for the request,
    the answer, the file's write and its hash."""
    get = rawget.RawGet(engine.pool, url, expect_length=size)
    body = bytearray(size)

    def sink(view: memoryview, at: int) -> None:
        body[at:at + len(view)] = view

    def step() -> int:
        n = get.advance(sink, size)
        if get.done:
            call_as(ident, _write_new, target, body, h, what)
        return n

    try:
        async with _watched(stall_s, what) as watchdog:
            while not get.done:
                if await _advance(get, step, size, False, what):
                    watchdog.kick()
    finally:
        get.close()
    await _received_whole(engine, progress, size)
    return size


async def _get_whole(
    engine: Engine, url: str, target: str, size: int, h: Any, progress: Progress | _Counted,
    stall_s: float, what: str, ident: Identity | None,
) -> int:
    """A small component (at most WHOLE_BYTES) in one read, then written and hashed in one
    worker-thread call: two thread hops per file instead of five (1000 small files were
    mostly thread switches)."""
    async with _watched(stall_s, what):
        async with engine.session.get(url) as resp:
            if resp.status != 200:
                raise classify_storage_answer(resp.status, await resp.read(), what)
            if resp.content_length is not None and resp.content_length != size:
                raise RetryableError(f"{what}: storage sent {resp.content_length} bytes, "
                                     f"not {size}", code="too_long")
            chunks, n = [], 0
            async for chunk in resp.content.iter_any():
                n += len(chunk)
                if n > size:
                    raise RetryableError(f"{what}: storage sent more than {size} bytes",
                                         code="too_long")
                chunks.append(chunk)
            body = b"".join(chunks)
    await run_bulk(call_as, ident, _write_new, target, body, h, what)
    if len(body) != size:
        raise RetryableError(f"{what}: got {len(body)} of {size} bytes", code="truncated")
    await _received_whole(engine, progress, len(body))
    return len(body)


def _write_new(target: str, body: bytes | bytearray, h: Any, what: str) -> None:
    """The whole bytes of a small component, its directory made if need be (hashed too)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd = os.open(target, flags, 0o600)
    try:
        _write_at(fd, [body], 0, h, target, what)
    finally:
        os.close(fd)


RANGES_SUFFIX = ".chronicle-ranges"


def _ranges_path(target: str) -> str:
    head, base = os.path.split(target)
    return os.path.join(head, f".{base}{RANGES_SUFFIX}")


class _Ranged:
    """One large component fetched as ranged GETs of its one URL at once, each written at
    its place in a file of the component's size.

    Each range that is whole is recorded in a small file beside the target (written
    atomically), so after a crash only missing ranges are fetched again. The SHA-256
    follows the contiguous prefix of the file (:class:`_Prefix`): bytes written at its end
    are hashed from the buffer just written, the rest read back from the page cache once the
    ranges before them are whole (docs/downloads.md says why). If the
    digest does not match, every range is fetched once more and compared with what is on
    disk: ranges that differ are rewritten (and named in a WARNING), then the file is
    hashed again; a second mismatch discards everything and the attempt is retried."""

    def __init__(self, engine: Engine, name: str, url_of: Callable[[], str],
                 refresh: Callable[[], Awaitable[None]], target: str, comp: m.Component,
                 progress: Progress, ident: Identity | None) -> None:
        self.e, self.name, self.url_of, self.refresh = engine, name, url_of, refresh
        self.target, self.sidecar = target, _ranges_path(target)
        self.size = comp.size or 0
        self.sha256 = comp.sha256
        self.progress = _Counted(progress)  # this component's bytes in the job's progress
        self.ident = ident
        self.what = f"GET {name}"
        step = engine.settings.download.range_bytes
        self.step = step
        self.ranges = [(a, min(a + step, self.size)) for a in range(0, self.size, step)]
        self.done: set[int] = set()
        self.changed = anyio.Event()
        self.recording = anyio.Lock()  # one writer of the record at a time
        self.streams = anyio.CapacityLimiter(range_streams(engine.settings.download))

    async def fetch(self) -> str:
        self.done = await run_as(self.ident, self._prepare)
        have = sum(b - a for i, (a, b) in enumerate(self.ranges) if i in self.done)
        if self.done:
            log.info("%s: resuming, %d of %d ranges already here", self.what, len(self.done),
                     len(self.ranges))
        missing = [i for i in range(len(self.ranges)) if i not in self.done]
        if missing:
            await run_as(self.ident, _check_space, self.target,
                         min(self.size - have, 1 << 20), self.what)
        self.progress.add(have)
        try:
            sha = await self._fetch_and_hash(missing)
            if self.sha256 and sha != self.sha256:
                sha = await self._repair()
        except BaseException:
            self.progress.add(-self.progress.n)  # an attempt after this counts again
            raise
        await run_as(self.ident, _unlink_quietly, self.sidecar)
        return sha

    def _prepare(self) -> set[int]:
        """Create the target at its full size; the ranges already whole in it."""
        os.makedirs(os.path.dirname(self.target), exist_ok=True)
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.size)
            finally:
                os.close(fd)
        except OSError as e:
            if is_disk_full(e):
                raise DiskFull(f"{self.what}: no space left on device creating "
                               f"{self.target}") from None
            raise
        _unlink_quietly(f"{self.sidecar}.tmp")  # a record being written when a crash came
        try:
            with open(self.sidecar) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return set()
        if not isinstance(rec, dict) or rec.get("size") != self.size or \
                rec.get("range_bytes") != self.step or rec.get("sha256") != self.sha256:
            return set()  # another component's, or another range size: start over
        return {i for i in rec.get("done", []) if isinstance(i, int) and
                0 <= i < len(self.ranges)}

    def _record(self, done: list[int]) -> None:
        tmp = f"{self.sidecar}.tmp"
        with open(tmp, "w") as f:
            json.dump({"size": self.size, "range_bytes": self.step, "sha256": self.sha256,
                       "done": done}, f)
        os.replace(tmp, self.sidecar)

    async def _fetch_and_hash(self, missing: list[int]) -> str:
        prefix = _Prefix()

        def write(fd: int, chunks: list[Buffer], at: int, h: None, target: str,
                  what: str) -> None:
            _write_at(fd, chunks, at, None, target, what)
            prefix.offer(chunks, at)

        with one_error():
            async with anyio.create_task_group() as tg:
                for i in missing:
                    tg.start_soon(self._range, i, write)
                await self._follow(prefix)
        return prefix.h.hexdigest()

    async def _range(self, i: int, write: Callable[..., None],
                     diff: _Diff | None = None) -> None:
        a, b = self.ranges[i]
        placed = _Counted(self.progress)  # bytes of this range in place, in this process
        label = f"{self.what} range {i + 1}/{len(self.ranges)}"

        async def attempt() -> None:
            try:
                async with self.streams, self.e.limits.slots:
                    await _get_into(self.e, self.url_of(), self.target, a + placed.n,
                                    self.size, diff, placed,
                                    self.e.settings.upload.stall_timeout_s, label,
                                    self.ident, end=b, write=write)
            except UrlExpired:
                await self.refresh()
                raise RetryableError(f"{label}: URL expired", code="url_expired") from None

        try:
            await self.e.retry.run(attempt, label, lambda e: self.e.metrics.retry(e.code))
        except BaseException:
            placed.add(-placed.n)
            raise
        if diff is None:
            self.done.add(i)
            async with self.recording:
                await run_as(self.ident, self._record, sorted(self.done))
            self.changed.set()
        else:  # a comparison: these bytes were counted once already
            placed.add(-placed.n)

    async def _follow(self, prefix: _Prefix) -> None:
        """Carry the hash of the file's prefix to its end: as each range is whole, read
        back whatever of it was not hashed as it was written, from the page cache."""
        f = await run_as(self.ident, open, self.target, "rb")
        try:
            view = memoryview(bytearray(READ_CHUNK_BYTES))
            i = 0
            while i < len(self.ranges):
                if i not in self.done:
                    self.changed = anyio.Event()
                    await self.changed.wait()
                    continue
                _, b = self.ranges[i]
                while prefix.n < b:
                    if not await run_bulk(prefix.read_back, f, view, b):
                        raise VerificationError(f"{self.what}: {self.target} is shorter "
                                                "than its ranges", code="checksum_mismatch")
                i += 1
        finally:
            await anyio.to_thread.run_sync(f.close)

    async def _repair(self) -> str:
        """The digest did not match: fetch every range again, compare it with the file,
        rewrite what differs, hash again."""
        log.warning("%s: SHA-256 mismatch; fetching every range again to find the bad one",
                    self.what)
        self.e.metrics.retry("checksum_mismatch")
        diff = _Diff()
        with one_error():
            async with anyio.create_task_group() as tg:
                for i in range(len(self.ranges)):
                    tg.start_soon(self._range, i, _compare_at, diff)
        for a, b in diff.spans:
            log.warning("%s: bytes %d-%d differed from a second fetch: rewritten", self.what,
                        a, b - 1)
        prefix = _Prefix()
        await self._follow(prefix)
        sha = prefix.h.hexdigest()
        if sha != self.sha256:
            await run_as(self.ident, _unlink_quietly, self.sidecar)
            await run_as(self.ident, _unlink_quietly, self.target)
            raise VerificationError(f"{self.what}: SHA-256 does not match after a second "
                                    "fetch of every range", code="checksum_mismatch")
        return sha


def range_streams(settings: DownloadSection) -> int:
    """``download.range_streams``, its automatic value (0) resolved."""
    if settings.range_streams:
        return settings.range_streams
    return min(4, max(1, len(os.sched_getaffinity(0)) // 2))


class _Counted:
    """A job's progress, also counting what one transfer added."""

    def __init__(self, progress: Progress | _Counted) -> None:
        self.progress = progress
        self.n = 0

    @property
    def bytes_done(self) -> int:
        return self.progress.bytes_done

    def add(self, n: int) -> None:
        self.n += n
        self.progress.add(n)


class _Prefix:
    """The SHA-256 of a file's first ``n`` bytes, fed from two sides: a write that covers
    byte ``n`` is hashed from the buffer just written (still in the CPU's cache: no read
    back, which costs about 0.1-0.25 CPU-s per GiB here), and :meth:`read_back` hashes from
    the file what landed out of order. Ranges fetched one after another (one stream) are
    thus hashed as they arrive; only a write after a byte not yet hashed is read back."""

    READ_BACK_BYTES = 4 << 20
    """Hashed per :meth:`read_back` call, under the lock that writers take briefly."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0
        self.lock = threading.Lock()

    def offer(self, chunks: list[Buffer], at: int) -> None:
        """``chunks`` were written back to back at ``at``: hash what extends the prefix."""
        total = sum(len(c) for c in chunks)
        if at > self.n or at + total <= self.n:  # a gap before them, or hashed already
            return
        with self.lock:
            for c in chunks:
                end = at + len(c)
                if at <= self.n < end:
                    self.h.update(memoryview(c)[self.n - at:])
                    self.n = end
                at = end

    def read_back(self, f: Any, view: memoryview, end: int) -> int:
        """Hash up to ``READ_BACK_BYTES`` more of the file ``f`` (whole up to ``end``)
        from the prefix's end; how many (0: the file ends there)."""
        with self.lock:
            f.seek(self.n)
            n: int = hash_step(f, self.h, view, min(end - self.n, self.READ_BACK_BYTES))
            self.n += n
            return n


class _Diff:
    """Where a second fetch differed from the file (filled by worker threads)."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self.lock = threading.Lock()


def _compare_at(fd: int, chunks: list[Buffer], at: int, diff: _Diff, target: str,
                what: str) -> None:
    """Compare fetched bytes with the file's at ``at``; rewrite them where they differ."""
    pos = at
    for c in chunks:
        if os.pread(fd, len(c), pos) != c:
            _write_at(fd, [c], pos, None, target, what)
            with diff.lock:
                diff.spans.append((pos, pos + len(c)))
        pos += len(c)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
