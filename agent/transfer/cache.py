"""The node-local cache of ready assets: one fetch per asset, however many jobs want it.

A ready asset is immutable, so one verified copy can serve every later download of the same
asset id on this node. An entry holds some or all of its asset's components: a download of a
selection (one rank's shards) fills it with those, a later one with the rest, and what this
node uploaded of a checkpoint several nodes wrote is its entry from the start. Layout
under ``download.cache_dir`` (default ``<state_dir>/cache``)::

    index.db                    one row per entry: asset id, state, bytes, manifest, last use
    fill/<asset_id>/<name>      an entry being filled: partial files, resumed with Range
    objects/<asset_id>/<name>   verified entries; their files are read-only (0444)
    trash/                      entries being removed

- Filling: one fill per asset at a time (a per-asset lock). A second job that wants the same
  asset waits for that fill, then materializes from the finished entry. A fill fetches only
  the wanted components the entry does not hold (its files move back into ``fill/`` while
  it runs). An interrupted fill
  (a failed attempt, a killed daemon) keeps its partial files; the next fill of the asset
  resumes them.
- Verification: each component is verified (size and SHA-256) as it is fetched; once all are
  in, the fill directory is renamed into ``objects/`` and the row marked ready, with each
  file's size, mtime and inode. Every later use checks them (a file changed in place through
  a hardlink is dropped and fetched again, never served), and the first use after a daemon
  start hashes the files again.
- Cap: before a fill, least recently used entries (never one in use) are evicted until the
  new one fits under ``download.cache_max_bytes``. A selection larger than the cap, or an
  asset whose id is not a safe file name, bypasses the cache.
- Materializing: each file is hardlinked into the destination's staging directory when both
  are on one filesystem, else copied in the kernel (``copy_file_range``, resumable from what
  a previous attempt copied).

The metadata ``GET`` (access check, validity flags, the component list) is made for every
download before the cache is consulted: the cache holds bytes, never permissions.

SQLite and every file operation run in worker threads, never on the event loop.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from agent.chronicle import models as m
from agent.errors import DiskFull
from agent.fsid import Identity, call_as, run_as
from agent.priority import run_bulk
from agent.transfer.primitives import is_disk_full

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 64 * 1024 * 1024
HASH_CHUNK_BYTES = 4 * 1024 * 1024
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")
_NO_LINK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES)

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    asset_id   TEXT PRIMARY KEY,
    state      TEXT NOT NULL,       -- filling | ready
    bytes      INTEGER NOT NULL,
    manifest   TEXT NOT NULL,       -- [{name, size, sha256, mtime_ns, ino}] once ready
    last_used  REAL NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class CachedFile:
    name: str
    size: int
    sha256: str
    mtime_ns: int = 0
    ino: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256,
                "mtime_ns": self.mtime_ns, "ino": self.ino}

    def result(self) -> dict[str, Any]:
        """As a download job lists it."""
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass
class Entry:
    asset_id: str
    path: Path
    files: list[CachedFile]
    filled: bool
    """True when this use filled the entry (a fetch), False on a hit."""
    fetched: int = 0
    """The components this use fetched from the store (the others were here)."""
    fetched_bytes: int = 0


Fill = Callable[[Path, list[str]], Awaitable[list[dict[str, Any]]]]
"""Fetch the named components into the given directory, verified; the files ({name, size,
sha256})."""


class AssetCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        self._open_lock = anyio.Lock()
        self._fills: dict[str, tuple[anyio.Lock, int]] = {}
        self._pins: dict[str, int] = {}
        self._verified: set[str] = set()
        self._bytes = 0
        self._entries = 0

    def __repr__(self) -> str:
        return f"AssetCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ---- what callers ask ---------------------------------------------------------------

    def usable_for(self, asset: m.Asset, wanted: m.Asset | None = None) -> bool:
        """Whether a download of ``wanted`` (a selection of the asset's components; the
        whole asset by default) goes through the cache (else straight to its
        destination)."""
        total = sum(c.size or 0 for c in (wanted or asset).components)
        return (self.max_bytes > 0 and total <= self.max_bytes
                and _SAFE_ID.fullmatch(asset.asset_id) is not None
                and asset.asset_id not in (".", ".."))

    def stats(self) -> dict[str, Any]:
        return {"dir": str(self.root), "max_bytes": self.max_bytes, "bytes": self._bytes,
                "entries": self._entries}

    @asynccontextmanager
    async def use(self, asset: m.Asset, fill: Fill,
                  names: frozenset[str] | None = None) -> AsyncIterator[Entry]:
        """The asset's verified entry holding the components ``names`` (all by default),
        filled by ``fill`` with those it does not hold yet; the entry's ``files`` are those
        named. Held (never evicted) until the block ends. Concurrent uses of one asset wait
        for one fill."""
        await self.open()
        aid = asset.asset_id
        need = names if names is not None else frozenset(c.name for c in asset.components)
        lock = self._fill_lock(aid)
        try:
            async with lock:
                have = await anyio.to_thread.run_sync(self._lookup, asset,
                                                      aid not in self._verified)
                held = {f.name: f for f in have or []}
                missing = sorted(need - set(held))
                if missing:
                    sizes = {c.name: c.size or 0 for c in asset.components}
                    total = sum(f.size for f in held.values()) + sum(sizes[n] for n in missing)
                    busy = self._busy() - {aid}
                    fill_dir = await anyio.to_thread.run_sync(self._begin_fill, aid, total,
                                                              busy, have is not None)
                    files = await fill(fill_dir, missing)
                    entry = await anyio.to_thread.run_sync(
                        self._commit, aid, [f.to_json() for f in held.values()] + files)
                    entry.fetched = len(files)
                    entry.fetched_bytes = sum(int(f["size"]) for f in files)
                    log.info("cache: %s filled (%d file(s), %d bytes fetched%s)", aid,
                             entry.fetched, entry.fetched_bytes,
                             f"; {len(held)} file(s) were here" if held else "")
                else:
                    assert have is not None
                    entry = Entry(aid, self.root / "objects" / aid, have, filled=False)
                    log.info("cache: %s served from the cache", aid)
                entry.files = [f for f in entry.files if f.name in need]
                self._verified.add(aid)
                self._pins[aid] = self._pins.get(aid, 0) + 1
        finally:
            self._release_fill_lock(aid)
        try:
            yield entry
        finally:
            left = self._pins[aid] - 1
            if left:
                self._pins[aid] = left
            else:
                del self._pins[aid]

    async def adopt(self, asset_id: str, files: list[dict[str, Any]]) -> bool:
        """Keep the files an upload just finalized (or this node's part of an asset several
        nodes build) as the asset's entry: each
        ``{"name", "size", "sha256", "path"}`` is moved (renamed: no copy, so only from
        the same filesystem, e.g. a watcher's snapshot) into the cache. False when it
        cannot be (cache off or too small, an unsafe id, another filesystem, already
        cached); then nothing was moved, or what was is removed with the fill."""
        total = sum(int(f["size"]) for f in files)
        if (self.max_bytes <= 0 or total > self.max_bytes or not files
                or _SAFE_ID.fullmatch(asset_id) is None or asset_id in (".", "..")):
            return False
        await self.open()
        lock = self._fill_lock(asset_id)
        try:
            async with lock:  # no fill of this asset meanwhile; an entry already: no
                entry = await anyio.to_thread.run_sync(self._adopt, asset_id, files, total,
                                                       self._busy() - {asset_id})
        finally:
            self._release_fill_lock(asset_id)
        if entry is None:
            return False
        self._verified.add(asset_id)
        log.info("cache: %s kept from its upload (%d file(s), %d bytes)", asset_id,
                 len(files), total)
        return True

    def _adopt(self, aid: str, files: list[dict[str, Any]], total: int,
               busy: set[str]) -> Entry | None:
        with self._db_lock:
            known = self._conn().execute("SELECT 1 FROM entries WHERE asset_id = ?",
                                         (aid,)).fetchone()
        if known:
            return None
        dev = os.stat(self.root).st_dev
        if any(os.stat(f["path"]).st_dev != dev for f in files):
            return None
        fill_dir = self._begin_fill(aid, total, busy)
        try:
            for f in files:
                dst = fill_dir / f["name"]
                dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.rename(f["path"], dst)
            return self._commit(aid, files)
        except OSError as e:
            log.warning("cache: %s could not be kept from its upload: %s", aid, e)
            self._remove(aid)
            return None

    async def drop(self, asset_id: str) -> None:
        """Forget an asset (Chronicle says it is gone); not while it is in use."""
        if self.max_bytes <= 0 or _SAFE_ID.fullmatch(asset_id) is None:
            return
        await self.open()
        if asset_id in self._busy():
            return
        await anyio.to_thread.run_sync(self._remove, asset_id)

    async def materialize(self, entry: Entry, staging: str,
                          on_bytes: Callable[[int], None],
                          ident: Identity | None = None) -> list[dict[str, Any]]:
        """Put the entry's files under ``staging``, which is written with ``ident``'s
        rights (agent.fsid): hardlinks when that is the daemon itself, else copies the
        caller owns, read from descriptors the daemon opens on its own cache (the caller
        cannot reach the cache, and a hardlink would share the cache's owner)."""
        link = ident is None or ident.is_daemon
        for f in entry.files:
            src = str(entry.path / f.name)
            dst = os.path.join(staging, *f.name.split("/"))
            linked = await run_as(ident, _link_or_prepare, src, dst, f.size, link)
            if linked is None:
                on_bytes(f.size)
                continue
            done = linked
            on_bytes(done)
            sfd = await anyio.to_thread.run_sync(os.open, src, os.O_RDONLY | os.O_CLOEXEC)
            try:
                while done < f.size:
                    n = await run_bulk(call_as, ident, _copy_chunk, sfd, src, dst, done,
                                       min(COPY_CHUNK_BYTES, f.size - done))
                    done += n
                    on_bytes(n)
            finally:
                os.close(sfd)
        await anyio.to_thread.run_sync(self._touch, entry.asset_id)
        return [f.result() for f in entry.files]

    # ---- locks and pins (event loop only) -------------------------------------------------

    def _fill_lock(self, aid: str) -> anyio.Lock:
        lock, users = self._fills.get(aid, (anyio.Lock(), 0))
        self._fills[aid] = (lock, users + 1)
        return lock

    def _release_fill_lock(self, aid: str) -> None:
        lock, users = self._fills[aid]
        if users <= 1:
            del self._fills[aid]
        else:
            self._fills[aid] = (lock, users - 1)

    def _busy(self) -> set[str]:
        return set(self._fills) | set(self._pins)

    # ---- the index and the files (worker threads) -----------------------------------------

    async def open(self) -> None:
        if self._db is not None:
            return
        async with self._open_lock:
            if self._db is None:
                await anyio.to_thread.run_sync(self._open)

    def _open(self) -> None:
        for sub in ("objects", "fill", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        db = sqlite3.connect(self.root / "index.db", isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(SCHEMA)
        self._db = db
        self._reconcile()

    def _reconcile(self) -> None:
        """After a start: rows without files go, files without rows go, half-removed
        entries in trash/ go."""
        with self._db_lock:
            rows = {r[0]: r[1] for r in self._conn().execute(
                "SELECT asset_id, state FROM entries")}
        for aid, state in rows.items():
            if state == "ready" and not (self.root / "objects" / aid).is_dir():
                self._remove(aid)
        for sub, state in (("objects", "ready"), ("fill", "filling")):
            for d in (self.root / sub).iterdir():
                if rows.get(d.name) != state:
                    self._trash(d)
        for d in (self.root / "trash").iterdir():
            shutil.rmtree(d, ignore_errors=True)
        self._recount()

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    def _recount(self) -> None:
        with self._db_lock:
            n, total = self._conn().execute(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM entries").fetchone()
        self._entries, self._bytes = int(n), int(total)

    def _trash(self, path: Path) -> None:
        """Remove a directory: renamed out of sight first, so a half-removed entry is never
        taken for one."""
        target = self.root / "trash" / secrets.token_hex(8)
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        shutil.rmtree(target, ignore_errors=True)

    def _remove(self, aid: str) -> None:
        with self._db_lock:
            self._conn().execute("DELETE FROM entries WHERE asset_id = ?", (aid,))
        for sub in ("objects", "fill"):
            self._trash(self.root / sub / aid)
        self._verified.discard(aid)
        self._recount()

    def _touch(self, aid: str) -> None:
        with self._db_lock:
            self._conn().execute("UPDATE entries SET last_used = ? WHERE asset_id = ?",
                                 (time.time(), aid))

    def _lookup(self, asset: m.Asset, rehash: bool) -> list[CachedFile] | None:
        aid = asset.asset_id
        with self._db_lock:
            row = self._conn().execute(
                "SELECT manifest FROM entries WHERE asset_id = ? AND state = 'ready'",
                (aid,)).fetchone()
        if row is None:
            return None
        files = [CachedFile(**f) for f in json.loads(row[0])]
        path = self.root / "objects" / aid
        problem = _check(asset, files, path, rehash)
        if problem:
            log.warning("cache: entry %s dropped: %s", aid, problem)
            self._remove(aid)
            return None
        self._touch(aid)
        return files

    def _begin_fill(self, aid: str, total: int, busy: set[str], keep: bool = False) -> Path:
        """A fill directory for ``aid`` (``keep``: holding the entry's verified files, which
        the fill adds to), once the cache has room for ``total`` bytes of it."""
        now = time.time()
        with self._db_lock:
            db = self._conn()
            db.execute(
                "INSERT INTO entries (asset_id, state, bytes, manifest, last_used, created_at) "
                "VALUES (?, 'filling', ?, '[]', ?, ?) ON CONFLICT (asset_id) DO UPDATE SET "
                "state = 'filling', bytes = excluded.bytes, last_used = excluded.last_used",
                (aid, total, now, now))
            others = db.execute(
                "SELECT asset_id, bytes FROM entries WHERE asset_id != ? ORDER BY last_used",
                (aid,)).fetchall()
        fill_dir = self.root / "fill" / aid
        if keep and not fill_dir.exists():
            os.rename(self.root / "objects" / aid, fill_dir)
        self._trash(self.root / "objects" / aid)  # a stale copy, if any
        used = total + sum(b for _, b in others)
        for other, size in others:
            if used <= self.max_bytes:
                break
            if other in busy:
                continue
            log.info("cache: evicting %s (%d bytes, least recently used)", other, size)
            self._remove(other)
            used -= size
        if used > self.max_bytes:
            log.warning("cache: %d bytes over its cap of %d while entries are in use",
                        used - self.max_bytes, self.max_bytes)
        fill_dir.mkdir(exist_ok=True, mode=0o700)
        self._recount()
        return fill_dir

    def _commit(self, aid: str, fetched: list[dict[str, Any]]) -> Entry:
        fill_dir = self.root / "fill" / aid
        files = []
        for f in fetched:
            p = fill_dir / f["name"]
            st = p.stat()
            if st.st_nlink == 1:  # never the mode of a file linked elsewhere (a snapshot's)
                os.chmod(p, 0o444)
            files.append(CachedFile(f["name"], int(f["size"]), str(f["sha256"]),
                                    st.st_mtime_ns, st.st_ino))
        final = self.root / "objects" / aid
        self._trash(final)
        os.rename(fill_dir, final)
        with self._db_lock:
            self._conn().execute(
                "UPDATE entries SET state = 'ready', manifest = ?, bytes = ?, last_used = ? "
                "WHERE asset_id = ?",
                (json.dumps([f.to_json() for f in files]), sum(f.size for f in files),
                 time.time(), aid))
        self._recount()
        return Entry(aid, final, files, filled=True)


def _check(asset: m.Asset, files: list[CachedFile], path: Path, rehash: bool) -> str | None:
    """Why the entry cannot serve ``asset`` (None: it can)."""
    want = {c.name: c for c in asset.components}
    if not {f.name for f in files} <= set(want):
        return "it holds files that are not the asset's components"
    for f in files:
        c = want[f.name]
        if (c.size is not None and c.size != f.size) or (c.sha256 and c.sha256 != f.sha256):
            return f"{f.name}: size or SHA-256 differs from the asset's"
        try:
            st = (path / f.name).stat()
        except OSError as e:
            return f"{f.name}: {e.strerror}"
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (f.size, f.mtime_ns, f.ino):
            return f"{f.name} was changed on disk"
        if rehash and _sha256(path / f.name) != f.sha256:
            return f"{f.name}: SHA-256 no longer matches"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _link_or_prepare(src: str, dst: str, size: int, link: bool = True) -> int | None:
    """Hardlink ``src`` at ``dst`` (None: done), else the bytes of ``dst`` already copied
    by an earlier attempt (the copy goes on from there)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        st = os.stat(dst)
    except FileNotFoundError:
        if not link:
            _create(dst)
            return 0
        try:
            os.link(src, dst)
            return None
        except OSError as e:
            if is_disk_full(e):
                raise DiskFull(f"no space left on device linking {dst}") from None
            if e.errno not in _NO_LINK_ERRNOS:
                raise
        _create(dst)
        return 0
    if link and os.path.samestat(st, os.stat(src)):
        return None
    if st.st_size > size:
        os.truncate(dst, 0)
        return 0
    return st.st_size


def _create(dst: str) -> None:
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(f"no space left on device creating {dst}") from None
        raise
    os.close(fd)


def _copy_chunk(sfd: int, src: str, dst: str, offset: int, count: int) -> int:
    """Copy ``count`` bytes at ``offset`` of ``src`` (open as ``sfd``) into ``dst`` (in the
    kernel where it can); the bytes copied. ENOSPC → DiskFull, with ``dst`` cut back to what
    is whole."""
    dfd = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
    try:
        done = 0
        try:
            while done < count:
                n = _copy_some(sfd, dfd, offset + done, count - done)
                if n == 0:
                    raise OSError(errno.EIO, f"{src} is shorter than expected")
                done += n
        except OSError as e:
            if is_disk_full(e):
                os.ftruncate(dfd, offset + done)
                raise DiskFull(
                    f"no space left on device copying into {dst} "
                    f"({offset + done} bytes in place)") from None
            raise
        return done
    finally:
        os.close(dfd)


def _copy_some(sfd: int, dfd: int, at: int, count: int) -> int:
    try:
        return os.copy_file_range(sfd, dfd, count, at, at)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    data = os.pread(sfd, min(count, HASH_CHUNK_BYTES), at)
    written = 0
    while written < len(data):
        written += os.pwrite(dfd, data[written:], at + written)
    return written
