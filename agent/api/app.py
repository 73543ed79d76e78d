"""The daemon's socket API: HTTP/1.1 with JSON over a Unix socket.

Every call is tied to the caller's uid from SO_PEERCRED. Calls only validate and write rows
into the queue (or, for the guide's register step, register through the engine and answer
with the URLs); transfers happen in the workers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import anyio.to_thread
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent import __version__, validation
from agent.access import Refused, check_readable, check_writable_dest, file_size
from agent.chronicle import contract
from agent.errors import (
    AgentError,
    ChronicleError,
    NoReadyAsset,
    QuotaExceeded,
    StateDiskFull,
    UsageError,
)
from agent.fsid import Identity
from agent.queue import runstore
from agent.queue.store import (
    TERMINAL,
    Job,
    JobKind,
    Quota,
    StateConflict,
    credential_id,
    job_state,
)
from agent.transfer.primitives import check_component_name
from agent.transfer.selection import check_patterns, latest_call, require_latest, selected_view
from agent.transfer.upload import AssetUpload, Progress, url_hash

if TYPE_CHECKING:
    from pathlib import Path

    from agent.config import Settings
    from agent.metrics import Metrics
    from agent.queue.aqueue import AsyncQueue
    from agent.runs.registry import RunRegistry
    from agent.transfer.upload import Engine
    from agent.transfer.worker import Workers
    from agent.watch.watcher import Watcher
    from agent.yielding import Yielder


class Services(Protocol):
    """What the socket API serves from (the daemon offers it): the queue it writes jobs
    to, the runs, the watcher and the workers it reports on, the engine that registers."""

    settings: Settings
    queue: AsyncQueue
    runs: RunRegistry
    watcher: Watcher
    workers: Workers
    engine: Engine
    metrics: Metrics
    yielder: Yielder
    chronicle_url: str
    socket_path: Path
    state_dir: Path
    inline_max_bytes: int

    def staging_bytes(self) -> int: ...

log = logging.getLogger(__name__)
Visibility = Literal["private", "organization", "team", "public"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("run_id", "asset_type", check_fields=False)
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and (not v.isprintable() or len(v) > 256):
            raise ValueError("must be printable text of at most 256 characters")
        return v


class UploadReq(_Body):
    path: str
    asset_type: str = Field(min_length=1)
    run_id: str | None = None
    content_type: str | None = None
    visibility: Visibility | None = None


class InlineReq(_Body):
    asset_type: str = Field(min_length=1)
    content: dict[str, Any] | list[Any] | str | int | float | bool
    """Any JSON value but null (found by fuzzing: a null content reached the worker)."""
    content_type: str | None = None
    run_id: str | None = None
    visibility: Visibility | None = None


class ComponentSpec(_Body):
    name: str
    size: int | None = Field(default=None, ge=0)
    content_type: str | None = None


class PresignedReq(_Body):
    asset_type: str = Field(min_length=1)
    components: list[str | ComponentSpec] = Field(min_length=1)
    run_id: str | None = None
    visibility: Visibility | None = None


class ComponentReq(_Body):
    url: str | None = None
    name: str | None = None
    path: str
    content_type: str | None = None


class DownloadReq(_Body):
    asset_id: str | None = Field(default=None, min_length=1)
    """The asset; or, in its place, ``run_id`` and ``asset_type`` with ``latest``."""
    run_id: str | None = Field(default=None, min_length=1)
    asset_type: str | None = Field(default=None, min_length=1)
    latest: bool = False
    """The newest ready asset of ``run_id`` and ``asset_type`` (agent.transfer.selection),
    chosen when the job first runs and kept in it."""
    dest: str
    allow_invalid: bool = False
    include: list[str] | None = None
    """Globs on component names (fnmatch; ``*`` matches ``/`` too): only what matches one."""
    exclude: list[str] | None = None
    """Globs on component names: none of what matches one (applied after ``include``)."""

    def check_target(self) -> None:
        """Exactly one way of naming the asset; UsageError saying what is wrong."""
        if self.latest:
            if self.asset_id is not None:
                raise UsageError("asset_id and latest: true both choose the asset: give one")
            missing = [k for k in ("run_id", "asset_type") if getattr(self, k) is None]
            if missing:
                raise UsageError(f"latest: true needs {' and '.join(missing)}")
        elif self.asset_id is None:
            raise UsageError("give asset_id, or run_id and asset_type with latest: true")
        elif self.run_id is not None or self.asset_type is not None:
            raise UsageError("run_id and asset_type choose an asset only with latest: true "
                             "(drop them, or asset_id)")


class RunReq(_Body):
    run_id: str | None = None
    pid: int | None = Field(default=None, ge=1, le=2**31 - 1)
    """The process whose life is the run's (default: the caller's, from SO_PEERCRED).
    Bounded: found by fuzzing, a pid past 2**31 overflowed pidfd_open."""
    watch: list[dict[str, Any]] | None = None
    on_exit: Literal["drain", "abandon"] | None = None
    name: str | None = None
    lease: bool = False
    """Alive while heartbeats arrive within runs.lease_s, whatever the pid."""
    exec: bool = False
    """Registered by `chronicle-agent exec`, which reports the child's exit status."""


