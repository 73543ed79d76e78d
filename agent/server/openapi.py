"""The local Chronicle's OpenAPI 3.1 document, served without auth at ``GET /openapi.json``.

Built so that it cannot drift from the server: its paths, methods and path parameters come
from the application's own route table; its bounds and enums from the constants the handlers
validate with; its answers from the wire contract's models (:mod:`agent.chronicle.models`).
A served route with no entry in :data:`OPERATIONS` is left out of the document, which the
fuzz tests (``tests/e2e/test_fuzz_api.py``) refuse.

:data:`ERROR` and :func:`operation` are shared with the socket API's document
(:mod:`agent.api.openapi`): both speak the contract's error shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from agent.chronicle import models as m

from .app import MAX_IDEMPOTENCY_KEY
from .assets import MAX_QUERY
from .bodies import ACTIONS, STATES, Body
from .disk import STORAGE_PREFIX

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
"""The contract's error body: ``{"error": {"code": "<snake_case>", "message": "…"}}``."""


def _reply(description: str, schema: Mapping[str, Any] | None,
           media: str = "application/json") -> dict[str, Any]:
    reply: dict[str, Any] = {"description": description}
    if schema is not None:
        reply["content"] = {media: {"schema": schema}}
    return reply


def operation(summary: str, ok: int, answer: Mapping[str, Any] | None, *,
              body: Mapping[str, Any] | None = None, body_required: bool = True,
              path: Iterable[str] = (),
              query: Iterable[str | dict[str, Any]] = ()) -> dict[str, Any]:
    """One operation: its ``ok`` answer (no content when ``answer`` is None), a 4XX in the
    error shape, path parameters (strings), query parameters (a name is an optional string;
    a dict is a whole parameter object) and a JSON request body."""
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {str(ok): _reply("ok", answer), "4XX": _reply("refused", ERROR)},
    }
    parameters = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in path]
    parameters += [q if isinstance(q, dict) else
                   {"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
                   for q in query]
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": body_required,
                             "content": {"application/json": {"schema": body}}}
    return op


# ---- schema pieces --------------------------------------------------------------------------


def _enum(values: Iterable[str]) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _obj(required: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": dict(required), "required": list(required)}


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "repeating a call with the same key and body returns the first answer",
    "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY, "pattern": "^[ -~]*$"},
}


# ---- the operations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    summary: str
    ok: int
    answer: type[BaseModel] | dict[str, Any] | None
    """A contract model, an inline schema, or None for an answer without a body."""
    query: tuple[dict[str, Any], ...] = ()


HEALTH = _obj({"status": {"const": "ok"}, "url": {"type": "string"},
               "version": {"type": "string"}, "storage": {"type": "string"},
               "features": {"type": "array",
                            "items": {"enum": ["checksum_urls", "search", "asset_keys"]},
                            "description": "API 1.1 features this server offers"}})
SEARCH_PAGE = _obj({"assets": {"type": "array", "items": {"type": "object"}},
                    "next_cursor": {"anyOf": [{"type": "string"}, {"type": "null"}]}})

