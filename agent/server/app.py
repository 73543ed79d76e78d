"""The local Chronicle's aiohttp application: the shared request context (who is calling,
the parsed body, the idempotency key), the endpoint wrapper that applies authentication and
idempotency to every call, and the route table.

Handlers live by concern: :mod:`.assets` (lifecycle, upload, download, validity, delete),
:mod:`.sharing` (grants, visibility, ownership, scopes), :mod:`.runs` (runs, experiments,
variations). Each mutating handler ends in :meth:`Ctx.commit`, one SQLite transaction that
makes its change and stores the idempotent response together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from agent.config import ServerSection
from agent.crashpoints import CrashPoints

from . import auth, db
from .auth import Principal, Protected, TokenStore
from .bodies import B, Body, parse
from .db import AssetRow, Database, IdemKey
from .http import (
    RETRY_AFTER_S,
    Reply,
    conflict,
    error_middleware,
    fail,
    forbidden,
    invalid,
    not_found,
    read_json_object,
)
from .locks import KeyedLocks
from .storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_IDEMPOTENCY_KEY = 255


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class BodyBudget:
    """Bytes of JSON request bodies in flight, all requests together: each mutating call
    reserves its body's size (its Content-Length, or the largest body allowed when it has
    none) from reading until its answer. One that does not fit now is answered 503 with
    Retry-After (clients retry it), one that could never fit 413: waiting would only hold
    the connection and its buffers longer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        if size > self.limit:
            raise fail(
                413,
                "payload_too_large",
                f"request body of {size} bytes is over the server's JSON body budget of "
                f"{self.limit} bytes (server.json_body_budget_bytes)",
            )
        if self.used + size > self.limit:
            self.refused += 1
            raise fail(
                503,
                "server_busy",
                f"too many request bodies in flight (server.json_body_budget_bytes = "
                f"{self.limit}): retry in {RETRY_AFTER_S} s",
            )
        self.used += size
        try:
            yield
        finally:
            self.used -= size


@dataclass
class Core:
    """Everything a handler needs: configuration, database, storage, tokens, locks."""

    config: ServerSection
    db: Database
    storage: Storage
    tokens: TokenStore
    version: str
    public_url: str = ""
    asset_locks: KeyedLocks = field(default_factory=KeyedLocks)
    idem_locks: KeyedLocks = field(default_factory=KeyedLocks)
    touched: dict[str, float] = field(default_factory=dict)
    """Asset id → when a PUT last recorded upload activity (time.monotonic())."""
    server_id: str = ""
    """This server's name among those using one store (:meth:`Storage.claim`)."""
    crash: CrashPoints = field(default_factory=lambda: CrashPoints(""))
    """``debug.crash_point``'s server steps (tests of what a killed server leaves)."""
    bodies: BodyBudget = field(init=False)

    def __post_init__(self) -> None:
        self.bodies = BodyBudget(self.config.json_body_budget_bytes)

    async def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        principal = None
        if scheme.lower() == "bearer":
            principal = await self.tokens.principal(token.strip())
        if principal is None:
            why = "missing bearer token" if not header else "unknown bearer token"
            raise fail(401, "unauthorized", f"{why}: send Authorization: Bearer <token>")
        return principal

    @property
    def features(self) -> list[str]:
        """The API 1.1 features this server offers (``GET /v1/health``)."""
        return [f for f, on in (("checksum_urls", self.config.checksum_urls),
                                ("search", self.config.search),
                                ("asset_keys", self.config.asset_keys)) if on]

    def expires_at(self) -> str:
        at = datetime.now(UTC) + timedelta(seconds=self.config.url_expiry_s)
        return at.isoformat(timespec="seconds").replace("+00:00", "Z")

    async def gather(self, aws: Iterable[Awaitable[T]], limit: int = 16) -> list[T]:
        """Await storage calls with at most ``limit`` in flight; the first error is raised
        after all have finished (in input order)."""
        sem = asyncio.Semaphore(limit)

        async def one(aw: Awaitable[T]) -> T:
            async with sem:
                return await aw

        results = await asyncio.gather(*(one(a) for a in aws), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]


