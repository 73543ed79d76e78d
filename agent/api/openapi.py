"""The socket API's OpenAPI 3.1 document, built from the request models the handlers
validate with, so the two cannot drift apart. Served at ``GET /openapi.json``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from agent import __version__

JOB = {"type": "object", "required": ["job_id", "kind", "state"], "properties": {
    "job_id": {"type": "string"},
    "kind": {"enum": ["upload", "inline", "component", "finalize", "download"]},
    "state": {"enum": ["queued", "running", "done", "failed", "cancelled", "abandoned"]},
    "asset_id": {"type": ["string", "null"]}, "run_id": {"type": ["string", "null"]},
    "bytes_total": {"type": "integer"}, "bytes_done": {"type": "integer"},
    "attempts": {"type": "integer"},
    "error": {"type": ["object", "null"]}}}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}


def _op(summary: str, body: type[BaseModel] | None, ok: int, answer: dict[str, Any],
        params: tuple[str, ...] | list[str] = (),
        query: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            str(ok): {"description": "ok", "content": {"application/json": {"schema": answer}}},
            "4XX": {"description": "refused", "content": {"application/json": {
                "schema": ERROR}}},
        },
    }
    parameters = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in params]
    parameters += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
                   for q in query]
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": body.model_json_schema()}}}
    return op


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
            "info": {"title": "chronicle-agent socket API", "version": __version__},
            "paths": paths}