OPERATIONS: dict[tuple[str, str], Op] = {
    ("GET", "/v1/health"): Op("the server's health (no auth)", 200, HEALTH),
    ("GET", "/openapi.json"): Op("this document (no auth)", 200, {"type": "object"}),
    # runs
    ("POST", "/v1/runs"): Op("create a run; an existing run_id answers 200 with that run",
                             201, m.Run),
    ("GET", "/v1/runs/{run_id}"): Op("a run", 200, m.Run),
    ("POST", "/v1/runs/{run_id}/end"): Op(
        "end a run; its pending assets are abandoned (listed in abandoned)", 200, m.Run),
    # experiments and variations
    ("POST", "/v1/experiments"): Op("create an experiment", 201, m.Experiment),
    ("GET", "/v1/experiments/{experiment_id}"): Op("an experiment", 200, m.Experiment),
    ("POST", "/v1/experiments/{experiment_id}/variations"): Op(
        "add a variation with input assets", 201, m.Variation),
    ("POST", "/v1/experiments/{experiment_id}/retract"): Op(
        "retract an experiment, invalidating its outputs", 200, m.Experiment),
    ("GET", "/v1/variations/{variation_id}"): Op("a variation", 200, m.Variation),
    ("POST", "/v1/variations/{variation_id}/outputs"): Op("link an output asset", 200,
                                                          m.Variation),
    # assets
    ("POST", "/v1/assets"): Op(
        "register an asset: its upload URLs (presigned flow); with a key (API 1.1 "
        "asset_keys, needs output_of) a later call for the same run, type and key joins the "
        "pending asset (200, URLs of its components only)", 201, m.UploadUrls),
    ("GET", "/v1/assets"): Op(
        "the assets the caller may read", 200, m.AssetList,
        query=(_query("output_of", {"type": "string"}), _query("state", _enum(STATES)),
               _query("asset_type", {"type": "string"}))),
    ("POST", "/v1/assets/inline"): Op(
        "an inline asset, stored as one component named content and finalized", 201,
        m.Asset),
    ("GET", "/v1/assets/search"): Op(
        "full-text search (API 1.1): the assets the caller may read matching q, best first; "
        "each with its snippet and the first line of its text", 200, SEARCH_PAGE,
        query=(_query("q", {"type": "string", "minLength": 1, "maxLength": MAX_QUERY}, True),
               _query("asset_type", {"type": "string"}), _query("state", _enum(STATES)),
               _query("output_of", {"type": "string"}),
               _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}),
               _query("cursor", {"type": "string"}))),
    ("GET", "/v1/assets/{asset_id}"): Op(
        "an asset, with download URLs if asked", 200, m.Asset,
        query=(_query("include_presigned", {"type": "boolean"}),)),
    ("DELETE", "/v1/assets/{asset_id}"): Op("delete an asset and its bytes", 204, None),
    ("POST", "/v1/assets/{asset_id}/upload-urls"): Op(
        "fresh upload URLs; a declared size plans or re-plans a component", 200,
        m.UploadUrls),
    ("POST", "/v1/assets/{asset_id}/components"): Op(
        "add components to a pending asset (API 1.1 asset_keys): URLs of these components; "
        "one declared before with another size or digest is a 409 conflict", 200,
        m.UploadUrls),
    ("GET", "/v1/assets/{asset_id}/uploads"): Op("what storage holds of an asset", 200,
                                                 m.Uploads),
    ("POST", "/v1/assets/{asset_id}/finalize"): Op(
        "check the components against storage and make the asset ready", 200, m.Asset),
    ("POST", "/v1/assets/{asset_id}/abandon"): Op("abandon a pending asset", 200, m.Asset),
    ("POST", "/v1/assets/{asset_id}/deprecate"): Op("flag an asset deprecated", 200, m.Asset),
    ("POST", "/v1/assets/{asset_id}/invalidate"): Op("flag an asset invalidated", 200,
                                                     m.Asset),
    # access
    ("POST", "/v1/assets/{asset_id}/access"): Op("grant an action", 200, m.Grants),
    ("DELETE", "/v1/assets/{asset_id}/access"): Op(
        "revoke an action", 200, m.Grants,
        query=(_query("principal_id", {"type": "string", "minLength": 1}, True),
               _query("action", _enum(ACTIONS), True))),
    ("GET", "/v1/assets/{asset_id}/access"): Op("the explicit grants", 200, m.Grants),
    ("POST", "/v1/assets/{asset_id}/share"): Op("a read grant for a scope", 200, m.Grants),
    ("PUT", "/v1/assets/{asset_id}/visibility"): Op("set an asset's visibility", 200, m.Asset),
    ("POST", "/v1/assets/{asset_id}/move"): Op("move an asset into an organization", 200,
                                               m.Asset),
    ("GET", "/v1/me/scopes"): Op("the caller's teams and organizations", 200, m.Scopes),
}
"""Every JSON route of the local server, by method and path template."""
NO_AUTH = {("GET", "/v1/health"), ("GET", "/openapi.json")}
"""The JSON routes served without a bearer token."""

# The disk store's presigned URLs (absent with an S3 store, which serves its own).
STORAGE_KEY = STORAGE_PREFIX + "{key}"
_SIGNED = (_query("Expires", {"type": "string", "pattern": "^[0-9]+$"}, True),
           _query("Signature", {"type": "string"}, True),
           _query("uploadId", {"type": "string"}),
           _query("partNumber", {"type": "string", "pattern": "^[0-9]{1,5}$"}))