class Ctx:
    """One API call: the caller, its JSON body, and its idempotency key (if any)."""

    def __init__(
        self,
        core: Core,
        request: web.Request,
        principal: Principal,
        body: Body | None,
        idem: IdemKey | None,
    ) -> None:
        self.core = core
        self.request = request
        self.principal = principal
        self._body = body
        self._idem = idem
        self.committed = False
        """Whether :meth:`commit` made its change (clean-ups on failure check it)."""

    def arg(self, name: str) -> str:
        return self.request.match_info[name]

    def body(self, model: type[B]) -> B:
        """The request body, validated by the route's model (which must be ``model``)."""
        if not isinstance(self._body, model):
            raise TypeError(f"this route's body is {type(self._body).__name__}, "
                            f"not {model.__name__}")
        return self._body

    async def commit(self, fn: Callable[[sqlite3.Connection], Reply]) -> Reply:
        """Run ``fn`` in one write transaction that also stores this call's idempotency
        record (for a 2xx reply), so effect and recorded response commit together."""
        idem = self._idem

        def run(conn: sqlite3.Connection) -> Reply:
            reply = fn(conn)
            if idem is not None and 200 <= reply.status < 300:
                db.put_idempotent(conn, idem, reply.status, reply.body)
            return reply

        # Shielded: once sent to the database thread the transaction runs to its end, and a
        # cancelled handler still learns whether it committed (``committed``), which decides
        # the storage clean-up of its ``except`` path.
        write = asyncio.ensure_future(self.core.db.write(run))
        try:
            reply = await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            self.committed = not write.cancelled() and write.exception() is None
            raise
        self.committed = True
        self._idem = None
        return reply

    async def record(self, reply: Reply) -> None:
        """Store the idempotency record of a call whose handler committed nothing."""
        if self._idem is not None and 200 <= reply.status < 300:
            await self.commit(lambda conn: reply)


Handler = Callable[[Ctx], Awaitable[Reply]]
Route = tuple[str, str, Handler, type[Body] | None]
"""A handler module's route: method, path template, handler, and the model its body is
validated with (None: no body is read; a GET never reads one)."""


