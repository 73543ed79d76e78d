"""The storage sweep: what failures left in storage is found and removed.

Abandoning or deleting an asset releases its storage at once (:func:`agent.server.assets.
release_storage`); when that does not reach storage (the store down, the server killed
between the row and the bytes) or a registration dies before its row is written, bytes and
multipart uploads stay behind that no row accounts for. The sweep lists everything the store
holds under the server's own prefixes (:data:`agent.server.storage.SWEPT_PREFIXES`, so a
shared bucket keeps the rest), looks each item's asset up and removes:

- objects and uploads of an abandoned asset, or of an asset with no row (deleted, or never
  registered);
- objects of a ready asset that are not its components' bytes (an upload key copied at
  finalize, a late PUT), and its uploads;
- multipart uploads of a pending asset that none of its components names (re-planned, or a
  registration that failed);
- the disk store's files it cannot name (a crash between a file and its record, bodies cut
  short) and the start-up probe's objects.

Never a pending asset's objects or the uploads its components name, never a ready asset's
component bytes. Nothing written less than ``server.gc_grace_s`` ago is removed (a
registration in flight has objects before its row); an empty object under ``assets/`` may be
the tombstone that keeps a deleted key taken (see :func:`agent.server.assets._drop`) and
stays until every upload URL that could write it has expired (``url_expiry_s`` more).

Crash-safe: the sweep keeps no state of its own. Each batch is looked at again, under its
assets' locks (register, finalize, abandon and delete take them), right before it is
removed, and a sweep cut short leaves only garbage for the next one. Totals go to the
database's counters (``/metrics``); each removal is logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Settings
from agent.errors import ConfigError

from . import db
from .app import Core
from .assets import asset_of_key, expire_idle, final_key, upload_key
from .auth import TokenStore
from .db import Database
from .signing import Signer
from .storage import OWNERS_PREFIX, Stored, open_storage

if TYPE_CHECKING:
    from agent.crashpoints import CrashPoints

log = logging.getLogger(__name__)

BATCH = 100
"""Items re-checked and removed together (one DeleteObjects on S3)."""


@dataclass(frozen=True)
class Removal:
    item: Stored
    asset_id: str | None
    reason: str
    age_s: float

    def to_json(self) -> dict[str, Any]:
        return {**self.item.to_json(), "asset_id": self.asset_id, "reason": self.reason,
                "age_s": round(self.age_s, 1)}


@dataclass
class SweepReport:
    dry_run: bool
    grace_s: float
    objects_seen: int = 0
    uploads_seen: int = 0
    removed: list[Removal] = field(default_factory=list)
    too_recent: int = 0
    """Items that would be removed but were written within the grace period."""
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_removed(self) -> int:
        return sum(r.item.size for r in self.removed if r.item.kind == "object")

    def counts(self) -> dict[str, int]:
        objects = sum(1 for r in self.removed if r.item.kind == "object")
        return {"gc_sweeps": 1, "gc_objects_removed": objects,
                "gc_uploads_aborted": len(self.removed) - objects,
                "gc_bytes_removed": self.bytes_removed, "gc_errors": len(self.errors)}

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "grace_s": self.grace_s,
                "objects_seen": self.objects_seen, "uploads_seen": self.uploads_seen,
                "removed": [r.to_json() for r in self.removed],
                "bytes_removed": self.bytes_removed, "too_recent": self.too_recent,
                "errors": self.errors, "seconds": round(self.seconds, 3)}


def verdict(item: Stored, holding: db.Holding | None) -> str | None:
    """Why ``item`` is garbage (whatever its age), or None if it is kept.

    ``holding``: its asset's row, None when there is none."""
    key = item.key
    if key is None:
        return "a file the store holds no record of (a write cut short)"
    asset_id = asset_of_key(key)
    if asset_id is None:
        return "not a component's key (a probe or stray object)"
    if holding is None:
        return "no asset row (deleted, or its registration failed)"
    if holding.state == "pending":
        if item.kind == "object" or item.ref in holding.upload_ids:
            return None
        return "a multipart upload no component of the pending asset names"
    if holding.state == "abandoned":
        return "asset abandoned"
    if item.kind == "object" and key in holding.object_keys:
        return None
    return ("not the bytes of the ready asset" if item.kind == "object"
            else "a multipart upload of a ready asset")


IN_FLIGHT_S = 600.0
"""What the store holds no record of yet may be a write in progress (a body being received,
an upload being made): it goes only once this old, whatever the grace period."""


