"""Uploading one asset: register → PUT each component (whole or in parts) → finalize.

Every step with a remote side effect is made durable before the next one starts, so a
restart resumes from the last one:

- the registration's Idempotency-Key is in the asset row before the request is sent, and
  the returned asset id is stored as soon as it arrives;
- each part's ETag is stored the moment storage acknowledges it; a restart re-sends only
  the parts without one (after reconciling with Chronicle's ``uploads`` listing when local
  state may be behind the store);
- a component is marked uploaded, with its SHA-256, once all its bytes are in;
- finalize carries an Idempotency-Key derived from the registration's, so repeating it after
  a crash is harmless.

Presigned URLs are kept in memory only (they are credentials); after a restart fresh ones
are asked for. Integrity: a single PUT is hashed in the same read pass that streams it; a
multipart component is hashed by one sequential pass over the file that runs beside the
part uploads (see docs/integrity.md). A file whose size, mtime or inode changes after it
was registered is never finalized: the job fails with ``source_changed``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Literal

import aiohttp
import anyio
import anyio.to_thread

from agent.access import open_source, within_roots
from agent.chronicle import contract
from agent.chronicle import models as m
from agent.chronicle.aio import AsyncChronicle
from agent.config import Settings
from agent.crashpoints import CrashPoints
from agent.errors import (
    ChronicleError,
    RetryableError,
    SourceChanged,
    TransferError,
    UrlExpired,
    UsageError,
)
from agent.fsid import Identity, Refused, call_as, thread_uid
from agent.metrics import Metrics
from agent.priority import run_bulk
from agent.queue.aqueue import AsyncQueue, Batched
from agent.queue.states import AssetState
from agent.queue.store import AssetRecord, ComponentRecord, PartRecord
from agent.transfer import rawget
from agent.transfer.groups import one_error
from agent.transfer.http import (
    Opener,
    create_only,
    hash_file,
    put_file,
    put_file_sendfile,
    redact,
)
from agent.transfer.limits import Limits
from agent.transfer.primitives import check_component_name, classify_storage_answer
from agent.transfer.retry import RetryPolicy

log = logging.getLogger(__name__)


DIGEST_BATCH_BYTES = 8 << 20
"""Small files hashed per worker-thread call before register (API 1.1 ``checksum_urls``)."""
FIRST_DECLARED = 64
"""Small files declared at register when the rest can be declared later (API 1.1
``asset_keys``); the later batches grow fourfold each, up to :data:`MAX_DECLARED`."""
MAX_DECLARED = 4096
SMALL_RUN_FILES = 32
"""Small files PUT one after another in one worker-thread call (and at most
``upload.chunk_bytes`` of them)."""


def url_use_by(expires_at: str | None, now: float | None = None) -> float:
    """When to stop using URLs that expire at ``expires_at`` (RFC 3339): a quarter of their
    lifetime, at most a minute, before it ends. Unknown expiry: never (the store's 403
    "Request has expired" still triggers a refresh)."""
    if not expires_at:
        return math.inf
    try:
        end = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.inf
    now = time.time() if now is None else now
    return end - min(60.0, max(0.0, end - now) / 4)


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


@dataclass
class Stat:
    size: int
    mtime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, path: str) -> Stat:
        """A source file's identity, looked at in this thread's identity (agent.fsid)."""
        try:
            st = os.stat(path)
        except PermissionError:
            raise Refused(f"{path}: you (uid {thread_uid()}) cannot reach it, so the daemon "
                          "will not upload it for you") from None
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def changed_message(comp: ComponentRecord, st: Stat | None) -> str | None:
    """Why ``st`` is not the version of the file that was registered, or None."""
    if st is None:
        return f"{comp.path} was deleted after it was registered as component {comp.name!r}"
    if (st.size, st.mtime_ns, st.ino) != (comp.size, comp.mtime_ns, comp.ino):
        return (f"{comp.path} changed after it was registered as component {comp.name!r} "
                f"(size {comp.size} -> {st.size}, mtime or inode changed): not finalizing "
                "mixed bytes")
    return None


def read_registered(comp: ComponentRecord, buf: bytearray, opener: Opener) -> memoryview:
    """Read a small component whole into ``buf`` (in a thread) and make sure the bytes are
    the registered version's: the open file's size, mtime and inode before and after the
    read must match what was registered. ``buf`` holds at least one byte more than the
    registered size, so that a file that grew shows."""
    assert comp.path is not None
    try:
        fd = opener(comp.path)
    except FileNotFoundError:
        raise SourceChanged(changed_message(comp, None) or "") from None

    def check() -> None:
        st = os.fstat(fd)
        why = changed_message(comp, Stat(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
        if why:
            raise SourceChanged(why)

    try:
        check()
        n = os.preadv(fd, [memoryview(buf)[:(comp.size or 0) + 1]], 0)
        data = memoryview(buf)[:n]
        check()  # a rewrite during the read shows here
        if len(data) != comp.size:
            raise SourceChanged(f"{comp.path} changed while it was read ({len(data)} bytes, "
                                f"registered {comp.size}): not finalizing mixed bytes")
        return data
    finally:
        os.close(fd)


def check_declared(comp: ComponentRecord, sha: str) -> str:
    """``sha`` (of the bytes just read), if it is the digest declared at register."""
    if comp.sha256 and sha != comp.sha256:  # same size, time and inode
        raise SourceChanged(
            f"{comp.path} changed after it was registered as component {comp.name!r} (its "
            "SHA-256 differs from the one declared): not finalizing mixed bytes")
    return sha


def bound_digest(headers: dict[str, str] | None) -> str | None:
    """The SHA-256 (hex) that a checksum-bound URL's headers make the store check, if any."""
    for k, v in (headers or {}).items():
        if k.lower() == contract.CHECKSUM_HEADER:
            return contract.checksum_of(v)
    return None