def _request_hash(request: web.Request, body: dict[str, Any]) -> str:
    canonical = json.dumps(
        [request.method, request.path, sorted(request.query.items()), body],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _body_size(request: web.Request, core: Core) -> int:
    """What a request's body may take: its Content-Length; for a chunked body, the largest
    body allowed; none at all without either (a DELETE, say)."""
    if request.content_length is not None:
        return request.content_length
    return client_max(core) if request.body_exists else 0


def endpoint(
    core: Core, handler: Handler, *, mutating: bool = False, model: type[Body] | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a handler: authenticate, validate the body with ``model`` and apply
    ``Idempotency-Key`` (to a mutating call)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        principal = await core.authenticate(request)
        if not mutating:
            return await answer(request, principal, {})
        with core.bodies.hold(_body_size(request, core)):
            return await answer(request, principal, await read_json_object(request))

    async def answer(
        request: web.Request, principal: Principal, raw: dict[str, Any]
    ) -> web.StreamResponse:
        body = parse(model, raw) if model is not None else None
        key = request.headers.get("Idempotency-Key") if mutating else None
        if not key:
            ctx = Ctx(core, request, principal, body, None)
            return (await handler(ctx)).response()
        if len(key) > MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
            raise invalid(
                f"Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
            )
        idem = IdemKey(principal.id, key, _request_hash(request, raw))
        async with core.idem_locks.hold(f"{principal.id}\0{key}"):
            stored = await core.db.read(db.get_idempotent, idem)
            if stored is not None:
                request_hash, status, stored_body = stored
                if request_hash != idem.request_hash:
                    raise conflict("this Idempotency-Key was already used with a different request")
                response = Reply(status, stored_body).response()
                response.headers["Idempotent-Replayed"] = "true"
                return response
            ctx = Ctx(core, request, principal, body, idem)
            reply = await handler(ctx)
            await ctx.record(reply)
            return reply.response()

    return handle


# ---- access checks shared by the handler modules -------------------------------------------------


def protected(asset: AssetRow) -> Protected:
    return Protected(asset.created_by, asset.visibility, asset.organization_id, tuple(asset.grants))


def can(principal: Principal, asset: AssetRow, action: str) -> bool:
    return auth.allows(principal, protected(asset), action)


def require_asset(
    conn: sqlite3.Connection, principal: Principal, asset_id: str, action: str
) -> AssetRow:
    """The asset if ``principal`` may ``action`` it; 404 when it may not even read it (its
    existence is not disclosed), 403 when it may read it but not ``action`` it."""
    asset = db.get_asset(conn, asset_id)
    if asset is None or not can(principal, asset, "read"):
        raise not_found(f"asset {asset_id} not found")
    if not can(principal, asset, action):
        raise forbidden(f"{action} access to asset {asset_id} is required")
    return asset


def require_run_for_output(conn: sqlite3.Connection, principal: Principal, run_id: str) -> None:
    """A new asset may name ``run_id`` as ``output_of`` only if the run exists, belongs to
    the caller and has not ended."""
    run = db.get_run(conn, run_id)
    if run is None:
        raise not_found(f"run {run_id} not found")
    if not auth.owns(principal, run.created_by):
        raise forbidden(f"run {run_id} belongs to another principal")
    if run.ended_at is not None:
        raise conflict(f"run {run_id} has ended ({run.status}); it takes no new assets")


# ---- the application -------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    core: Core = request.app[CORE]
    return web.json_response(
        {
            "status": "ok",
            "url": core.public_url,
            "version": core.version,
            "storage": _public_storage(core.storage.description),
            "features": core.features,
        }
    )


METRICS = (
    ("gc_sweeps", "counter", "Storage sweeps run (its own and chronicle-agent server gc)."),
    ("gc_objects_removed", "counter", "Objects the storage sweep removed."),
    ("gc_bytes_removed", "counter", "Bytes of the objects the storage sweep removed."),
    ("gc_uploads_aborted", "counter", "Multipart uploads the storage sweep aborted."),
    ("gc_errors", "counter", "Storage sweep steps that failed (retried by the next sweep)."),
    ("gc_last_sweep_timestamp_seconds", "gauge", "When the last storage sweep ended."),
    ("release_failures", "counter",
     "Releases of an abandoned or deleted asset's storage that failed (left to the sweep)."),
    ("assets_expired", "counter", "Pending assets abandoned for inactivity (pending_ttl_s)."),
)


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text: the server's housekeeping totals (no asset counts: no token asked)."""
    core: Core = request.app[CORE]
    values = await core.db.read(db.counters)
    lines = []
    for name, kind, help_ in METRICS:
        full = f"chronicle_server_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}",
                  f"{full} {values.get(name, 0)}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain",
                        charset="utf-8", headers={"Cache-Control": "no-store"})


def _public_storage(description: str) -> str:
    """What health says about storage: an S3 store's bucket and endpoint, but never the
    disk store's directory (``file://``)."""
    return "file://" if description.startswith("file:") else description


async def _openapi(request: web.Request) -> web.Response:
    from .openapi import document

    return web.json_response(document(request.app.router, request.app[CORE].version,
                                      request.app[BODIES]))


CORE = web.AppKey("core", Core)
BODIES = web.AppKey("bodies", dict[tuple[str, str], type[Body]])
"""Each route's request-body model, by method and path template (for the OpenAPI document)."""


def client_max(core: Core) -> int:
    """The largest request body aiohttp reads (an inline asset's JSON, escaped)."""
    return max(32 * 1024 * 1024, core.config.inline_max_bytes * 8 + 1024 * 1024)


def make_app(core: Core) -> web.Application:
    from . import assets, runs, sharing

    app = web.Application(middlewares=[error_middleware], client_max_size=client_max(core))
    app[CORE] = core
    app.router.add_get("/v1/health", _health)
    app.router.add_get("/openapi.json", _openapi)  # no auth, like the health check
    app.router.add_get("/metrics", _metrics)  # housekeeping totals only: no auth either
    bodies: dict[tuple[str, str], type[Body]] = {}
    for module in (runs, assets, sharing):
        for method, path, handler, model in module.routes(core):
            app.router.add_route(method, path, endpoint(
                core, handler, mutating=method != "GET", model=model))
            if model is not None:
                bodies[method, path] = model
    app[BODIES] = bodies
    core.storage.add_routes(app, partial(assets.upload_gate, core))
    return app