def _limit(item: Stored, grace_s: float, url_expiry_s: float) -> float:
    """How old garbage must be to go: a possible tombstone outlives every upload URL."""
    if item.kind == "object" and item.size == 0 and (item.key or "").startswith("assets/"):
        return grace_s + url_expiry_s
    if item.key is None:
        return max(grace_s, IN_FLIGHT_S)
    return grace_s


class _Shared(Exception):
    pass


class SweepBusy(Exception):
    """Another sweep holds the state dir's sweep lock."""


@contextlib.contextmanager
def sweep_lock(state_dir: Path) -> Iterator[None]:
    """One sweep at a time per state dir, between processes (the server's periodic one and
    ``chronicle-agent server gc``): raises SweepBusy when taken."""
    fd = os.open(state_dir / "gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepBusy(f"a storage sweep of {state_dir} is running") from None
        yield
    finally:
        os.close(fd)


class _Names:
    """The disk store names a file by its key's hash: for files whose record is lost, the
    keys the database knows, by that name (read once per sweep, when first needed)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._by_ref: dict[str, str] | None = None

    async def name(self, item: Stored) -> Stored:
        if item.key is not None or item.kind != "object":
            return item
        if self._by_ref is None:
            keys = await self.core.db.read(db.component_keys)
            ref_of = self.core.storage.ref_of
            self._by_ref = {ref_of(k): k for key in keys
                            for k in (key, upload_key(key), final_key(key))}
        key = self._by_ref.get(item.ref)
        return item if key is None else Stored(item.kind, key, item.ref, item.size,
                                               item.modified)


async def sweep_storage(core: Core, *, dry_run: bool = False, grace_s: float | None = None,
                        crash: CrashPoints | None = None) -> SweepReport:
    """One sweep (see the module's doc). ``grace_s``: ``server.gc_grace_s`` unless given."""
    cfg = core.config
    grace = cfg.gc_grace_s if grace_s is None else grace_s
    report = SweepReport(dry_run=dry_run, grace_s=grace)
    names = _Names(core)
    t0 = time.monotonic()
    batch: list[Stored] = []

    async def flush() -> None:
        try:
            await _remove(core, batch, report, grace, dry_run)
        except Exception as e:  # the store down: the rest waits for the next sweep
            report.errors.append(str(e))
            log.warning("storage sweep: could not remove %d item(s): %s", len(batch), e)
        batch.clear()
        if crash is not None and not dry_run:
            crash.hit("gc_removed")

    try:
        others = await core.storage.claim(core.server_id) if core.server_id else []
        if others:
            raise _Shared(f"{core.storage.description} is also used by other local "
                          f"server(s) ({', '.join(others)}): what this server's database does "
                          "not know is theirs, so nothing is removed; give each server its "
                          f"own store, or remove {OWNERS_PREFIX}<id> there if that server and "
                          "its database are gone for good")
        async for page in _pages(core, report):
            page = [await names.name(i) for i in page]
            ids = {a for i in page if i.key and (a := asset_of_key(i.key))}
            held = await core.db.read(db.holdings, ids, {i.key for i in page if i.key})
            now = time.time()
            for item in page:
                asset_id = asset_of_key(item.key) if item.key else None
                holding = held.get(asset_id) if asset_id else None
                why = verdict(item, holding)
                if why is None:
                    continue
                if now - item.modified <= _limit(item, grace, cfg.url_expiry_s):
                    report.too_recent += 1
                    continue
                batch.append(item)
                if len(batch) >= BATCH:
                    await flush()
        if batch:
            await flush()
    except _Shared as e:
        report.errors.append(str(e))
    except Exception as e:
        report.errors.append(f"listing storage: {e}")
        log.warning("storage sweep stopped: listing %s failed: %s", core.storage.description, e)
    report.seconds = time.monotonic() - t0
    if not dry_run:
        await core.db.write(db.add_counters, report.counts(),
                            {"gc_last_sweep_timestamp_seconds": int(time.time())})
    _log_summary(core, report)
    return report


async def _pages(core: Core, report: SweepReport) -> AsyncIterator[list[Stored]]:
    async for page in core.storage.inventory():
        for item in page:
            if item.kind == "object":
                report.objects_seen += 1
            else:
                report.uploads_seen += 1
        yield page


async def _remove(core: Core, batch: list[Stored], report: SweepReport,
                  grace: float, dry_run: bool) -> None:
    """Look at ``batch`` again under its assets' locks, then remove what is still garbage."""
    ids = sorted({a for i in batch if i.key and (a := asset_of_key(i.key))})
    async with contextlib.AsyncExitStack() as locks:
        for asset_id in ids:  # sorted: two sweeps never wait on each other crosswise
            await locks.enter_async_context(core.asset_locks.hold(asset_id))
        held = await core.db.read(db.holdings, ids, {i.key for i in batch if i.key})
        now = time.time()
        gone: list[Removal] = []
        for item in batch:
            owner = asset_of_key(item.key) if item.key else None
            holding = held.get(owner) if owner else None
            why = verdict(item, holding)
            if why is not None and now - item.modified > _limit(
                    item, grace, core.config.url_expiry_s):
                gone.append(Removal(item, owner, why, now - item.modified))
        if not dry_run and gone:
            await core.storage.remove([r.item for r in gone])
    report.removed += gone
    for r in gone:
        log.info("storage sweep: %s %s %s (%d bytes): %s",
                 "would remove" if dry_run else "removed",
                 "upload" if r.item.kind == "upload" else "object",
                 r.item.key or r.item.ref, r.item.size, r.reason)


def _log_summary(core: Core, report: SweepReport) -> None:
    objects = sum(1 for r in report.removed if r.item.kind == "object")
    uploads = len(report.removed) - objects
    line = (f"storage sweep of {core.storage.description}: "
            f"{'would remove' if report.dry_run else 'removed'} {objects} object(s) "
            f"({report.bytes_removed} bytes) and {uploads} multipart upload(s) of "
            f"{report.objects_seen} object(s) and {report.uploads_seen} upload(s) seen, "
            f"{report.too_recent} left for now (written within {report.grace_s:g}s), "
            f"in {report.seconds:.2f}s")
    if report.errors:
        log.warning("%s; %d error(s), the next sweep tries again: %s", line,
                    len(report.errors), report.errors[0])
    elif report.removed:
        log.info("%s", line)
    else:
        log.debug("%s", line)


async def housekeeping(core: Core, state_dir: Path) -> None:
    """The server's periodic work: pending assets past their TTL every
    ``server.sweep_interval_s``, the storage sweep every ``server.gc_interval_s`` (skipped
    while ``chronicle-agent server gc`` runs). A failure is logged, the next round tries
    again."""
    cfg = core.config
    next_gc = time.monotonic() + cfg.gc_interval_s
    while True:
        await asyncio.sleep(min(cfg.sweep_interval_s, cfg.gc_interval_s or cfg.sweep_interval_s))
        try:
            await expire_idle(core)
        except Exception:
            log.exception("expiring idle pending assets failed; trying again in %gs",
                          cfg.sweep_interval_s)
        if not cfg.gc_interval_s or time.monotonic() < next_gc:
            continue
        next_gc = time.monotonic() + cfg.gc_interval_s
        try:
            with sweep_lock(state_dir):
                await sweep_storage(core, crash=core.crash)
        except SweepBusy as e:
            log.info("%s; this round's sweep is skipped", e)
        except Exception:
            log.exception("storage sweep failed; trying again in %gs", cfg.gc_interval_s)


async def sweep_state_dir(settings: Settings, *, dry_run: bool,
                          grace_s: float | None = None) -> SweepReport:
    """``chronicle-agent server gc``: one sweep of ``server.state_dir``'s storage from this
    process, beside a running server or not (the store is only listed and deleted from;
    the database is read, and its counters added to)."""
    cfg = settings.server
    state_dir = settings.server_state_dir()
    if not (state_dir / "server.db").is_file():
        raise ConfigError(f"{state_dir} holds no local server (no server.db): set "
                          "server.state_dir or --state-dir")
    pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="server-gc")
    try:
        with sweep_lock(state_dir):
            signer = await asyncio.get_running_loop().run_in_executor(
                pool, Signer.load_or_create, state_dir / "signing.key")
            storage = open_storage(cfg.storage, state_dir, signer, pool)
            database = Database(state_dir / "server.db")
            await database.open()
            try:
                await storage.start("", serving=False)
                try:
                    core = Core(cfg, database, storage, TokenStore(state_dir / "tokens.json"),
                                "", "", server_id=signer.identity)
                    return await sweep_storage(core, dry_run=dry_run, grace_s=grace_s)
                finally:
                    await storage.close()
            finally:
                await database.close()
    finally:
        pool.shutdown(wait=False)