_S3_ERROR = _reply("refused, S3-style: <Error><Code>…</Code><Message>…</Message></Error>",
                   {"type": "string"}, "application/xml")


def _storage_op(method: str) -> dict[str, Any]:
    put = method == "PUT"
    op: dict[str, Any] = {
        "summary": "upload an object or one part" if put else "download an object (Range ok)",
        "security": [],
        "parameters": [{"name": "key", "in": "path", "required": True,
                        "description": "the object key; it may contain '/'",
                        "schema": {"type": "string"}}, *_SIGNED],
        "responses": {"200": _reply("ok (the ETag header names the bytes)", None if put else
                                    {"type": "string"}, "application/octet-stream"),
                      "4XX": _S3_ERROR},
    }
    if not put:
        op["responses"]["206"] = _reply("the bytes a Range header asked for",
                                        {"type": "string"}, "application/octet-stream")
    if put:
        op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string"}}}}
    return op


METRICS_OP = {
    "summary": "housekeeping totals in Prometheus text format: storage sweeps and what they "
               "removed, failed releases, expired assets (no auth; no asset counts)",
    "security": [],
    "responses": {"200": _reply("Prometheus text exposition", {"type": "string"},
                                "text/plain")},
}


def _schemas(bodies: Iterable[type[Body]]) -> tuple[dict[type[BaseModel], Any], dict[str, Any]]:
    """Each model's ``$ref`` (the answers' and the request bodies'), and the schemas they
    point at."""
    models: set[type[BaseModel]] = {o.answer for o in OPERATIONS.values()
                                     if isinstance(o.answer, type)}
    models.update(bodies)
    refs, defs = models_json_schema(
        [(c, "validation") for c in sorted(models, key=lambda c: c.__name__)],
        ref_template="#/components/schemas/{model}")
    by_model = {c: dict(r) for (c, _), r in refs.items() if issubclass(c, BaseModel)}
    return by_model, defs.get("$defs", {})


def _render(method: str, path: str, op: Op, body: type[Body] | None,
            refs: Mapping[type[BaseModel], Any]) -> dict[str, Any]:
    answer = refs[op.answer] if isinstance(op.answer, type) else op.answer
    required = body is not None and any(f.is_required() for f in body.model_fields.values())
    out = operation(op.summary, op.ok, answer, body=refs[body] if body else None,
                    body_required=required, path=re.findall(r"{(\w+)}", path), query=op.query)
    if method != "GET":  # what the endpoint wrapper calls mutating
        out.setdefault("parameters", []).append(IDEMPOTENCY_KEY)
        out["responses"]["503"] = _reply(
            "server_busy: too many request bodies in flight (server.json_body_budget_bytes), "
            "or storage_unavailable; retry after the Retry-After header's seconds", ERROR)
    if (method, path) in NO_AUTH:
        out["security"] = []
    else:
        out["responses"]["401"] = _reply("missing or unknown bearer token", ERROR)
    return out


def document(router: web.UrlDispatcher, version: str,
             bodies: Mapping[tuple[str, str], type[Body]] | None = None) -> dict[str, Any]:
    """The document of the routes ``router`` serves; ``bodies``: each route's request-body
    model (:data:`agent.server.app.BODIES`)."""
    bodies = bodies or {}
    refs, schemas = _schemas(bodies.values())
    paths: dict[str, dict[str, Any]] = {}
    for route in router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":  # HEAD: aiohttp's twin of a GET
            continue
        method, path = route.method, resource.canonical
        if path == STORAGE_KEY and method in ("PUT", "GET"):
            paths.setdefault(path, {})[method.lower()] = _storage_op(method)
        elif (method, path) == ("GET", "/metrics"):
            paths[path] = {"get": METRICS_OP}
        elif (method, path) in OPERATIONS:
            paths.setdefault(path, {})[method.lower()] = _render(
                method, path, OPERATIONS[method, path], bodies.get((method, path)), refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "chronicle-agent local Chronicle", "version": version,
                 "description": "The Chronicle asset API, version 1, as the local server "
                                "serves it. Errors: {\"error\": {\"code\", \"message\"}}."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
    }
