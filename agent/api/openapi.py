"""The socket API's OpenAPI 3.1 document, built from the request models the handlers
validate with, so the two cannot drift apart. Served at ``GET /openapi.json``. Its
operations are built as the local server's are (:func:`agent.server.openapi.operation`)."""

from __future__ import annotations

from typing import Any

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


def _op(summary: str, body: type[BaseModel] | None, ok: int, answer: dict[str, Any],
        params: tuple[str, ...] | list[str] = (),
        query: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    return operation(summary, ok, answer, path=params, query=query,
                     body=None if body is None else body.model_json_schema())


def document() -> dict[str, Any]:
    from agent.api import app as a

    obj = {"type": "object"}
    paths: dict[str, dict[str, Any]] = {
        "/v1/health": {"get": _op("the daemon's health", None, 200, obj)},
        "/v1/runs": {"post": _op("register a run (idempotent on run_id)", a.RunReq, 201, obj),
                     "get": _op("runs of the caller", None, 200, obj)},
        "/v1/runs/{run_id}": {"get": _op("a run", None, 200, obj, ["run_id"])},
        "/v1/runs/{run_id}/heartbeat": {"post": _op("keep a leased run alive", None, 200, obj,
                                                    ["run_id"])},
        "/v1/runs/{run_id}/finish": {"post": _op("end a run", a.FinishReq, 200, obj,
                                                 ["run_id"])},
        "/v1/uploads": {"post": _op("upload a file or directory as one asset", a.UploadReq,
                                    202, JOB)},
        "/v1/assets/inline": {"post": _op("an inline asset", a.InlineReq, 202, JOB)},
        "/v1/assets/presigned": {"post": _op("register an asset, get its upload URLs",
                                             a.PresignedReq, 201, obj)},
        "/v1/assets/{asset_id}/components": {"post": _op(
            "upload one component of a registered asset", a.ComponentReq, 202, JOB,
            ["asset_id"])},
        "/v1/assets/{asset_id}/finalize": {"post": _op(
            "finalize once every component is uploaded", None, 202, JOB, ["asset_id"])},
        "/v1/downloads": {"post": _op("download an asset to a directory", a.DownloadReq, 202,
                                      JOB)},
        "/v1/jobs": {"get": _op("the caller's jobs", None, 200, obj, query=["run_id", "state"])},
        "/v1/jobs/{job_id}": {"get": _op("a job", None, 200, JOB, ["job_id"])},
        "/v1/jobs/{job_id}/wait": {"get": _op("wait until a job is terminal", None, 200, JOB,
                                              ["job_id"], ["timeout_s"])},
        "/v1/jobs/{job_id}/cancel": {"post": _op("cancel a job", None, 200, JOB, ["job_id"])},
        "/v1/jobs/{job_id}/retry": {"post": _op("retry a failed or cancelled job", None, 200,
                                                JOB, ["job_id"])},
    }
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