def registered_sha256(comp: ComponentRecord, buf: bytearray, opener: Opener) -> str:
    """The SHA-256 of a small component's registered version (:func:`read_registered`)."""
    return hashlib.sha256(read_registered(comp, buf, opener)).hexdigest()


def scan_path(path: str, roots: list[str] | None = None) -> list[dict[str, Any]]:
    """The components of a file or directory upload (runs in a worker thread, with the
    rights of the job's owner: agent.fsid). A single file is named by its base name; a
    directory's files by their path relative to it. Symlinks are followed only when they
    stay inside the directory. Each file is opened later, by descriptor, with the same
    rights and checked against ``roots`` again as opened."""
    if not os.path.isabs(path):
        raise UsageError(f"path must be absolute: {path!r}")
    if not os.path.lexists(path):
        raise UsageError(f"no such file or directory: {path}")
    if roots:
        within_roots(os.path.realpath(path), roots, "path")
    if os.path.isfile(path):
        st = Stat.of(path)
        return [{"name": check_component_name(os.path.basename(path)), "path": path,
                 "size": st.size, "mtime_ns": st.mtime_ns, "ino": st.ino, "dev": st.dev}]
    if not os.path.isdir(path):
        raise UsageError(f"not a regular file or directory: {path}")
    root = os.path.realpath(path)
    out: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(path, onerror=_raise):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            real = os.path.realpath(full)
            if os.path.islink(full) and os.path.commonpath([root, real]) != root:
                raise UsageError(f"symlink leaves the uploaded directory: {full} -> {real}")
            if not os.path.isfile(full):
                continue  # sockets, fifos, dangling links
            os.close(open_source(full, []))  # the owner can read it (names it if not)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            st = Stat.of(full)
            out.append({"name": check_component_name(rel), "path": full, "size": st.size,
                        "mtime_ns": st.mtime_ns, "ino": st.ino, "dev": st.dev})
    if not out:
        raise UsageError(f"directory has no files to upload: {path}")
    return out


def _raise(e: OSError) -> None:
    raise UsageError(f"cannot read {e.filename}: {e.strerror}")


@dataclass
class Progress:
    """Bytes moved for one job, kept in memory and shown by the API."""

    bytes_done: int = 0
    on_change: Callable[[int], None] | None = None

    def add(self, n: int) -> None:
        self.bytes_done += n
        if self.on_change is not None:
            self.on_change(n)


@dataclass
class Plan:
    """Where a component's bytes go: one URL, or parts."""

    part_size: int | None = None
    url: str | None = None
    part_urls: dict[int, str] = field(default_factory=dict)
    headers: dict[str, str] | None = None
    """What a checksum-bound URL must be sent with (API 1.1 ``checksum_urls``)."""


class BufferPool:
    """Reused buffers for reading small files whole: as many as are in use at once (one per
    transfer slot at most), instead of a fresh allocation per file, which glibc's malloc
    kept around in its worker-thread arenas after use."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[bytearray] = []

    @contextmanager
    def take(self) -> Iterator[bytearray]:
        buf = self._free.pop() if self._free else bytearray(self.size)
        try:
            yield buf
        finally:
            self._free.append(buf)


class Engine:
    """What every transfer shares: the queue, Chronicle, the HTTP session for storage, the
    global limits, metrics and crash points."""

    def __init__(
        self,
        settings: Settings,
        queue: AsyncQueue,
        chronicle: AsyncChronicle,
        session: aiohttp.ClientSession,
        limits: Limits,
        metrics: Metrics,
        crash: CrashPoints,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.chronicle = chronicle
        self.session = session
        self.limits = limits
        self.metrics = metrics
        self.crash = crash
        up = settings.upload
        self.retry = RetryPolicy(up.max_attempts, up.backoff_base_s, up.backoff_max_s)
        self._known_runs: set[str] = set()
        # One component never takes every transfer slot: others' jobs keep a way in.
        self.parts_per_component = max(1, up.concurrency - up.concurrency // 4)
        self.small_buffers = BufferPool(up.chunk_bytes + 1)
        self.pool = rawget.Pool(up.connect_timeout_s)
        """Keep-alive connections of the direct paths (agent.transfer.rawget): downloads'
        GETs and small files' PUTs."""
        self._features: frozenset[str] | None = None
        self.warned_no_joins = False
        """Whether the log said that Chronicle cannot join several nodes' parts."""
        self.uploaded = Batched(queue, queue.s.mark_uploaded)
        """Components recorded as uploaded, many to a transaction when they finish
        together (a directory of small files)."""

    async def features(self) -> frozenset[str]:
        """The API 1.1 features Chronicle advertises in ``/v1/health`` (asked once; a
        server without them is said once in the log, and version 1 is used with it)."""
        if self._features is None:
            found = contract.features_of(await self.chronicle.send(contract.health()))
            if "checksum_urls" not in found:
                log.info("Chronicle offers no checksum-bound upload URLs (API 1.1 "
                         "checksum_urls): small files are verified by Chronicle after upload")
            self._features = found
        return self._features

    async def ensure_run(self, run_id: str | None, token: str | None = None) -> None:
        if run_id and run_id not in self._known_runs:
            await self.chronicle.send(contract.create_run(run_id), token=token)
            self._known_runs.add(run_id)

    def part_acked(self) -> None:
        self.crash.hit("after_part")

    def component_done(self) -> None:
        self.crash.hit("after_component")