class FinishReq(_Body):
    status: Literal["finished", "failed", "crashed"] = "finished"
    exit_code: int | None = None


def peer_creds(request: web.Request) -> tuple[int, int, int]:
    """(pid, uid, gid) of the caller from SO_PEERCRED; pid 0 for a caller in another pid
    namespace. Not a Unix socket (tests): this process's own."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return os.getpid(), os.getuid(), os.getgid()
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return int(pid), int(uid), int(gid)


def peer_uid(request: web.Request) -> int:
    return peer_creds(request)[1]


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(e.status, "not_found" if e.status == 404 else
                                  "method_not_allowed" if e.status == 405 else "invalid_request",
                                  f"{request.method} {request.path}: {e.reason}")
        raise
    except ValidationError as e:
        return error_response(400, "invalid_request", validation.message(e))
    except StateConflict as e:
        return error_response(404 if e.code == "not_found" else 409, e.code, e.message)
    except ChronicleError as e:
        return error_response(e.status, e.code, e.message)
    except Refused as e:
        return error_response(403, e.code, e.message)
    except UsageError as e:
        return error_response(400, e.code, e.message)
    except StateDiskFull as e:
        return error_response(507, e.code, e.message)
    except QuotaExceeded as e:
        resp = error_response(429, e.code, e.message)
        resp.headers["Retry-After"] = "60"
        return resp
    except AgentError as e:
        return error_response(502, e.code, e.message)
    except Exception:
        log.exception("socket API %s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the daemon's log")


BODY_HEADROOM_BYTES = 1 << 20
"""Room in a request body for what surrounds an inline content of server.inline_max_bytes."""
BODY_READ_TIMEOUT_S = 60.0
"""A body that takes longer than this to arrive is refused (it holds body budget)."""


class BodyBudget:
    """The request bodies the socket API holds at once, in bytes (agent.api_body_budget_bytes):
    a request reserves its Content-Length (the per-request maximum when it sends none) before
    its body is read, and gives it back when answered; one that does not fit is answered 503
    ``busy`` with Retry-After, before its body is read. Found by a review: 16 concurrent 64 MiB
    bodies took the daemon to 1.27 GB."""

    def __init__(self, total_bytes: int, max_body_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.max_body_bytes = max_body_bytes
        self.held = 0

    @web.middleware
    async def middleware(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            return error_response(
                413, "payload_too_large",
                f"the request body is {length} bytes; the socket API takes at most "
                f"{self.max_body_bytes} (server.inline_max_bytes plus 1 MiB): upload large "
                "content as a file")
        need = self.max_body_bytes if length is None else length
        if self.held + need > self.total_bytes:
            resp = error_response(
                503, "busy",
                f"the daemon is reading {self.held} bytes of other requests' bodies (its limit "
                f"is agent.api_body_budget_bytes = {self.total_bytes}); try again shortly")
            resp.headers["Retry-After"] = "1"
            return resp
        self.held += need
        try:
            return await handler(request)
        finally:
            self.held -= need


async def _json(request: web.Request) -> Any:
    with anyio.move_on_after(BODY_READ_TIMEOUT_S) as scope:
        raw = await request.read()
    if scope.cancelled_caught:
        raise UsageError(f"the request body did not arrive within {BODY_READ_TIMEOUT_S:g} s",
                         code="request_timeout")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as e:
        raise UsageError(f"malformed JSON body: {e}") from None
    except RecursionError:  # found by fuzzing: "[[[[…" five thousand deep
        raise UsageError("malformed JSON body: nested too deeply") from None


def _bearer(request: web.Request) -> str | None:
    """The caller's own Chronicle token from ``Authorization: Bearer …`` (None: none sent)."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 4096 or not token.isprintable():
        raise UsageError("Authorization: expected 'Bearer <your Chronicle token>'",
                         code="unauthenticated")
    return token


