"""The socket API's OpenAPI 3.1 document, generated over the routes the router serves, each
from its entry here, whose request body is the model the handler validates with: the two
cannot drift apart, and a route without an entry fails a test. Served at ``GET
/openapi.json``. Its operations are built as the local server's are
(:func:`agent.server.openapi.operation`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from agent import __version__
from agent.server.openapi import operation

JOB = {"type": "object", "required": ["job_id", "kind", "state"], "properties": {
    "job_id": {"type": "string"},
    "kind": {"enum": ["upload", "inline", "component", "finalize", "download"]},
    "state": {"enum": ["queued", "running", "done", "failed", "cancelled", "abandoned",
                        "lost"]},
    "asset_id": {"type": ["string", "null"]}, "run_id": {"type": ["string", "null"]},
    "bytes_total": {"type": "integer"}, "bytes_done": {"type": "integer"},
    "attempts": {"type": "integer"},
    "error": {"type": ["object", "null"]}}}

CHECKPOINT = {"type": "object", "required": ["path", "fate"], "properties": {
    "ckpt_id": {"type": "string"}, "path": {"type": "string"},
    "seal": {"type": ["string", "null"], "description": "the seal kind that held"},
    "fate": {"enum": ["sealed", "ready", "lost", "abandoned"], "description": "sealed: "
             "sealed, not (yet) ready here (see detail)"},
    "detail": {"enum": ["ready", "uploading", "failed", "lost", "abandoned", "superseded",
                        "elsewhere"]},
    "job_id": {"type": ["string", "null"]}, "job_state": {"type": ["string", "null"]},
    "reason": {"type": ["object", "null"], "description": "why it is not (yet) ready: "
               "{code, message}"},
    "asset_id": {"type": ["string", "null"]}, "asset_type": {"type": ["string", "null"]},
    "bytes_total": {"type": ["integer", "null"]}, "created_at": {"type": "string"}}}
_COUNT = {"type": "integer", "minimum": 0}
RUN = {"type": "object", "required": ["run_id", "state", "checkpoints", "checkpoint_counts"],
       "properties": {
    "run_id": {"type": "string"}, "pid": {"type": ["integer", "null"]},
    "state": {"enum": ["running", "dying", "ending", "ended"]},
    "status": {"enum": ["finished", "failed", "crashed", None]},
    "exit_code": {"type": ["integer", "null"]}, "liveness": {"enum": ["pid", "lease"]},
    "watch": {"type": "array"}, "started_at": {"type": "string"},
    "ended_at": {"type": ["string", "null"]},
    "settled": {"type": "boolean", "description": "its end-of-run processing is done (the "
                "final scan; what was not sealed recorded as abandoned)"},
    "checkpoints": {"type": "array", "items": CHECKPOINT},
    "checkpoint_counts": {
        "type": "object", "description": "how many of the run's checkpoints met each fate: "
        "sealed (all this agent sealed, whatever became of them), ready (uploaded), "
        "uploading (queued or running), failed, lost (completed by the writer, never "
        "captured), abandoned (not sealed when the run ended, cancelled, invalid), "
        "elsewhere (claimed by another agent), unsealed (the watcher still waits to seal "
        "them); superseded versions are not counted",
        "properties": {k: _COUNT for k in ("sealed", "ready", "uploading", "failed", "lost",
                                           "abandoned", "elsewhere", "unsealed")}}}}


def _op(summary: str, body: type[BaseModel] | None, ok: int, answer: dict[str, Any] | None,
        params: tuple[str, ...] | list[str] = (),
        query: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    return operation(summary, ok, answer, path=params, query=query,
                     body=None if body is None else body.model_json_schema())


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    """Every route's document entry, by (method, path template): the request bodies are the
    models the handlers validate with."""
    from agent.api import app as a

    obj = {"type": "object"}
    return {
        ("GET", "/v1/health"): _op("the daemon's health", None, 200, obj),
        ("GET", "/metrics"): {
            "summary": "Prometheus text: transfers, jobs, checkpoints, the yield state",
            "responses": {"200": {"description": "Prometheus text exposition", "content": {
                "text/plain": {"schema": {"type": "string"}}}}}},
        ("GET", "/openapi.json"): _op("this document", None, 200, obj),
        ("POST", "/v1/runs"): _op("register a run (idempotent on run_id)", a.RunReq, 201, obj),
        ("GET", "/v1/runs"): _op("runs of the caller, each with its checkpoint counts", None,
                                 200, {"type": "object", "properties": {
                                     "runs": {"type": "array", "items": RUN}}}),
        ("GET", "/v1/runs/{run_id}"): _op("a run, with its checkpoints' fates and counts",
                                          None, 200, RUN, ["run_id"]),
        ("GET", "/v1/runs/{run_id}/checkpoints"): _op(
            "each checkpoint of a run (each sealed version), oldest first, with its fate "
            "and reason", None, 200, {"type": "object", "properties": {
                "run_id": {"type": "string"},
                "checkpoints": {"type": "array", "items": CHECKPOINT}}}, ["run_id"]),
        ("POST", "/v1/runs/{run_id}/heartbeat"): _op("keep a leased run alive", None, 200, obj,
                                                     ["run_id"]),
        ("POST", "/v1/runs/{run_id}/finish"): _op("end a run", a.FinishReq, 200, obj,
                                                  ["run_id"]),
        ("POST", "/v1/uploads"): _op("upload a file or directory as one asset", a.UploadReq,
                                     202, JOB),
        ("POST", "/v1/assets/inline"): _op("an inline asset", a.InlineReq, 202, JOB),
        ("POST", "/v1/assets/presigned"): _op("register an asset, get its upload URLs",
                                              a.PresignedReq, 201, obj),
        ("POST", "/v1/assets/{asset_id}/components"): _op(
            "upload one component of a registered asset", a.ComponentReq, 202, JOB,
            ["asset_id"]),
        ("POST", "/v1/assets/{asset_id}/finalize"): _op(
            "finalize once every component is uploaded", None, 202, JOB, ["asset_id"]),
        ("POST", "/v1/downloads"): _op(
            "download an asset (asset_id, or run_id and asset_type with latest: true) into "
            "a new or empty directory, its missing parents created; include/exclude globs "
            "select components", a.DownloadReq, 202, JOB),
        ("GET", "/v1/assets/latest"): _op(
            "the newest ready asset of a run and type, as a latest download would choose it "
            "(404 no_ready_asset: none)", None, 200, {"type": "object", "properties": {
                "asset": obj, "selected": obj}}, query=["run_id", "asset_type",
                                                          "allow_invalid"]),
        ("GET", "/v1/jobs"): _op("the caller's jobs", None, 200, obj, query=["run_id", "state"]),
        ("GET", "/v1/jobs/{job_id}"): _op("a job", None, 200, JOB, ["job_id"]),
        ("GET", "/v1/jobs/{job_id}/wait"): _op("wait until a job is terminal", None, 200, JOB,
                                               ["job_id"], ["timeout_s"]),
        ("POST", "/v1/jobs/{job_id}/cancel"): _op("cancel a job", None, 200, JOB, ["job_id"]),
        ("POST", "/v1/jobs/{job_id}/retry"): _op("retry a failed or cancelled job", None, 200,
                                                 JOB, ["job_id"]),
    }


def document(router: web.UrlDispatcher) -> dict[str, Any]:
    """The document of the routes ``router`` serves (a route without an entry in
    :func:`operations` is left out: ``tests/e2e/test_fuzz_api.py`` fails on one)."""
    entries = operations()
    paths: dict[str, dict[str, Any]] = {}
    for route in router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":  # HEAD: aiohttp's twin of a GET
            continue
        entry = entries.get((route.method, resource.canonical))
        if entry is not None:
            paths.setdefault(resource.canonical, {})[route.method.lower()] = entry
    return {"openapi": "3.1.0",
            "info": {"title": "chronicle-agent socket API", "version": __version__,
                     "description": "The caller is identified by SO_PEERCRED. A caller may "
                     "send its own Chronicle token (bearer): what the daemon then does for "
                     "it on Chronicle, it does with that token (docs/security.md)."},
            "components": {"securitySchemes": {"callerToken": {
                "type": "http", "scheme": "bearer",
                "description": "the caller's own Chronicle token (optional)"}}},
            "security": [{}, {"callerToken": []}],
            "paths": paths}