def caller_token(cred_id: str | None, token: str | None, what: str) -> str | None:
    """The token to send for work made with a caller's own credential ``cred_id`` (None:
    the daemon's own); the work fails, never falls back to the daemon's, when that
    credential is gone."""
    if cred_id is not None and token is None:
        raise ChronicleError(
            401, "credential_gone",
            f"{what} was made with its caller's own Chronicle token, which the daemon no "
            "longer holds; retry it with your token set (CHRONICLE_AGENT_CHRONICLE__TOKEN or "
            "chronicle.token_file) and the daemon uses that one")
    return token


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
NODES_DIR = ".chronicle-nodes"
"""Where a multi-node checkpoint's asset names its nodes (docs/multinode.md): an empty
component ``.chronicle-nodes/<rank>`` (``<rank>.index`` on the node holding the index) per
node, added once that node's files are uploaded; on a Chronicle without ``asset_keys``,
``.chronicle-nodes/<checkpoint>/<rank>`` in each node's own asset, declared at register."""


def node_marker(join: dict[str, Any], has_index: bool = False) -> str:
    rank = join.get("node_rank")
    return f"{NODES_DIR}/{rank if rank is not None else socket.gethostname()}" + (
        ".index" if has_index else "")


def part_marker(key: str, rank: object) -> str:
    """The marker naming one node's part of checkpoint ``key`` as an asset of its own (a
    Chronicle without ``asset_keys``): ``.chronicle-nodes/<checkpoint>/<rank>``, so that the
    parts of every step can be told apart, and node 0 can tell when all of them are there."""
    return f"{NODES_DIR}/{key}/{rank if rank is not None else socket.gethostname()}"


def own_part_marker(join: dict[str, Any]) -> str:
    return part_marker(str(join["key"]), join.get("node_rank"))


def marker_decl(name: str) -> m.ComponentDecl:
    """A node marker as declared: empty, its digest bound where the server binds them."""
    return m.ComponentDecl(name=name, size=0, sha256=EMPTY_SHA256)