LATEST_WAIT_S = 20.0
"""How long ``GET /v1/assets/latest`` waits for Chronicle's listing (retries included)."""
TOKEN_CHECK_TTL_S = 300.0
"""How long a caller's token, once accepted by Chronicle, is taken without asking again."""
TOKEN_CHECK_WAIT_S = 2.0
"""How long a request waits for Chronicle's word on a caller's new token."""


ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/v1/health", "health"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/openapi.json", "openapi"),
    ("POST", "/v1/runs", "create_run"),
    ("GET", "/v1/runs", "list_runs"),
    ("GET", "/v1/runs/{run_id}", "get_run"),
    ("GET", "/v1/runs/{run_id}/checkpoints", "run_checkpoints"),
    ("POST", "/v1/runs/{run_id}/heartbeat", "heartbeat"),
    ("POST", "/v1/runs/{run_id}/finish", "finish_run"),
    ("POST", "/v1/uploads", "upload"),
    ("POST", "/v1/assets/inline", "inline"),
    ("POST", "/v1/assets/presigned", "presigned"),
    ("POST", "/v1/assets/{asset_id}/components", "component"),
    ("POST", "/v1/assets/{asset_id}/finalize", "finalize"),
    ("POST", "/v1/downloads", "download"),
    ("GET", "/v1/assets/latest", "latest"),
    ("GET", "/v1/jobs", "jobs"),
    ("GET", "/v1/jobs/{job_id}", "job"),
    ("GET", "/v1/jobs/{job_id}/wait", "wait"),
    ("POST", "/v1/jobs/{job_id}/cancel", "cancel"),
    ("POST", "/v1/jobs/{job_id}/retry", "retry"),
)
"""The socket API's routes: (method, path, the Api method that serves it). Its OpenAPI
document is generated over them (agent/api/openapi.py)."""


