"""Asset lifecycle: register (presigned flow), inline, upload URLs, uploads listing, finalize,
abandon, get (with download URLs), list, deprecate / invalidate, delete.

Pattern of every mutating handler: validate the body, check access, do the storage side
effects that must precede the decision (create a multipart upload, assemble parts), then
decide and record in one transaction (:meth:`Ctx.commit`), then the storage clean-up that
follows from it (abort a replaced plan, drop an abandoned asset's bytes). Work on one asset
is serialized by a per-asset lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from . import db
from .app import Core, Ctx, Route, can, new_id, require_asset, require_run_for_output
from .bodies import (
    MAX_COMPONENTS,
    STATES,
    AddComponents,
    ComponentSpec,
    Finalize,
    FinalizeSpec,
    Inline,
    PartClaim,
    Placement,
    Reason,
    RefreshUrls,
    Register,
    clash,
)
from .db import AssetRow, ComponentRow, utcnow
from .http import (
    Reply,
    conflict,
    fail,
    forbidden,
    invalid,
    one_of,
    query_flag,
)
from .storage import (
    MIN_PART_BYTES,
    PartInfo,
    PartsRefused,
    etag_value,
    part_count,
    plan_part_size,
)

log = logging.getLogger(__name__)



UPLOAD_PREFIX = "assets"
"""Single-PUT upload URLs write ``assets/<asset_id>/<name>``."""
FINAL_PREFIX = "ready"
"""A ready component's bytes live at ``ready/<asset_id>/<name>``, a key no single-PUT URL
names: a single component is copied there at finalize, a multipart upload is created there
(its part URLs die with the upload at CompleteMultipartUpload)."""


def upload_key(object_key: str) -> str:
    return f"{UPLOAD_PREFIX}/{object_key.split('/', 1)[1]}"


def final_key(object_key: str) -> str:
    return f"{FINAL_PREFIX}/{object_key.split('/', 1)[1]}"


def asset_of_key(key: str) -> str | None:
    prefix, _, rest = key.partition("/")
    asset_id, _, name = rest.partition("/")
    if prefix not in (UPLOAD_PREFIX, FINAL_PREFIX) or not asset_id or not name:
        return None
    return asset_id


@asynccontextmanager
async def upload_gate(core: Core, key: str) -> AsyncIterator[bool]:
    """Whether a presigned PUT may write ``key``: only while its asset is pending and one of
    its components is planned at that key. Holds the asset's lock meanwhile (finalize,
    abandon and delete take it too)."""
    asset_id = asset_of_key(key)
    if asset_id is None:
        yield False
        return
    async with core.asset_locks.hold(asset_id):
        ok = await core.db.read(db.planned_key, asset_id, key) == "pending"
        if ok:
            last = core.touched.get(asset_id, 0.0)
            if time.monotonic() - last > TOUCH_EVERY_S:
                if len(core.touched) > 100_000:
                    core.touched.clear()
                core.touched[asset_id] = time.monotonic()
                await touch(core, asset_id)
        yield ok


MAX_QUERY = 1000


def searchable_text(content: Any) -> str:
    """What search finds an inline asset by: its text, or a JSON value's strings and numbers
    (keys left out), one per line."""
    if isinstance(content, str):
        return content
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str | int | float) and not isinstance(v, bool):
            out.append(str(v))

    walk(content)
    return "\n".join(out)


async def index_inline_texts(core: Core) -> int:
    """Give search the text of inline assets indexed without it (a database migrated to
    schema 4: their content is in storage); how many. One unreadable is indexed empty, with
    a WARNING, not tried again."""
    todo = await core.db.read(db.unread_texts)
    for asset_id, key, content_type in todo:
        try:
            data = await core.storage.read_small(key, core.config.inline_max_bytes)
        except Exception as e:
            log.warning("search: cannot read the text of inline asset %s (%s); it is found "
                        "by its type and flags only", asset_id, e)
            data = None
        text = ""
        if data is not None:
            raw = data.decode("utf-8", "replace")
            text = raw
            if (content_type or "").startswith("application/json"):
                with contextlib.suppress(ValueError):
                    text = searchable_text(json.loads(raw))
        await core.db.write(db.index_asset, asset_id, text)
    if todo:
        log.info("search: indexed the text of %d inline asset(s)", len(todo))
    return len(todo)


def _int_param(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise invalid(f"{name} must be a whole number from {low} to {high}, got {value[:40]!r}")
    return int(value)


def _placement(ctx: Ctx, body: Placement) -> tuple[str, str | None]:
    organization_id = body.organization_id
    if organization_id and not ctx.principal.member_of(organization_id):
        raise forbidden(f"you are not a member of {organization_id}")
    return body.visibility or "private", organization_id


def _missing(message: str) -> Exception:
    return conflict(message, code="components_missing")


def _mismatch(message: str) -> Exception:
    return fail(422, "checksum_mismatch", message)


# ---- storage clean-up shared with runs -------------------------------------------------------


async def release_storage(core: Core, asset_id: str) -> None:
    """Abort an abandoned or deleted asset's multipart uploads and drop its bytes. Failures
    are logged: they leave garbage (for the storage sweep), never a wrong answer."""
    core.crash.hit("before_release")
    async with core.asset_locks.hold(asset_id):
        asset = await core.db.read(db.get_asset, asset_id)
        if asset is not None and asset.state != "abandoned":
            return  # finalized meanwhile (the abandon lost the race): keep its bytes
        comps = asset.components if asset is not None else []
        await _drop(core, comps)


TOUCH_EVERY_S = 60.0
"""A PUT records upload activity at most this often per asset (a DB write per PUT of a
directory of small files would cost more than the PUT)."""


async def touch(core: Core, asset_id: str) -> None:
    """Upload activity on ``asset_id``: what ``server.pending_ttl_s`` counts from."""
    await core.db.write(db.touch, asset_id)


async def expire_idle(core: Core) -> list[str]:
    """Abandon (reason ``expired``) every pending asset without upload activity for
    ``server.pending_ttl_s``, then release its storage; the asset ids. Each one is looked at
    again under its lock, so an upload that came back meanwhile keeps its asset."""
    ttl = core.config.pending_ttl_s
    before = (datetime.now(UTC) - timedelta(seconds=ttl)).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
    done = []
    for asset_id in await core.db.read(db.idle_pending, before):
        async with core.asset_locks.hold(asset_id):
            def txn(conn: sqlite3.Connection, asset_id: str = asset_id) -> bool:
                if not db.idle_pending(conn, before, asset_id):
                    return False
                db.set_state(conn, asset_id, "abandoned", reason="expired")
                return True

            if not await core.db.write(txn):
                continue
        await release_storage(core, asset_id)
        done.append(asset_id)
    if done:
        await core.db.write(db.add_counters, {"assets_expired": len(done)})
        log.warning("abandoned %d pending asset(s) with no upload activity for %ds "
                    "(server.pending_ttl_s), reason expired: %s", len(done), ttl,
                    ", ".join(done[:10]) + (" …" if len(done) > 10 else ""))
    return done


async def _drop(core: Core, comps: list[ComponentRow]) -> None:
    """Release the bytes of ``comps`` (an asset deleted or abandoned). A ready component
    that stayed at its create-only upload key gets an empty tombstone instead of a delete:
    the key stays taken, so no unexpired upload URL can bring the bytes back behind an old
    GET URL. (Tombstones are empty objects; the storage sweep removes them once every upload
    URL that could write them has expired, see :mod:`agent.server.gc`.)"""
    keys: list[str] = []
    failed = 0
    tombstones = {c.object_key for c in comps if c.uploaded and c.bound_sha256
                  and core.storage.create_only_puts and c.object_key == upload_key(c.object_key)}
    for key in tombstones:
        try:
            await core.storage.put_object(key, b"", "application/octet-stream")
        except Exception as e:
            failed += 1
            log.warning("could not replace %s by a tombstone: %s", key, e)
    for c in comps:
        try:
            if c.upload_id:
                await core.storage.abort_multipart(c.object_key, c.upload_id)
        except Exception as e:  # storage unreachable, I/O error: garbage, not an error
            failed += 1
            log.warning("could not release %s (the storage sweep will): %s", c.object_key, e)
        # the object, its upload key, and a copy a failed finalize left
        keys += [c.object_key, upload_key(c.object_key), final_key(c.object_key)]
    try:
        await core.storage.delete_many([k for k in dict.fromkeys(keys) if k not in tombstones])
    except Exception as e:
        failed += 1
        log.warning("could not release the objects of %d components (the storage sweep "
                    "will): %s", len(comps), e)
    if failed:
        with contextlib.suppress(Exception):
            await core.db.write(db.add_counters, {"release_failures": failed})


# ---- handlers --------------------------------------------------------------------------------


class Assets:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.cfg = core.config

    # -- helpers --

    async def _plan(self, c: ComponentRow, size: int) -> ComponentRow:
        """``c`` planned for ``size`` bytes: multipart above the threshold (a new upload id),
        else a single PUT."""
        if size > self.cfg.multipart_threshold_bytes:
            key = final_key(c.object_key)
            part_size = plan_part_size(size, self.cfg.part_size_bytes)
            upload_id = await self.core.storage.create_multipart(key, part_size)
            return replace(c, object_key=key, size=size, upload_id=upload_id, part_size=part_size)
        return self._plan_single(c, size)

    @staticmethod
    def _plan_single(c: ComponentRow, size: int) -> ComponentRow:
        return replace(
            c, object_key=upload_key(c.object_key), size=size, upload_id=None, part_size=None
        )

    async def _urls(
        self, comps: list[ComponentRow], parts: dict[str, list[int]] | None = None
    ) -> dict[str, Any]:
        """The upload URLs of ``comps`` in the contract's shape."""
        storage, expiry = self.core.storage, self.cfg.url_expiry_s
        upload_urls: dict[str, str] = {}
        headers: dict[str, dict[str, str]] = {}
        multipart: dict[str, Any] = {}
        for c in comps:
            if c.upload_id and c.size is not None and c.part_size:
                count = part_count(c.size, c.part_size)
                numbers = (parts or {}).get(c.name) or list(range(1, count + 1))
                urls = await storage.presign_parts(c.object_key, c.upload_id, numbers, expiry)
                multipart[c.name] = {
                    "part_size": c.part_size,
                    "part_count": count,
                    "size": c.size,
                    "parts": [{"part_number": n, "url": urls[n]} for n in numbers],
                }
            else:
                upload_urls[c.name] = await storage.presign_put(c.object_key, expiry,
                                                                c.bound_sha256)
                if c.bound_sha256:
                    headers[c.name] = storage.upload_headers(c.bound_sha256)
        answer: dict[str, Any] = {"upload_urls": upload_urls, "multipart": multipart}
        if headers:
            answer["upload_headers"] = headers
        return answer

    def _bind(self, c: ComponentRow, sha256: str | None) -> ComponentRow:
        """``c`` with its declared digest signed into its URL, when this server offers
        checksum-bound URLs and ``c`` is one PUT (multipart parts keep today's path)."""
        if sha256 and self.cfg.checksum_urls and not c.upload_id and c.size is not None:
            return replace(c, bound_sha256=sha256)
        return c

    async def _plan_many(self, wanted: list[tuple[ComponentRow, int]]) -> list[ComponentRow]:
        """Plan several components at once; if one fails, abort the uploads of the others."""
        sem = asyncio.Semaphore(16)
        big = self.cfg.multipart_threshold_bytes

        async def one(c: ComponentRow, size: int) -> ComponentRow:
            async with sem:
                return await self._plan(c, size)

        # a task only for what calls storage (a multipart upload to create): 1000 small
        # components made 1000 tasks, 40 % of a register's CPU
        multi = await asyncio.gather(*(one(c, n) for c, n in wanted if n > big),
                                     return_exceptions=True)
        failed = [r for r in multi if isinstance(r, BaseException)]
        if failed:
            await self._abort_quietly([r for r in multi if isinstance(r, ComponentRow)])
            raise failed[0]
        made = iter([r for r in multi if isinstance(r, ComponentRow)])
        return [next(made) if n > big else self._plan_single(c, n)
                for c, n in wanted]

    async def _abort_quietly(self, comps: list[ComponentRow]) -> None:
        for c in comps:
            if c.upload_id:
                try:
                    await self.core.storage.abort_multipart(c.object_key, c.upload_id)
                except Exception as e:
                    log.warning("could not abort upload of %s: %s", c.object_key, e)

    # -- register, inline --

    async def register(self, ctx: Ctx) -> Reply:
        body = ctx.body(Register)
        asset_type, key, specs = body.asset_type, body.key, body.components
        output_of = body.output_of or None  # "" is no run
        if key is not None and not self.cfg.asset_keys:
            raise invalid("key: this server does not offer assets built by several uploaders "
                          "(API 1.1 asset_keys; server.asset_keys is off)")
        visibility, organization_id = _placement(ctx, body)
        if output_of:
            await self.core.db.read(require_run_for_output, ctx.principal, output_of)
        if key is None:
            return await self._create(ctx, asset_type, output_of, visibility, organization_id,
                                      specs, None)
        assert output_of is not None
        # API 1.1 asset_keys: the first call creates the asset, later ones join it
        async with self.core.asset_locks.hold(f"key\0{output_of}\0{asset_type}\0{key}"):
            found = await self.core.db.read(db.find_keyed, output_of, asset_type, key)
            if found is None:
                return await self._create(ctx, asset_type, output_of, visibility,
                                          organization_id, specs, key)
            async with self.core.asset_locks.hold(found):
                return await self._join(ctx, found, specs)

    async def _create(self, ctx: Ctx, asset_type: str, output_of: str | None, visibility: str,
                      organization_id: str | None, specs: list[ComponentSpec],
                      key: str | None) -> Reply:
        asset_id = new_id("ast")
        # its lock from the first byte in storage until the row is written: the storage
        # sweep, looking at its keys meanwhile, waits and then finds the row
        async with self.core.asset_locks.hold(asset_id):
            return await self._create_held(ctx, asset_id, asset_type, output_of, visibility,
                                           organization_id, specs, key)

    async def _create_held(self, ctx: Ctx, asset_id: str, asset_type: str,
                           output_of: str | None, visibility: str,
                           organization_id: str | None, specs: list[ComponentSpec],
                           key: str | None) -> Reply:
        comps, planned = await self._new_rows(asset_id, specs, 0)
        asset = AssetRow(
            asset_id=asset_id,
            asset_type=asset_type,
            state="pending",
            created_by=ctx.principal.id,
            visibility=visibility,
            created_at=utcnow(),
            output_of=output_of,
            organization_id=organization_id,
            content_type=ctx.body(Register).content_type,
            asset_key=key,
            components=comps,
        )

        def insert(conn: sqlite3.Connection) -> None:
            if output_of:
                require_run_for_output(conn, ctx.principal, output_of)
            db.insert_asset(conn, asset)

        return await self._commit_urls(ctx, asset_id, comps, insert, planned, status=201)

    async def add_components(self, ctx: Ctx) -> Reply:
        """``POST /v1/assets/{id}/components`` (API 1.1 ``asset_keys``)."""
        if not self.cfg.asset_keys:
            raise fail(404, "not_found", "this server does not offer adding components (API "
                       "1.1 asset_keys; server.asset_keys is off)")
        asset_id = ctx.arg("asset_id")
        specs = ctx.body(AddComponents).components
        async with self.core.asset_locks.hold(asset_id):
            return await self._join(ctx, asset_id, specs)

    async def _join(self, ctx: Ctx, asset_id: str, specs: list[ComponentSpec]) -> Reply:
        """Add ``specs`` to the pending asset (its lock held): 200 with the URLs of those
        components only. One already declared with another size or digest is a 409
        ``conflict``; declared the same way again, it is harmless (its URLs come again)."""
        asset = await self.core.db.read(require_asset, ctx.principal, asset_id, "write")
        if asset.state != "pending":
            raise conflict(f"asset {asset_id} is {asset.state}", code="asset_not_pending")
        by_name = {c.name: c for c in asset.components}
        new: list[ComponentSpec] = []
        for s in specs:
            c = by_name.get(s.name)
            if c is None:
                new.append(s)
            elif (s.size is not None and c.size is not None and s.size != c.size) or (
                    s.sha256 and c.bound_sha256 and s.sha256 != c.bound_sha256):
                raise conflict(f"asset {asset_id} already has component {s.name!r} with "
                               "another size or digest")
        if len(by_name) + len(new) > MAX_COMPONENTS:
            raise invalid(f"components: at most {MAX_COMPONENTS} components per asset")
        both = clash([*by_name, *(s.name for s in new)])
        if both:
            raise invalid(f"components: component {both[1]!r} needs {both[0]!r} to be a "
                          f"directory, but {both[0]!r} is also a component")
        start = max((c.position for c in asset.components), default=-1) + 1
        added, planned = await self._new_rows(asset_id, new, start)
        by_name.update({c.name: c for c in added})
        return await self._commit_urls(
            ctx, asset_id, [by_name[s.name] for s in specs],
            self._while_pending(ctx, asset_id, partial(db.insert_components, asset_id=asset_id,
                                                       comps=added)), planned)

    async def _new_rows(self, asset_id: str, specs: list[ComponentSpec], start: int
                        ) -> tuple[list[ComponentRow], list[ComponentRow]]:
        """Rows for newly declared components (positions from ``start``), those with a size
        planned (a multipart upload created above the threshold) and bound to their declared
        digest; and the planned ones (to abort if the rows are not committed)."""
        rows = [ComponentRow(s.name, f"assets/{asset_id}/{s.name}", start + i,
                             content_type=s.content_type) for i, s in enumerate(specs)]
        sized = [(i, s.size) for i, s in enumerate(specs) if s.size is not None]
        planned = await self._plan_many([(rows[i], size) for i, size in sized])
        for (i, _), c in zip(sized, planned, strict=True):
            rows[i] = self._bind(c, specs[i].sha256)
        return rows, planned

    async def _commit_urls(
        self, ctx: Ctx, asset_id: str, comps: list[ComponentRow],
        save: Callable[[sqlite3.Connection], None], planned: list[ComponentRow],
        parts: dict[str, list[int]] | None = None, status: int = 200,
    ) -> Reply:
        """``status`` with the URLs of ``comps``, once ``save`` has recorded the change (or
        refused it) in one transaction; the multipart uploads just created for ``planned``
        are aborted if it does not commit."""
        try:
            body = {
                "asset_id": asset_id,
                "state": "pending",
                "expires_at": self.core.expires_at(),
                **(await self._urls(comps, parts)),
            }

            def txn(conn: sqlite3.Connection) -> Reply:
                save(conn)
                return Reply(status, body)

            return await ctx.commit(txn)
        except BaseException:
            if not ctx.committed:
                await self._abort_quietly(planned)
            raise

    @staticmethod
    def _while_pending(ctx: Ctx, asset_id: str, save: Callable[[sqlite3.Connection], None]
                       ) -> Callable[[sqlite3.Connection], None]:
        """``save``, if the caller may still write the asset and it is pending; it counts
        as upload activity (``server.pending_ttl_s``)."""
        def run(conn: sqlite3.Connection) -> None:
            current = require_asset(conn, ctx.principal, asset_id, "write")
            if current.state != "pending":
                raise conflict(f"asset {asset_id} is {current.state}", code="asset_not_pending")
            save(conn)
            db.touch(conn, asset_id)

        return run

    async def inline(self, ctx: Ctx) -> Reply:
        body = ctx.body(Inline)
        asset_type, content, content_type = body.asset_type, body.content, body.content_type
        if isinstance(content, str):
            data = content.encode("utf-8", "surrogatepass")
            content_type = content_type or "text/plain"
        else:
            data = json.dumps(content, ensure_ascii=False).encode("utf-8", "surrogatepass")
            content_type = content_type or "application/json"
        limit = self.cfg.inline_max_bytes
        if len(data) > limit:
            raise fail(
                413,
                "payload_too_large",
                f"inline content is {len(data)} bytes, the limit is {limit} "
                "(server.inline_max_bytes): upload it as a binary asset",
            )
        output_of = body.output_of or None
        visibility, organization_id = _placement(ctx, body)
        if output_of:
            await self.core.db.read(require_run_for_output, ctx.principal, output_of)
        asset_id = new_id("ast")
        async with self.core.asset_locks.hold(asset_id):  # see _create
            key = f"assets/{asset_id}/content"
            info = await self.core.storage.put_object(key, data, content_type)
            sha = info.sha256 or hashlib.sha256(data).hexdigest()
            now = utcnow()
            asset = AssetRow(
                asset_id=asset_id,
                asset_type=asset_type,
                state="ready",
                created_by=ctx.principal.id,
                visibility=visibility,
                created_at=now,
                output_of=output_of,
                organization_id=organization_id,
                content_type=content_type,
                finalized_at=now,
                components=[
                    ComponentRow("content", key, 0, info.size, sha, True, content_type,
                                 uploaded=True)
                ],
            )

            def txn(conn: sqlite3.Connection) -> Reply:
                if output_of:
                    require_run_for_output(conn, ctx.principal, output_of)
                db.insert_asset(conn, asset, text=searchable_text(content))
                return Reply(201, asset.to_json())

            try:
                return await ctx.commit(txn)
            except BaseException:
                if not ctx.committed:
                    await _drop(self.core, asset.components)
                raise

    # -- upload URLs and what storage holds --

    async def upload_urls(self, ctx: Ctx) -> Reply:
        asset_id = ctx.arg("asset_id")
        body = ctx.body(RefreshUrls)
        wanted = body.components
        parts_filter = {name: sorted(set(numbers)) for name, numbers in (body.parts or {}).items()}
        async with self.core.asset_locks.hold(asset_id):
            asset = await self.core.db.read(require_asset, ctx.principal, asset_id, "write")
            if asset.state != "pending":
                raise conflict(f"asset {asset_id} is {asset.state}", code="asset_not_pending")
            by_name = {c.name: c for c in asset.components}
            for name in [s.name for s in wanted or []] + list(parts_filter):
                if name not in by_name:
                    raise invalid(f"asset {asset_id} has no component {name!r}")
            if wanted is None:
                names = [c.name for c in asset.components]
            else:
                names = list(dict.fromkeys([s.name for s in wanted] + list(parts_filter)))
            unbound = []
            for s in wanted or []:
                c = by_name[s.name]
                if c.bound_sha256 and ((s.sha256 and s.sha256 != c.bound_sha256) or
                                       (s.size is not None and s.size != c.size)):
                    # Declared again otherwise: URLs bound to the old digest may still write
                    # the key, so the bytes are read back at finalize as in version 1.
                    by_name[s.name] = replace(c, bound_sha256=None)
                    unbound.append(s.name)
            sizes = {s.name: s.size for s in wanted or [] if s.size is not None}
            replan = [(by_name[n], size) for n, size in sizes.items() if size != by_name[n].size]
            kept = [by_name[n] for n in names if n not in {c.name for c, _ in replan}]
            replan += [(c, c.size) for c in await self._lost_uploads(kept) if c.size is not None]
            planned = await self._plan_many(replan)
            replaced = [old for old, _ in replan]
            by_name.update({c.name: c for c in planned})
            selected = [by_name[n] for n in names]
            try:
                self._check_parts_filter(selected, parts_filter)
            except BaseException:
                await self._abort_quietly(planned)
                raise
            replanned = {c.name for c in planned}
            changed = planned + [by_name[n] for n in unbound if n not in replanned]
            reply = await self._commit_urls(
                ctx, asset_id, selected,
                self._while_pending(ctx, asset_id, partial(db.save_components,
                                                           asset_id=asset_id, comps=changed)),
                planned, parts_filter)
            await self._abort_quietly(replaced)  # the old plans: their parts are now garbage
            return reply

    async def _lost_uploads(self, comps: list[ComponentRow]) -> list[ComponentRow]:
        """Multipart components whose upload storage no longer has (aborted behind our back,
        or a store that lost it) and whose object is not assembled either: they get a new
        plan, else their part URLs could only ever answer NoSuchUpload."""
        storage = self.core.storage

        async def lost(c: ComponentRow) -> bool:
            if not c.upload_id or await storage.list_parts(c.object_key, c.upload_id) is not None:
                return False
            return await storage.head(c.object_key) is None

        flags = await self.core.gather(lost(c) for c in comps)
        return [c for c, gone in zip(comps, flags, strict=True) if gone]

    @staticmethod
    def _check_parts_filter(comps: list[ComponentRow], parts: dict[str, list[int]]) -> None:
        for c in comps:
            numbers = parts.get(c.name)
            if not numbers:
                continue
            if not (c.upload_id and c.size is not None and c.part_size):
                raise invalid(f"component {c.name!r} is not planned as multipart: no parts")
            count = part_count(c.size, c.part_size)
            bad = [n for n in numbers if not 1 <= n <= count]
            if bad:
                raise invalid(f"component {c.name!r} has parts 1-{count}, not {bad[0]}")

    async def uploads(self, ctx: Ctx) -> Reply:
        asset_id = ctx.arg("asset_id")
        asset = await self.core.db.read(require_asset, ctx.principal, asset_id, "read")
        storage = self.core.storage
        if asset.state == "pending":
            await touch(self.core, asset_id)  # an uploader reconciling: alive

        async def one(c: ComponentRow) -> dict[str, Any]:
            out: dict[str, Any] = {"uploaded": False, "size": None, "parts": []}
            if asset.state == "ready":
                return {**out, "uploaded": True, "size": c.size}
            if c.upload_id:
                out.update(part_size=c.part_size, declared_size=c.size)
                parts = await storage.list_parts(c.object_key, c.upload_id)
                if parts is not None:
                    out["parts"] = [p.to_json() for p in parts]
                    return out
                # no such upload: completed by an earlier finalize attempt, or aborted
            info = await storage.head(c.object_key)
            if info is not None:
                out.update(uploaded=True, size=info.size)
            return out

        listed = await self.core.gather(one(c) for c in asset.components)
        return Reply(
            200,
            {
                "asset_id": asset_id,
                "state": asset.state,
                "components": {c.name: v for c, v in zip(asset.components, listed, strict=True)},
            },
        )

    # -- finalize, abandon --

    async def finalize(self, ctx: Ctx) -> Reply:
        asset_id = ctx.arg("asset_id")
        specs = ctx.body(Finalize).specs()
        async with self.core.asset_locks.hold(asset_id):
            asset = await self.core.db.read(require_asset, ctx.principal, asset_id, "write")
            names = {c.name for c in asset.components}
            unknown = sorted(set(specs) - names)
            if unknown:
                raise invalid(f"asset {asset_id} has no component {unknown[0]!r}")
            if asset.state == "abandoned":
                raise conflict(f"asset {asset_id} is abandoned", code="asset_not_pending")
            if asset.state == "ready":
                return Reply(200, self._same_as_ready(asset, specs).to_json())
            bound = [c.object_key for c in asset.components
                     if c.bound_sha256 and c.object_key == upload_key(c.object_key)]
            stored = (await self.core.storage.sizes(f"{UPLOAD_PREFIX}/{asset_id}/", bound)
                      if bound else {})
            in_place = self.core.storage.create_only_puts
            checked = {c.name: self._bound_row(c, specs.get(c.name, FinalizeSpec()),
                                               stored[c.object_key], c.object_key)
                       for c in asset.components
                       if in_place and c.bound_sha256 and c.object_key in stored}
            rest = await self.core.gather(
                (self._verify(c, specs.get(c.name, FinalizeSpec()), stored)
                 for c in asset.components if c.name not in checked),
            )  # (no task per component that needs no storage call: 1000 cost 30 ms)
            more = iter(rest)
            results = [checked.get(c.name) or next(more) for c in asset.components]

            def txn(conn: sqlite3.Connection) -> Reply:
                current = require_asset(conn, ctx.principal, asset_id, "write")
                if current.state == "abandoned":
                    raise conflict(f"asset {asset_id} is abandoned", code="asset_not_pending")
                if current.state == "pending":
                    db.save_components(conn, asset_id, results)
                    db.set_state(conn, asset_id, "ready")
                done = db.get_asset(conn, asset_id)
                assert done is not None
                return Reply(200, done.to_json())

            reply = await ctx.commit(txn)
            promoted = [old for old, new in zip(asset.components, results, strict=True)
                        if not old.upload_id and old.object_key != new.object_key]
            await self._drop_upload_keys(promoted)
            return reply

    async def _drop_upload_keys(self, comps: list[ComponentRow]) -> None:
        """After finalize: the single-PUT objects, now copied to their final keys."""
        try:
            await self.core.storage.delete_many([c.object_key for c in comps])
        except Exception as e:  # garbage that no URL serves, not an error
            log.warning("could not drop the upload objects of %d components: %s", len(comps), e)

    @staticmethod
    def _same_as_ready(asset: AssetRow, specs: dict[str, FinalizeSpec]) -> AssetRow:
        """A ready asset finalized again: fine if the body agrees with it (a retry)."""
        for c in asset.components:
            s = specs.get(c.name)
            if s is None:
                continue
            if (s.size is not None and s.size != c.size) or (
                s.sha256 is not None and c.sha256 is not None and s.sha256 != c.sha256
            ):
                raise conflict(
                    f"asset {asset.asset_id} is already ready and component {c.name!r} differs "
                    "from this finalize request",
                    code="asset_not_pending",
                )
        return asset

    async def _verify(self, c: ComponentRow, spec: FinalizeSpec,
                      stored_sizes: dict[str, int]) -> ComponentRow:
        """Check one component against storage (assembling a multipart upload); the row
        to record. Raises components_missing / checksum_mismatch. ``stored_sizes``: the
        sizes of the checksum-bound upload keys that storage holds (one listing)."""
        storage = self.core.storage
        declared = spec.size if spec.size is not None else c.size
        info = None
        if c.bound_sha256 and c.object_key in stored_sizes:
            return await self._verify_bound(c, spec, stored_sizes[c.object_key])
        if c.upload_id:
            stored = await storage.list_parts(c.object_key, c.upload_id)
            if stored is None:  # assembled by an earlier attempt, or aborted
                info = await storage.head(c.object_key)
                if info is None:
                    raise _missing(f"component {c.name!r}: its multipart upload is gone")
            else:
                planned = part_count(c.size, c.part_size) if c.size and c.part_size else 0
                if declared != c.size:
                    planned = 0  # finalizing another size than planned: take what is there
                parts = self._choose_parts(c.name, spec.parts, stored, planned)
                total = sum(p.size for p in parts)
                if declared is not None and total != declared:
                    raise _mismatch(
                        f"component {c.name!r}: its parts hold {total} bytes, declared {declared}"
                    )
                small = [p.part_number for p in parts[:-1] if p.size < MIN_PART_BYTES]
                if small:
                    raise _mismatch(
                        f"component {c.name!r}: part {small[0]} is under 5 MiB and not the last"
                    )
                try:
                    info = await storage.complete_multipart(c.object_key, c.upload_id, parts)
                except PartsRefused as e:
                    refuse = _missing if e.missing else _mismatch
                    raise refuse(f"component {c.name!r}: {e}") from None
        else:  # a single PUT: finalize a copy the upload URL cannot reach
            key = final_key(c.object_key)
            info = await storage.copy(c.object_key, key)
            if info is None:
                raise _missing(f"component {c.name!r} is not in storage")
            c = replace(c, object_key=key)
        if declared is not None and info.size != declared:
            raise _mismatch(
                f"component {c.name!r}: storage holds {info.size} bytes, declared {declared}"
            )
        sha = info.sha256 or await storage.sha256(c.object_key, info.size)
        if spec.sha256 and sha and sha != spec.sha256:
            raise _mismatch(
                f"component {c.name!r}: SHA-256 of the stored bytes is {sha}, "
                f"declared {spec.sha256}"
            )
        return replace(
            c,
            size=info.size,
            sha256=sha or spec.sha256,
            sha256_verified=sha is not None,
            content_type=spec.content_type or c.content_type,
            upload_id=None,
            uploaded=True,
        )

    async def _verify_bound(self, c: ComponentRow, spec: FinalizeSpec,
                            size: int) -> ComponentRow:
        """A component whose URL bound its digest: the store refused any other bytes at
        its key (every URL for that key binds the same digest: upload-urls never changes
        it), so its existence and size are enough; nothing is read back. Where the store
        honours create-only PUTs the bytes stay where they are: no URL can replace them
        (a delete leaves a tombstone, see :func:`_drop`). Elsewhere they are copied to the
        final key that no upload URL names, so that no PUT reaches them once the asset is
        ready and none brings them back after a delete."""
        row = self._bound_row(c, spec, size, c.object_key)
        if not self.core.storage.create_only_puts:  # else no URL can replace it: it stays
            key = final_key(c.object_key)
            if await self.core.storage.copy(c.object_key, key, size) is None:
                raise _missing(f"component {c.name!r} is not in storage")
            row = replace(row, object_key=key)
        return row

    @staticmethod
    def _bound_row(c: ComponentRow, spec: FinalizeSpec, size: int, key: str) -> ComponentRow:
        """The row of a checksum-bound component that storage holds with ``size`` bytes
        (at ``key``, where it stays), or why it cannot be finalized."""
        assert c.bound_sha256 is not None  # and the listing found it at c.object_key
        if c.size is not None and size != c.size:
            raise _mismatch(f"component {c.name!r}: storage holds {size} bytes, declared "
                            f"{c.size}")
        if spec.size is not None and spec.size != size:
            raise _mismatch(f"component {c.name!r}: storage holds {size} bytes, declared "
                            f"{spec.size}")
        if spec.sha256 and spec.sha256 != c.bound_sha256:
            raise _mismatch(f"component {c.name!r}: registered with SHA-256 "
                            f"{c.bound_sha256}, finalized with {spec.sha256}")
        return replace(c, object_key=key, size=size, sha256=c.bound_sha256,
                       sha256_verified=True,
                       content_type=spec.content_type or c.content_type, upload_id=None,
                       uploaded=True)

    @staticmethod
    def _choose_parts(
        name: str, claimed: list[PartClaim] | None, stored: list[PartInfo], planned: int
    ) -> list[PartInfo]:
        """The parts to assemble: those the client names (each must be stored with that
        ETag), else parts 1..N of the plan (or all stored parts, which must be contiguous)."""
        by_number = {p.part_number: p for p in stored}
        if claimed:
            chosen = []
            for p in claimed:
                have = by_number.get(p.part_number)
                if have is None:
                    raise _missing(f"component {name!r}: part {p.part_number} is not in storage")
                if etag_value(have.etag) != etag_value(p.etag):
                    raise _mismatch(
                        f"component {name!r}: part {p.part_number} ETag {p.etag} does not "
                        f"match the stored part ({have.etag})"
                    )
                chosen.append(have)
            return chosen
        if not stored:
            raise _missing(f"component {name!r}: no part is in storage")
        count = planned or len(stored)
        gaps = [n for n in range(1, count + 1) if n not in by_number]
        if gaps:
            raise _missing(
                f"component {name!r}: part {gaps[0]} of {count} is not in storage"
                + (f" ({len(gaps)} missing)" if len(gaps) > 1 else "")
            )
        return [by_number[n] for n in range(1, count + 1)]

    async def abandon(self, ctx: Ctx) -> Reply:
        asset_id = ctx.arg("asset_id")
        reason = ctx.body(Reason).reason or ""

        def txn(conn: sqlite3.Connection) -> Reply:
            asset = require_asset(conn, ctx.principal, asset_id, "write")
            if asset.state == "ready":
                raise conflict(
                    f"asset {asset_id} is ready; only a pending asset can be abandoned",
                    code="asset_not_pending",
                )
            if asset.state == "pending":
                db.set_state(conn, asset_id, "abandoned", reason=reason)
            done = db.get_asset(conn, asset_id)
            assert done is not None
            return Reply(200, done.to_json())

        async with self.core.asset_locks.hold(asset_id):
            reply = await ctx.commit(txn)
        await release_storage(self.core, asset_id)
        return reply

    # -- read --

    async def get(self, ctx: Ctx) -> Reply:
        asset_id = ctx.arg("asset_id")
        asset = await self.core.db.read(require_asset, ctx.principal, asset_id, "read")
        body = asset.to_json()
        if query_flag(ctx.request, "include_presigned"):
            urls: dict[str, str] = {}
            if asset.state == "ready":  # require_asset checked read access: URLs may go out
                by_key = await self.core.storage.presign_gets(
                    [c.object_key for c in asset.components], self.cfg.url_expiry_s)
                urls = {c.name: by_key[c.object_key] for c in asset.components}
            body["download_urls"] = urls
            body["expires_at"] = self.core.expires_at()
        return Reply(200, body)

    async def list(self, ctx: Ctx) -> Reply:
        q = ctx.request.query
        state = one_of(q.get("state") or None, STATES, "state")
        found = await self.core.db.read(
            lambda conn: db.list_assets(
                conn,
                output_of=q.get("output_of") or None,
                state=state,
                asset_type=q.get("asset_type") or None,
            )
        )
        visible = [a.to_json() for a in found if can(ctx.principal, a, "read")]
        return Reply(200, {"assets": visible})

    async def search(self, ctx: Ctx) -> Reply:
        """``GET /v1/assets/search`` (API 1.1 ``search``): the assets the caller may read
        that match ``q``, best first, a page at a time."""
        if not self.cfg.search:
            raise fail(404, "not_found", "this server does not offer search (API 1.1; "
                       "server.search is off)")
        q = ctx.request.query
        text = (q.get("q") or "").strip()
        if not db.fts_query(text):
            raise invalid("q is required: the words to search for")
        if len(text) > MAX_QUERY:
            raise invalid(f"q is {len(text)} characters long, the limit is {MAX_QUERY}")
        state = one_of(q.get("state") or None, STATES, "state")
        limit = _int_param(q.get("limit"), "limit", 50, 1, 200)
        offset = _int_param(q.get("cursor"), "cursor", 0, 0, 10**9)
        principal = ctx.principal

        def read(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], bool]:
            hits = db.search_assets(
                conn, principal.id, principal.identities(), [s.id for s in principal.scopes],
                text, asset_type=q.get("asset_type") or None, state=state,
                output_of=q.get("output_of") or None, limit=limit + 1, offset=offset)
            out = []
            for asset_id, snippet in hits[:limit]:
                asset = db.get_asset(conn, asset_id)
                if asset is None or not can(principal, asset, "read"):
                    log.error("search: the query's access rule let %s see %s, which "
                              "allows() refuses: left out", principal.id, asset_id)
                    continue
                body = db.search_text(conn, asset_id)
                first = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
                out.append({**asset.to_json(), "snippet": snippet, "text": first[:200]})
            return out, len(hits) > limit

        found, more = await self.core.db.read(read)
        return Reply(200, {"assets": found,
                           "next_cursor": str(offset + limit) if more else None})

    # -- validity, delete --

    async def deprecate(self, ctx: Ctx) -> Reply:
        return await self._flag(ctx, "deprecated")

    async def invalidate(self, ctx: Ctx) -> Reply:
        return await self._flag(ctx, "invalidated")

    async def _flag(self, ctx: Ctx, flag: str) -> Reply:
        asset_id = ctx.arg("asset_id")
        reason = ctx.body(Reason).reason or ""

        def txn(conn: sqlite3.Connection) -> Reply:
            require_asset(conn, ctx.principal, asset_id, "write")
            db.set_flag(conn, asset_id, flag, reason)
            done = db.get_asset(conn, asset_id)
            assert done is not None
            return Reply(200, done.to_json())

        return await ctx.commit(txn)

    async def delete(self, ctx: Ctx) -> Reply:
        asset_id = ctx.arg("asset_id")
        gone: list[ComponentRow] = []

        def txn(conn: sqlite3.Connection) -> Reply:
            asset = require_asset(conn, ctx.principal, asset_id, "delete")
            if db.is_linked(conn, asset_id):
                raise conflict(
                    f"asset {asset_id} is referenced by an experiment or variation",
                    code="asset_linked",
                )
            gone.extend(asset.components)
            db.delete_asset(conn, asset_id)
            return Reply(204, None)

        async with self.core.asset_locks.hold(asset_id):
            reply = await ctx.commit(txn)
            self.core.crash.hit("after_asset_deleted")
            await _drop(self.core, gone)
        return reply


def routes(core: Core) -> list[Route]:
    a = Assets(core)
    return [
        ("POST", "/v1/assets", a.register, Register),
        ("GET", "/v1/assets", a.list, None),
        ("POST", "/v1/assets/inline", a.inline, Inline),
        ("GET", "/v1/assets/search", a.search, None),
        ("GET", "/v1/assets/{asset_id}", a.get, None),
        ("DELETE", "/v1/assets/{asset_id}", a.delete, None),
        ("POST", "/v1/assets/{asset_id}/upload-urls", a.upload_urls, RefreshUrls),
        ("POST", "/v1/assets/{asset_id}/components", a.add_components, AddComponents),
        ("GET", "/v1/assets/{asset_id}/uploads", a.uploads, None),
        ("POST", "/v1/assets/{asset_id}/finalize", a.finalize, Finalize),
        ("POST", "/v1/assets/{asset_id}/abandon", a.abandon, Reason),
        ("POST", "/v1/assets/{asset_id}/deprecate", a.deprecate, Reason),
        ("POST", "/v1/assets/{asset_id}/invalidate", a.invalidate, Reason),
    ]