class AssetUpload:
    """Drives one local asset record to ``ready``."""

    def __init__(
        self, engine: Engine, asset: AssetRecord, progress: Progress, token: str | None = None,
        *, reader: Identity | None | Literal["owner"] = "owner",
        join: dict[str, Any] | None = None,
    ) -> None:
        """``reader``: whose rights the source files are opened with: by default the
        asset's owner (uid, and ``gid`` from its job); None only for the daemon's own
        private staging area. ``join``: this node's part of a checkpoint several nodes
        write (:mod:`agent.transfer.joined`)."""
        self.join = join
        self.e = engine
        self.q = engine.queue
        self.asset = asset
        self.progress = progress
        self.token = token if token is not None else caller_token(
            asset.cred_id, asset.token, f"asset {asset.asset_id or asset.asset_key}")
        self.plans: dict[str, Plan] = {}
        self.use_by: dict[str, float] = {}
        """Presigned URL → the time after which it is refreshed before use."""
        self._refresh_lock = anyio.Lock()
        self.reader = Identity.of(asset.uid) if reader == "owner" else reader
        self.open_src: Opener = partial(call_as, self.reader, open_source,
                                        roots=[str(r) for r in engine.settings.agent.roots]
                                        if self.reader is not None else [])

    async def stat_src(self, path: str) -> Stat:
        """The source file's identity, looked at with the reader's rights."""
        return await anyio.to_thread.run_sync(call_as, self.reader, Stat.of, path)

    @property
    def asset_id(self) -> str:
        assert self.asset.asset_id is not None
        return self.asset.asset_id

    # ---- register ----------------------------------------------------------------------

    async def ensure_registered(self) -> bool:
        """Register with Chronicle unless already done; True if this call registered it."""
        if self.asset.asset_id is not None:
            return False
        comps = await self.q.do(self.q.s.components, self.asset.asset_key)
        await self.e.ensure_run(self.asset.run_id, self.token)
        # sent before, by a daemon that died
        replay = self.asset.state == AssetState.REGISTERING
        features = await self.e.features()
        later = self._declared_later(comps, features, replay)
        first = [c for c in comps if c.name not in later]
        if not replay and "checksum_urls" in features:
            await self._declare_digests(first)
        decl = [m.ComponentDecl(name=c.name, size=c.size, content_type=c.content_type,
                                sha256=c.sha256) for c in first]
        if self.own_part(features):
            assert self.join is not None
            decl.append(marker_decl(own_part_marker(self.join)))
        self.e.crash.hit("before_register")
        if not replay:
            await self.q.do(self.q.s.set_asset, self.asset.asset_key,
                            state=AssetState.REGISTERING)
            self.asset.state = AssetState.REGISTERING
        urls = await self.e.chronicle.send(
            contract.register(
                self.asset.asset_type, decl, output_of=self.asset.run_id,
                visibility=self.asset.visibility, idempotency_key=self.asset.register_key,
                key=self.join_key(features),
            ),
            token=self.token,
        )
        self.e.crash.hit("after_register_sent")
        await self.q.do(self.q.s.set_asset, self.asset.asset_key, asset_id=urls.asset_id,
                        state=AssetState.REGISTERED)
        self.asset.asset_id = urls.asset_id
        self.asset.state = AssetState.REGISTERED
        if replay:
            # Chronicle replays its first answer to a repeated key: those URLs may have
            # expired or point at an address that has changed since. Ask for fresh ones.
            urls = await self.e.chronicle.send(
                contract.upload_urls(urls.asset_id, [c.name for c in first]), token=self.token
            )
        await self._absorb(urls)
        log.info("asset %s registered (%d components%s)", urls.asset_id, len(first),
                 f"; {len(later)} more declared while these upload" if later else "")
        self.e.crash.hit("after_register")
        return True

    def join_key(self, features: frozenset[str]) -> str | None:
        """The key that joins the run's one asset of a checkpoint several nodes write; None
        for an asset of its own (one node, or a server without ``asset_keys``: each node's
        part is then an asset of its own)."""
        if self.join is None or not self.asset.run_id:
            return None
        if "asset_keys" not in features:
            if not self.e.warned_no_joins:
                self.e.warned_no_joins = True
                log.warning("Chronicle does not offer assets built by several uploaders (API "
                            "1.1 asset_keys): each node uploads its part of a checkpoint as an "
                            "asset of its own")
            return None
        return str(self.join["key"])

    async def joined(self) -> bool:
        """Whether this asset is this node's part of one several nodes build."""
        return self.join_key(await self.e.features()) is not None

    def own_part(self, features: frozenset[str]) -> bool:
        """Whether this asset is one node's part of a multi-node checkpoint, as an asset of
        its own (Chronicle cannot join them): its node's marker names it."""
        return self.join is not None and bool(self.asset.run_id) and \
            self.join_key(features) is None

    def _pipelined(self, features: frozenset[str]) -> bool:
        """Whether small components can be declared while others upload (API 1.1: their
        digests bound into their URLs, and declared after register)."""
        return {"checksum_urls", "asset_keys"} <= features

    def _small(self, c: ComponentRecord) -> bool:
        """Read whole, hashed before it is declared (a path: the daemon reads it)."""
        return bool(c.path) and c.size is not None and \
            c.size <= self.e.settings.upload.chunk_bytes

    def _declared_later(self, comps: list[ComponentRecord], features: frozenset[str],
                        replay: bool) -> set[str]:
        """The small components left out of register, declared in growing batches while
        the first ones upload (:meth:`upload_all`): register waits for the first
        :data:`FIRST_DECLARED` files to be hashed, not for all of them. A replayed register
        leaves out the same ones: those not hashed yet (a register that was not pipelined
        either hashed them all, or none when the server offered no bound URLs)."""
        if not self._pipelined(features):
            return set()
        small = [c for c in comps if self._small(c)]
        if replay:
            if not any(c.sha256 for c in small):
                return set()
            return {c.name for c in small if c.sha256 is None}
        return {c.name for c in small[FIRST_DECLARED:]}

    async def _declare_more(self, comps: list[ComponentRecord]) -> None:
        """Declare small components of the registered asset (API 1.1 ``asset_keys``:
        ``POST /v1/assets/{id}/components``), digests first; declaring one again the same
        way is harmless, so a resumed upload declares whatever it has no URL for."""
        await self._declare_digests(comps)
        decl = [m.ComponentDecl(name=c.name, size=c.size, content_type=c.content_type,
                                sha256=c.sha256) for c in comps]
        urls = await self.e.chronicle.send(contract.add_components(self.asset_id, decl),
                                           token=self.token)
        await self._absorb(urls)
        self.e.crash.hit("after_declare")

    async def _declare_digests(self, comps: list[ComponentRecord]) -> None:
        """The SHA-256 of each small component (one that is read whole anyway), recorded
        before it is declared at register: its URL then binds it, the store refuses other
        bytes and Chronicle reads nothing back. Files are read in batches of about 8 MiB per
        worker-thread call; the digests are recorded in one transaction."""
        small = [c for c in comps if c.sha256 is None and self._small(c)]
        if not small:
            return
        digests: dict[str, str] = {}

        def batch(todo: list[ComponentRecord]) -> None:
            with self.e.small_buffers.take() as buf:
                for c in todo:
                    digests[c.name] = registered_sha256(c, buf, self.open_src)

        start = 0
        while start < len(small):
            end, total = start, 0
            while end < len(small) and (end == start or total < DIGEST_BATCH_BYTES):
                total += small[end].size or 0
                end += 1
            await run_bulk(batch, small[start:end])
            start = end
        await self.q.do(self.q.s.set_digests, self.asset.asset_key, digests)
        for c in small:
            c.sha256 = digests[c.name]

    async def _absorb(self, urls: m.UploadUrls) -> None:
        use_by = url_use_by(urls.expires_at)
        for url in urls.upload_urls.values():
            self.use_by[url] = use_by
        for mp in urls.multipart.values():
            for part in mp.parts:
                self.use_by[part.url] = use_by
        hashes: dict[str, str] = {}
        for name, url in urls.upload_urls.items():
            self.plans[name] = Plan(url=url, headers=urls.upload_headers.get(name))
            hashes[name] = url_hash(url)
        for name, mp in urls.multipart.items():
            plan = Plan(part_size=mp.part_size)
            old = self.plans.get(name)
            if old is not None and old.part_size == mp.part_size:
                plan.part_urls = dict(old.part_urls)
            plan.part_urls.update({p.part_number: p.url for p in mp.parts})
            self.plans[name] = plan
        if hashes:
            await self.q.do(self.q.s.set_url_hashes, self.asset.asset_key, hashes)
        for name, mp in urls.multipart.items():
            await self.q.do(self.q.s.update_component, self.asset.asset_key, name,
                            part_size=mp.part_size)

    async def refresh(
        self, names: list[str], parts: dict[str, list[int]] | None = None,
        declare: dict[str, int] | None = None,
    ) -> None:
        """Ask Chronicle for fresh URLs (after expiry or a restart). ``declare`` gives sizes
        to (re)plan components with; everything else keeps its plan."""
        decl: list[Any] = [
            {"name": n, "size": declare[n]} if declare and n in declare else n for n in names
        ]
        urls = await self.e.chronicle.send(
            contract.upload_urls(self.asset_id, decl, parts), token=self.token
        )
        await self._absorb(urls)

    # ---- components --------------------------------------------------------------------

    async def upload_all(self) -> None:
        comps = await self.q.do(self.q.s.components, self.asset.asset_key)
        self.progress.add(sum(c.size or 0 for c in comps if c.uploaded) - self.progress.bytes_done)
        todo = [c for c in comps if not c.uploaded]
        if not todo:
            return
        missing = [c for c in todo if c.name not in self.plans]
        undeclared: list[ComponentRecord] = []
        if missing and self._pipelined(await self.e.features()):
            undeclared = [c for c in missing if self._small(c)]
            missing = [c for c in missing if not self._small(c)]
        if missing:
            await self.refresh([c.name for c in missing])
        turns_in, turns = anyio.create_memory_object_stream[
            ComponentRecord | list[ComponentRecord]](math.inf)

        async def produce() -> None:
            """Turns of what has URLs; then, batch after batch, the small components still
            to declare, hashed and declared while the turns before them upload."""
            async with turns_in:
                for turn in self._turns([c for c in todo if c.name in self.plans]):
                    turns_in.send_nowait(turn)
                start, size = 0, 4 * FIRST_DECLARED
                while start < len(undeclared):
                    batch = undeclared[start:start + size]
                    await self._declare_more(batch)
                    for turn in self._turns(batch):
                        turns_in.send_nowait(turn)
                    start, size = start + len(batch), min(4 * size, MAX_DECLARED)

        async def take_turns() -> None:
            async for turn in turns:  # one shared stream: each component is taken once
                if isinstance(turn, list):
                    await self._put_smalls(turn)
                else:
                    await self.upload_component(turn)

        # A few more tasks than transfer slots, not one per component: 10,000 files used to
        # be 10,000 waiting tasks (about 100 MiB of peak RSS, and CPU to schedule them).
        with one_error(), turns:
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                for _ in range(min(len(todo), 2 * self.e.settings.upload.concurrency)):
                    tg.start_soon(take_turns)

    def _turns(self, todo: list[ComponentRecord]) -> Iterator[ComponentRecord |
                                                               list[ComponentRecord]]:
        """The components in turns: runs of small files (a single URL each) together, at
        most :data:`SMALL_RUN_FILES` of them and ``upload.chunk_bytes`` in all, each run
        sent in one worker-thread call (:meth:`_put_smalls`); every other component alone.
        A few files make shorter runs, so that they still fill every transfer slot (the
        first 64 declared: runs of 4 with the default 8 slots)."""
        cap = self.e.settings.upload.chunk_bytes
        per_run = max(1, min(SMALL_RUN_FILES,
                             len(todo) // (2 * self.e.settings.upload.concurrency)))
        run: list[ComponentRecord] = []
        size = 0
        for c in todo:
            plan = self.plans.get(c.name)
            if plan is None or plan.part_size is not None or plan.url is None or \
                    not self._small(c):
                yield c
                continue
            assert c.size is not None  # (small)
            if run and (len(run) >= per_run or size + c.size > cap):
                yield run
                run, size = [], 0
            run.append(c)
            size += c.size
        if run:
            yield run

    async def upload_component(self, comp: ComponentRecord,
                               prior: Exception | None = None) -> None:
        """``prior``: how a first attempt at this (small) component failed (in a run of
        them, :meth:`_put_smalls`): it counts as the first of the retry policy's."""
        if comp.uploaded:
            return
        assert comp.path is not None and comp.size is not None
        started = time.monotonic()
        plan = self.plans.get(comp.name)
        if plan is None:
            await self.refresh([comp.name])
            plan = self.plans[comp.name]
        if plan.part_size is None and comp.size <= self.e.settings.upload.chunk_bytes:
            sha = await self._put_small(comp, prior)  # checks the source around its read
        else:
            await self._check_unchanged(comp)
            if plan.part_size is None:
                sha = await self._put_single(comp)
            else:
                sha = await self._put_multipart(comp, plan.part_size)
            await self._check_unchanged(comp)
        await self.e.uploaded.add((self.asset.asset_key, comp.name, sha))
        comp.uploaded, comp.sha256 = True, sha
        took = time.monotonic() - started
        if comp.size >= 1 << 20:
            log.info("%s of %s uploaded: %d MiB in %.1fs", comp.name, self.asset_id,
                     comp.size >> 20, took)
        self.e.component_done()

    async def _check_unchanged(self, comp: ComponentRecord) -> None:
        assert comp.path is not None
        try:
            st: Stat | None = await self.stat_src(comp.path)
        except FileNotFoundError:
            st = None
        why = changed_message(comp, st)
        if why:
            raise SourceChanged(why)

    async def _send(
        self, what: str, comp: ComponentRecord, url_of: Callable[[], str],
        expired: Callable[[str], Awaitable[None]], put: Callable[[str], Any],
        prior: Exception | None = None,
    ) -> Any:
        """One request with retries: a slot from the global limit per attempt, fresh URLs
        after an expired-URL 403, and no retry at all once the source file has changed
        (a vanished file looks like a broken connection from inside the HTTP client).
        ``prior``: the failure of an attempt made elsewhere, taken as the first one."""
        first = [prior]

        async def attempt() -> Any:
            if first[0] is not None:
                err, first[0] = first[0], None
                if isinstance(err, UrlExpired):  # as below: fresh URLs, not an attempt
                    log.info("%s: %s; asking for fresh URLs", what, err.message)
                    self.e.metrics.retry("url_expired")
                    self.use_by[url_of()] = 0.0
                else:
                    await self._check_unchanged(comp)
                    raise err
            async with self.e.limits.slots:
                for _ in range(4):
                    url = url_of()
                    if time.time() >= self.use_by.get(url, math.inf):
                        await expired(url)  # about to expire: fresh URLs before, not after
                        url = url_of()
                    try:
                        return await put(url)
                    except UrlExpired as exc:  # still the slot's turn: refresh, go again
                        log.info("%s: %s; asking for fresh URLs", what, exc.message)
                        self.e.metrics.retry("url_expired")
                        await expired(url)
                    except Exception:
                        await self._check_unchanged(comp)
                        raise
                raise RetryableError(f"{what}: presigned URLs keep expiring (check the "
                                     "clocks of this node and of storage)", code="url_expired")

        def on_retry(err: TransferError) -> None:
            self.e.metrics.retry(err.code)

        return await self.e.retry.run(attempt, what, on_retry)

    def _counted(self, n: int) -> None:
        self.progress.add(n)
        self.e.metrics.sent(n)

    async def _send_single(
        self, what: str, comp: ComponentRecord, put: Callable[[str], Awaitable[str | None]],
        prior: Exception | None = None,
    ) -> str:
        """A component's one PUT, to its single URL (refreshed when it expires)."""

        def url_of() -> str:
            url = self.plans[comp.name].url
            assert url is not None
            return url

        async def expired(stale: str) -> None:
            async with self._refresh_lock:
                if self.plans[comp.name].url == stale:  # not refreshed by someone else
                    await self.refresh([comp.name])

        sha: str = await self._send(what, comp, url_of, expired, put, prior)
        return sha

    def _read_put(self, comp: ComponentRecord, buf: bytearray, url: str,
                  headers: dict[str, str] | None, stop: threading.Event
                  ) -> tuple[str, int, bytes]:
        """In a worker thread: read a small component (checked against its registered
        version), hash it unless its URL binds the declared digest (the store checks those
        bytes), PUT it on a kept-alive connection; its SHA-256 and storage's answer."""
        data = read_registered(comp, buf, self.open_src)
        sha = comp.sha256 if comp.sha256 and bound_digest(headers) == comp.sha256 else \
            check_declared(comp, hashlib.sha256(data).hexdigest())
        status, _, body = rawget.RawPut(self.e.pool, url, data, headers,
                                        self.e.settings.upload.stall_timeout_s, stop).run()
        return sha, status, body

    def _answer_error(self, comp: ComponentRecord, status: int, body: bytes,
                      headers: dict[str, str] | None) -> TransferError | None:
        """None if storage took the bytes, else why not."""
        if status < 300 or (status == 412 and create_only(headers)):
            return None  # 412: the key is taken by these very bytes, an answer lost before
        return classify_storage_answer(status, body, f"PUT {comp.name} of {self.asset_id}")

    async def _put_smalls(self, run: list[ComponentRecord]) -> None:
        """A run of small components in one worker-thread call under one transfer slot,
        one PUT after another: the event loop's work is per run, not per file. A component
        whose PUT fails, or whose URL is about to expire, goes the one-at-a-time way
        (:meth:`upload_component`: retries, fresh URLs, the source re-checked)."""
        now = time.time()
        ready: list[ComponentRecord] = []
        again: list[tuple[ComponentRecord, Exception | None]] = []
        for c in run:
            if now < self.use_by.get(self.plans[c.name].url or "", math.inf):
                ready.append(c)
            else:
                again.append((c, None))
        stop = threading.Event()

        def put_all(buf: bytearray) -> list[tuple[ComponentRecord, str | None, Exception | None]]:
            out: list[tuple[ComponentRecord, str | None, Exception | None]] = []
            for c in ready:
                if stop.is_set():
                    break
                plan = self.plans[c.name]
                assert plan.url is not None
                try:
                    sha, status, body = self._read_put(c, buf, plan.url, plan.headers, stop)
                except rawget.Cancelled:
                    break
                except Exception as e:  # noqa: BLE001 - handed to the one-at-a-time way
                    out.append((c, None, e))
                    continue
                err = self._answer_error(c, status, body, plan.headers)
                out.append((c, None if err else sha, err))
            return out

        if ready:
            await self.e.limits.throttle(sum(c.size or 0 for c in ready))
            async with self.e.limits.slots:
                with self.e.small_buffers.take() as buf:
                    results = await run_bulk(put_all, buf, stop=stop)
            sent = [(c, sha) for c, sha, _ in results if sha is not None]
            if sent:
                self._counted(sum(c.size or 0 for c, _ in sent))
                await self.e.uploaded.add(*((self.asset.asset_key, c.name, sha)
                                            for c, sha in sent))
                for c, sha in sent:
                    c.uploaded, c.sha256 = True, sha
                    self.e.component_done()
            again += [(c, err) for c, _, err in results if err is not None]
        for c, err in again:  # (a cancelled call raised above: nothing is left out)
            await self.upload_component(c, err)

    async def _put_small(self, comp: ComponentRecord, prior: Exception | None = None) -> str:
        """A file of at most one chunk, on its own: opened, checked, read, (hashed,) sent and
        answered in one worker-thread call, on a kept-alive connection
        (:class:`rawget.RawPut`); the bytes sent are exactly the registered version's. Where
        the URL binds the declared digest the store checks the bytes and they are not hashed
        again here; a ``BadDigest`` then re-reads the file to tell a changed source
        (``source_changed``) from bytes damaged on the way (retried). Read only once a
        transfer slot is held (and again on a retry), into one of a few reused buffers, so
        that a directory of thousands of small files holds at most ``upload.concurrency`` of
        them in memory whatever the uplink's speed (benchmarks/bench_memory.py)."""
        assert comp.path is not None and comp.size is not None
        what = f"PUT {comp.name} of {self.asset_id}"
        size = comp.size

        def rehash(buf: bytearray) -> str:
            return check_declared(comp, registered_sha256(comp, buf, self.open_src))

        async def put(url: str) -> str:
            headers = self.plans[comp.name].headers
            await self.e.limits.throttle(size)
            stop = threading.Event()
            with self.e.small_buffers.take() as buf:
                sha, status, body = await run_bulk(self._read_put, comp, buf, url, headers,
                                                   stop, stop=stop)
                err = self._answer_error(comp, status, body, headers)
                if err is not None:
                    if err.code == "bad_digest" and bound_digest(headers):
                        await run_bulk(rehash, buf)  # source_changed if it is the file
                    raise err
            self._counted(size)
            return sha

        return await self._send_single(what, comp, put, prior)

    async def _put_single(self, comp: ComponentRecord) -> str:
        assert comp.path is not None and comp.size is not None
        path, size = comp.path, comp.size
        what = f"PUT {comp.name} of {self.asset_id}"
        up = self.e.settings.upload

        async def put(url: str) -> str | None:
            log.debug("%s -> %s", what, redact(url))
            _, sha = await put_file(
                self.e.session, url, path, 0, size, chunk_bytes=up.chunk_bytes,
                limits=self.e.limits, stall_s=up.stall_timeout_s, on_bytes=self._counted,
                content_type=None, what=what, opener=self.open_src,
            )
            return sha

        return await self._send_single(what, comp, put)

    async def _put_multipart(self, comp: ComponentRecord, part_size: int) -> str:
        assert comp.path is not None and comp.size is not None
        path, size, name = comp.path, comp.size, comp.name
        n_parts = max(1, math.ceil(size / part_size))
        expected = {
            pn: min(part_size, size - (pn - 1) * part_size) for pn in range(1, n_parts + 1)
        }
        done = {p.part_number: p for p in await self.q.do(
            self.q.s.parts, self.asset.asset_key, name) if p.part_size == part_size}
        if len(done) < n_parts:
            await self._reconcile(name, part_size, expected, done)
        self.progress.add(sum(p.size for p in done.values()))
        todo = [pn for pn in expected if pn not in done]
        log.info("%s of %s: %d parts of %d MiB, %d to send", name, self.asset_id, n_parts,
                 part_size >> 20, len(todo))
        sha_box: list[str] = []
        up = self.e.settings.upload

        async def hash_all() -> None:
            sha_box.append(await hash_file(path, size, up.chunk_bytes, self.open_src))

        async def send_part(pn: int) -> None:
            what = f"PUT {name} part {pn}/{n_parts} of {self.asset_id}"
            offset, length = (pn - 1) * part_size, expected[pn]

            async def put(url: str) -> str:
                etag = await put_file_sendfile(
                    self.e.session, url, path, offset, length,
                    piece_bytes=max(up.chunk_bytes, 4 << 20), limits=self.e.limits,
                    stall_s=up.stall_timeout_s, on_bytes=self._counted, what=what,
                    opener=self.open_src,
                )
                if not etag:
                    raise RetryableError(f"{what}: storage returned no ETag", code="no_etag")
                return etag

            def url_of() -> str:
                return self.plans[name].part_urls[pn]

            async def expired(stale: str | None) -> None:
                async with self._refresh_lock:
                    if self.plans[name].part_urls.get(pn) not in (stale, None):
                        return  # another part's refresh brought this one a fresh URL
                    # One call for the parts still to send (the next few hundred of them).
                    pending = [p for p in expected if p not in done and p >= pn][:500]
                    await self.refresh([name], {name: pending})

            if pn not in self.plans[name].part_urls:
                await expired(None)
            etag: str = await self._send(what, comp, url_of, expired, put)
            self.e.crash.hit("after_part_sent")  # acknowledged by storage, ETag not stored
            await self.q.do(self.q.s.record_part, self.asset.asset_key, name,
                            PartRecord(pn, part_size, length, etag))
            done[pn] = PartRecord(pn, part_size, length, etag)
            self.e.part_acked()

        gate = anyio.CapacityLimiter(self.e.parts_per_component)

        async def gated(pn: int) -> None:
            async with gate:
                await send_part(pn)

        with one_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(hash_all)
                for pn in todo:
                    tg.start_soon(gated, pn)
        return sha_box[0]

    async def _reconcile(
        self, name: str, part_size: int, expected: dict[int, int], done: dict[int, PartRecord]
    ) -> None:
        """Local state may be behind the store (a crash after a part was acknowledged but
        before its ETag was stored): adopt what storage already holds."""
        try:
            listing = await self.e.chronicle.send(
                contract.list_uploads(self.asset_id), token=self.token
            )
        except ChronicleError as e:
            log.info("uploads listing of %s unavailable (%s); re-sending parts", self.asset_id, e)
            return
        stored = listing.components.get(name)
        if stored is None:
            return
        for p in stored.parts:
            if p.part_number in expected and p.part_number not in done and (
                p.size is None or p.size == expected[p.part_number]
            ):
                rec = PartRecord(p.part_number, part_size, expected[p.part_number], p.etag)
                await self.q.do(self.q.s.record_part, self.asset.asset_key, name, rec)
                done[p.part_number] = rec
        if done:
            log.info("%s of %s: %d parts already in storage", name, self.asset_id, len(done))

    # ---- finalize ----------------------------------------------------------------------

    async def finalize(self) -> m.Asset:
        comps = await self.q.do(self.q.s.components, self.asset.asset_key)
        missing = [c.name for c in comps if not c.uploaded]
        if missing:
            raise UsageError(
                f"cannot finalize {self.asset_id}: components never uploaded: "
                + ", ".join(missing[:10]) + (" …" if len(missing) > 10 else ""),
                code="components_missing",
            )
        body: dict[str, dict[str, Any]] = {}
        for c in comps:
            assert c.size is not None and c.sha256 is not None
            spec: dict[str, Any] = {"size": c.size, "sha256": c.sha256}
            if c.content_type is not None:
                spec["content_type"] = c.content_type
            if c.part_size is not None:
                spec["parts"] = [
                    {"part_number": p.part_number, "etag": p.etag}
                    for p in await self.q.do(self.q.s.parts, self.asset.asset_key, c.name)
                    if p.part_size == c.part_size]
            body[c.name] = spec
        self.e.crash.hit("before_finalize")
        asset = await self.e.chronicle.send(
            contract.finalize(self.asset_id, body,
                              idempotency_key=f"finalize:{self.asset.register_key}"),
            token=self.token,
        )
        self.e.crash.hit("after_finalize_sent")
        await self.q.do(self.q.s.set_asset, self.asset.asset_key,
                        state=AssetState.FINALIZED)
        self.asset.state = AssetState.FINALIZED
        log.info("asset %s finalized: %s", self.asset_id, asset.state)
        self.e.crash.hit("after_finalize")
        return asset

    async def abandon(self, reason: str) -> None:
        if self.asset.asset_id is None or self.asset.state in (AssetState.FINALIZED,
                                                               AssetState.ABANDONED):
            return
        await self.e.chronicle.send(
            contract.abandon(self.asset_id, reason,
                             idempotency_key=f"abandon:{self.asset.register_key}"),
            token=self.token,
        )
        await self.q.do(self.q.s.set_asset, self.asset.asset_key,
                        state=AssetState.ABANDONED)
        self.asset.state = AssetState.ABANDONED