class Api:
    def __init__(self, services: Services) -> None:
        self.d = services
        self.q = services.queue
        self._checked: dict[str, tuple[str, float]] = {}
        """credential_id(uid, token) → (principal id, good until): tokens Chronicle
        accepted."""

    def app(self) -> web.Application:
        max_body = self.d.inline_max_bytes + BODY_HEADROOM_BYTES
        budget = BodyBudget(max(self.d.settings.agent.api_body_budget_bytes, max_body), max_body)
        self.body_budget = budget
        app = web.Application(middlewares=[errors_middleware, budget.middleware],
                              client_max_size=max_body)
        for method, path, name in ROUTES:
            app.router.add_route(method, path, getattr(self, name))
        return app

    # ---- helpers -------------------------------------------------------------------------

    def _view(self, job: Job) -> dict[str, Any]:
        out = job.to_api()
        live = self.d.workers.live_bytes(job.job_id) if self.d.workers else None
        if live is not None:
            out["bytes_done"] = max(0, live)
        return out

    async def _own_job(self, request: web.Request) -> Job:
        jid = request.match_info["job_id"]
        job = await self.q.do(self.q.s.get, jid)
        uid = peer_uid(request)
        if job is None or (uid not in (0, job.uid)):
            raise StateConflict(f"no job {jid}", code="not_found")
        return job

    async def _enqueue(self, request: web.Request, kind: JobKind, payload: dict[str, Any],
                       run_id: str | None, asset_key: str | None = None,
                       bytes_total: int = 0, cred_id: str | None = None) -> web.Response:
        if cred_id is None and asset_key is None:
            cred_id = await self._cred(request)
        uid = peer_uid(request)
        job = await self.q.change(self.q.s.enqueue, kind, uid, payload,
                                  run_id=run_id, asset_key=asset_key, bytes_total=bytes_total,
                                  cred_id=cred_id, quota=self._quota(uid))
        log.info("job %s queued (%s)", job.job_id, kind)
        return web.json_response(self._view(job), status=202)

    async def _cred(self, request: web.Request) -> str | None:
        """The caller's own Chronicle token (``Authorization: Bearer …``), checked with
        Chronicle once (then remembered for a while) and kept in the queue database; its
        name there, or None when the caller sent none (the daemon's own token is used)."""
        token = _bearer(request)
        if token is None:
            return None
        uid = peer_uid(request)
        key = credential_id(uid, token)
        known = self._checked.get(key)
        principal = known[0] if known is not None and known[1] > time.monotonic() else None
        if principal is None:
            # Queueing never waits on Chronicle: a token Chronicle cannot judge in time (it
            # is slow or unreachable) is taken as is, and a bad one fails its job later.
            with anyio.move_on_after(TOKEN_CHECK_WAIT_S):
                try:
                    me = await self.d.engine.chronicle.send(contract.me_scopes(), token=token)
                except ChronicleError as e:
                    if e.status in (401, 403):
                        raise ChronicleError(
                            401, "unauthenticated",
                            f"Chronicle refused the token you sent ({e.code}: {e.message}); "
                            "check CHRONICLE_AGENT_CHRONICLE__TOKEN or chronicle.token_file, "
                            "or send none to have the daemon use its own") from None
                except AgentError as e:
                    log.info("could not check a caller's token with Chronicle yet: %s", e)
                else:
                    principal = me.principal_id
                    self._checked[key] = (principal, time.monotonic() + TOKEN_CHECK_TTL_S)
        return await self.q.do(self.q.s.put_credential, uid, token, principal)

    def _caller(self, request: web.Request) -> Identity:
        _pid, uid, gid = peer_creds(request)
        return Identity.of(uid, gid)

    def _quota(self, uid: int) -> Quota | None:
        """The queue's per-uid limits (``[queue]``); root is exempt unless
        queue.quota_exempt_root is false."""
        cfg = self.d.settings.queue
        if uid == 0 and cfg.quota_exempt_root:
            return None
        return Quota(cfg.quota_jobs, cfg.quota_payload_bytes)

    def _roots(self) -> list[str]:
        return [str(r) for r in self.d.settings.agent.roots]

    def _run_id(self, given: str | None) -> str | None:
        return given or None

    # ---- service -------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        counts = await self.q.do(self.q.s.counts)
        m = self.d.metrics
        return web.json_response({
            "version": __version__,
            "chronicle_url": self.d.chronicle_url,
            "queue": counts,
            "transfer": {"bytes_per_s_up": round(m.rate_up.per_s()),
                         "bytes_per_s_down": round(m.rate_down.per_s())},
            "staging_bytes": self.d.staging_bytes(),
            "staging": self.d.watcher.staging_info(),
            "cache": self.d.workers.cache.stats(),
            "socket": str(self.d.socket_path),
            "state_dir": str(self.d.state_dir),
            "pid": os.getpid(),
            "loop_lag_max_ms": round(m.loop_lag_max_s * 1000),
            "yield": self.d.yielder.info(),
        })

    async def openapi(self, request: web.Request) -> web.Response:
        from agent.api.openapi import document

        return web.json_response(document(request.app.router))

    async def metrics(self, request: web.Request) -> web.Response:
        counts = await self.q.do(self.q.s.counts)
        text = self.d.metrics.prometheus(counts, self.d.staging_bytes(),
                                         self.d.yielder.info())
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    # ---- runs ----------------------------------------------------------------------------

    async def create_run(self, request: web.Request) -> web.Response:
        req = RunReq.model_validate(await _json(request))
        pid, uid, _gid = peer_creds(request)
        run = await self.d.runs.register(
            req.run_id, req.pid, uid, req.name, peer_pid=pid, watch=req.watch,
            on_exit=req.on_exit, lease=req.lease, exec_wrapper=req.exec,
            cred_id=await self._cred(request))
        return web.json_response(run, status=201)

    async def _with_counts(self, runs: list[dict[str, Any]],
                           only: list[str] | None) -> list[dict[str, Any]]:
        """Each run with ``checkpoints`` (each one's fate) and ``checkpoint_counts`` (how
        many met each fate, and how many the watcher still waits to seal): two queries, in
        the queue's thread."""
        counts = await self.q.do(runstore.checkpoint_counts, self.q.s, only)
        listed = await self.q.do(runstore.run_checkpoints, self.q.s, only)
        zero = dict.fromkeys(runstore.COUNTED, 0)
        for run in runs:
            rid = run["run_id"]
            run["checkpoint_counts"] = counts.get(rid, zero) | {
                "unsealed": self.d.watcher.unsealed(rid)}
            run["checkpoints"] = [c.to_api() for c in listed.get(rid, [])]
        return runs

    async def list_runs(self, request: web.Request) -> web.Response:
        uid = peer_uid(request)
        runs = self.d.runs.list(None if uid == 0 else uid)
        return web.json_response({"runs": await self._with_counts(runs, None)})

    async def get_run(self, request: web.Request) -> web.Response:
        run = self.d.runs.get(request.match_info["run_id"], peer_uid(request))
        return web.json_response((await self._with_counts([run], [run["run_id"]]))[0])

    async def run_checkpoints(self, request: web.Request) -> web.Response:
        run = self.d.runs.get(request.match_info["run_id"], peer_uid(request))
        rows = await self.q.do(runstore.run_checkpoints, self.q.s, [run["run_id"]])
        return web.json_response({"run_id": run["run_id"],
                                  "checkpoints": [r.to_api() for r in rows[run["run_id"]]]})

    async def heartbeat(self, request: web.Request) -> web.Response:
        run = await self.d.runs.heartbeat(request.match_info["run_id"], peer_uid(request))
        return web.json_response(run)

    async def finish_run(self, request: web.Request) -> web.Response:
        req = FinishReq.model_validate(await _json(request))
        run = await self.d.runs.finish(request.match_info["run_id"], req.status,
                                       req.exit_code, uid=peer_uid(request))
        return web.json_response(run)

    # ---- uploads -------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        req = UploadReq.model_validate(await _json(request))
        if not os.path.isabs(req.path):
            raise UsageError(f"path must be absolute: {req.path!r}")
        caller = self._caller(request)
        await anyio.to_thread.run_sync(check_readable, req.path, caller, self._roots())
        payload = req.model_dump(exclude_none=True, exclude={"run_id"})
        payload.setdefault("visibility", self.d.settings.upload.visibility)
        payload["gid"] = caller.gid  # the worker reads as this uid and gid, at every step
        return await self._enqueue(request, JobKind.UPLOAD, payload, self._run_id(req.run_id))

    async def inline(self, request: web.Request) -> web.Response:
        req = InlineReq.model_validate(await _json(request))
        size = len(json.dumps(req.content))
        if size > self.d.inline_max_bytes:
            raise UsageError(f"inline content is {size} bytes; the limit is "
                             f"{self.d.inline_max_bytes} (upload it as a file instead)",
                             code="payload_too_large")
        payload = req.model_dump(exclude_none=True, exclude={"run_id"})
        payload.setdefault("visibility", self.d.settings.upload.visibility)
        return await self._enqueue(request, JobKind.INLINE, payload, self._run_id(req.run_id))

    async def presigned(self, request: web.Request) -> web.Response:
        """The guide's step 1, owned by the daemon: register now, answer with the URLs."""
        req = PresignedReq.model_validate(await _json(request))
        comps: list[dict[str, Any]] = []
        seen: set[str] = set()
        for c in req.components:
            spec = ComponentSpec(name=c) if isinstance(c, str) else c
            check_component_name(spec.name)
            if spec.name in seen:
                raise UsageError(f"component {spec.name!r} is listed twice")
            seen.add(spec.name)
            comps.append({"name": spec.name, "size": spec.size,
                          "content_type": spec.content_type})
        rec = await self.q.do(
            self.q.s.create_asset, asset_type=req.asset_type, uid=peer_uid(request),
            run_id=req.run_id, visibility=req.visibility or self.d.settings.upload.visibility,
            components=comps, cred_id=await self._cred(request),
        )
        up = AssetUpload(self.d.engine, rec, Progress())
        await up.ensure_registered()
        upload_urls = {n: p.url for n, p in up.plans.items() if p.url is not None}
        multipart = {
            n: {"part_size": p.part_size,
                "parts": [{"part_number": k, "url": u} for k, u in sorted(p.part_urls.items())]}
            for n, p in up.plans.items() if p.part_size is not None
        }
        return web.json_response({"asset_id": up.asset_id, "upload_urls": upload_urls,
                                  "multipart": multipart}, status=201)

    async def _asset_of(self, request: web.Request, asset_id: str, url: str | None) -> Any:
        rec = None
        if asset_id != "-":
            rec = await self.q.do(self.q.s.asset_by_id, asset_id)
        elif url:
            comp = await self.q.do(self.q.s.component_by_url_hash, url_hash(url))
            rec = await self.q.do(self.q.s.asset, comp.asset_key) if comp else None
        uid = peer_uid(request)
        if rec is None or uid not in (0, rec.uid):
            raise StateConflict(
                f"asset {asset_id} was not registered through this daemon "
                "(register it with create_asset_presigned first)", code="not_found")
        return rec

    async def component(self, request: web.Request) -> web.Response:
        req = ComponentReq.model_validate(await _json(request))
        rec = await self._asset_of(request, request.match_info["asset_id"], req.url)
        comps = {c.name: c for c in await self.q.do(self.q.s.components, rec.asset_key)}
        if req.name is not None:
            name = req.name
        elif req.url is not None:
            h = url_hash(req.url)
            match = [c.name for c in comps.values() if c.url_hash == h]
            if not match:
                raise UsageError("that URL is not one this asset's registration returned; "
                                 "pass the component name instead")
            name = match[0]
        else:
            raise UsageError("give the component's url or name")
        if name not in comps:
            raise UsageError(f"asset {rec.asset_id} has no component {name!r}; it has: "
                             + ", ".join(sorted(comps)))
        if not os.path.isabs(req.path):
            raise UsageError(f"path must be absolute: {req.path!r}")
        caller = self._caller(request)
        size = await anyio.to_thread.run_sync(file_size, req.path, caller, self._roots())
        payload = {"name": name, "path": req.path, "content_type": req.content_type,
                   "asset_type": rec.asset_type, "gid": caller.gid}
        return await self._enqueue(request, JobKind.COMPONENT, payload, rec.run_id,
                                   asset_key=rec.asset_key, bytes_total=size)

    async def finalize(self, request: web.Request) -> web.Response:
        rec = await self._asset_of(request, request.match_info["asset_id"], None)
        return await self._enqueue(request, JobKind.FINALIZE, {"asset_type": rec.asset_type},
                                   rec.run_id, asset_key=rec.asset_key)

    async def download(self, request: web.Request) -> web.Response:
        """Everything is checked before anything is made (the destination's missing
        parents, as the caller, by check_writable_dest) or queued."""
        req = DownloadReq.model_validate(await _json(request))
        req.check_target()
        req.include = check_patterns(req.include, "include") or None
        req.exclude = check_patterns(req.exclude, "exclude") or None
        caller = self._caller(request)
        await anyio.to_thread.run_sync(check_writable_dest, req.dest, caller, self._roots())
        payload = req.model_dump(exclude_none=True) | {"gid": caller.gid}
        if not req.latest:
            del payload["latest"]
        return await self._enqueue(request, JobKind.DOWNLOAD, payload, None)

    async def latest(self, request: web.Request) -> web.Response:
        """The asset a ``latest`` download of ``run_id`` and ``asset_type`` would take now
        (404 ``no_ready_asset`` when there is none), looked up with the caller's token:
        what ``Run.restore()`` asks first."""
        q = request.query
        given = {k: q.get(k) or "" for k in ("run_id", "asset_type")}
        for key, value in given.items():
            if not value:
                raise UsageError(f"{key}: required")
            if not value.isprintable() or len(value) > 256:
                raise UsageError(f"{key}: must be printable text of at most 256 characters")
        allow_invalid = (q.get("allow_invalid") or "false").lower()
        if allow_invalid not in ("true", "false"):
            raise UsageError("allow_invalid: true or false")
        run_id, asset_type = given["run_id"], given["asset_type"]
        token = _bearer(request)
        listing = None
        with anyio.move_on_after(LATEST_WAIT_S):  # within a client's patience (30 s)
            listing = await self.d.engine.chronicle.send(latest_call(run_id, asset_type),
                                                         token=token)
        if listing is None:
            return error_response(503, "chronicle_unreachable",
                                  f"Chronicle did not answer within {LATEST_WAIT_S:g} s "
                                  f"(daemon's Chronicle: {self.d.chronicle_url}); try again")
        try:
            asset = require_latest(listing.assets, run_id, asset_type, allow_invalid == "true")
        except NoReadyAsset as e:
            return error_response(404, e.code, e.message)
        return web.json_response({"asset": asset.model_dump(exclude={"download_urls"}),
                                  "selected": selected_view(asset)})

    # ---- jobs ----------------------------------------------------------------------------

    async def jobs(self, request: web.Request) -> web.Response:
        uid = peer_uid(request)
        q = request.query
        state = q.get("state") or None
        if state is not None:
            try:
                job_state(state)
            except ValueError as e:
                raise UsageError(f"state: {e}") from None
        jobs = await self.q.do(self.q.s.list_jobs, run_id=q.get("run_id") or None,
                               state=state, uid=None if uid == 0 else uid)
        return web.json_response({"jobs": [self._view(j) for j in jobs]})

    async def job(self, request: web.Request) -> web.Response:
        return web.json_response(self._view(await self._own_job(request)))

    async def wait(self, request: web.Request) -> web.Response:
        job = await self._own_job(request)
        try:
            timeout_s = float(request.query.get("timeout_s", "30"))
        except ValueError:
            raise UsageError("timeout_s must be a number of seconds") from None
        deadline = time.monotonic() + max(0.0, min(timeout_s, 300.0))
        while job.state not in TERMINAL:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await self.q.changed.wait(min(left, 1.0))
            found = await self.q.do(self.q.s.get, job.job_id)
            assert found is not None
            job = found
        return web.json_response(self._view(job))

    async def cancel(self, request: web.Request) -> web.Response:
        job = await self._own_job(request)
        job = await self.q.change(self.q.s.request_cancel, job.job_id)
        self.d.workers.cancel_running(job.job_id)
        return web.json_response(self._view(job))

    async def retry(self, request: web.Request) -> web.Response:
        job = await self._own_job(request)
        quota = self._quota(job.uid)
        if quota is not None:  # a retried job is live again: it counts
            quota.check(job.uid, *await self.q.do(self.q.s.usage, job.uid), 0)
        job = await self.q.change(self.q.s.retry, job.job_id, await self._cred(request))
        return web.json_response(self._view(job))
