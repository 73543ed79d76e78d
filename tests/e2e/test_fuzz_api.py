"""Hostile input, property-based: bodies generated from the socket API's own OpenAPI
document (and arbitrary JSON besides) never get a 5xx and never crash the daemon. The local
Chronicle server publishes an OpenAPI document of every route it serves; requests generated
from it (path and query parameters, headers, bodies, and near-misses of each) never get a
5xx either, and neither does arbitrary JSON."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_e2e import socket_call
from tests.support.helpers_server import running_server

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=12,
)
SEGMENT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1,
                  max_size=20).map(lambda s: urllib.request.quote(s, safe=""))
FUZZ = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

COMPONENT_NAMES = ("content", "model.bin", "shard/0001.bin")
"""The components of the assets the server fuzzing seeds (``content``: an inline asset's), so
that generated maps of components name real ones as well as unknown ones."""
EDGES = st.sampled_from([-1, 0, 2**63, 10**30, 1.5, "", " ", "\x00", "../x", "/abs", "a//b",
                         "²", "é" * 300, True, None, [], {}])
"""Values that sit just past what a field accepts."""


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[DaemonProc]:
    with start_daemon() as d:
        yield d


def from_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None, *,
                near: bool = False) -> Any:
    """A strategy for JSON documents that a JSON Schema (as pydantic writes them: objects,
    maps, scalars, enums, anyOf, arrays, patterns, local $refs) accepts; with ``near``, each
    number and string may also be a near-miss: one past a bound, or an edge value."""
    defs = schema.get("$defs", defs or {})

    def sub(s: dict[str, Any]) -> Any:
        return from_schema(s, defs, near=near)

    if "$ref" in schema:
        return st.deferred(lambda: sub(defs[schema["$ref"].rsplit("/", 1)[1]]))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    if "anyOf" in schema:
        return st.one_of([sub(s) for s in schema["anyOf"]])
    t = schema.get("type")
    if isinstance(t, list):
        return st.one_of([sub({**schema, "type": one}) for one in t])
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        more = schema.get("additionalProperties")
        if not props and isinstance(more, dict):  # a map: known names and any others
            keys = st.sampled_from(COMPONENT_NAMES) | st.text(max_size=8)
            return st.dictionaries(keys, sub(more), max_size=3)
        return st.fixed_dictionaries(
            {k: sub(v) for k, v in props.items() if k in required},
            optional={k: sub(v) for k, v in props.items() if k not in required},
        )
    if t == "array":
        return st.lists(sub(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=min(4, schema.get("maxItems", 4)))
    return _scalar(schema, near)


def _scalar(schema: dict[str, Any], near: bool) -> Any:
    t = schema.get("type")
    low, high = schema.get("minimum"), schema.get("maximum")
    misses = st.nothing()
    if near and t == "integer":  # one past each bound; unbounded: what no database holds
        misses = st.sampled_from([low - 1 if low is not None else -(2**63) - 1,
                                  high + 1 if high is not None else 2**63, 10**30])
    elif near and t == "string":
        misses = st.sampled_from(["", "\x00", "../x", "é" * 300])
    if t == "string" and "pattern" in schema:
        return misses | st.from_regex(schema["pattern"], fullmatch=True).filter(
            lambda v: schema.get("minLength", 0) <= len(v) <= schema.get("maxLength", len(v)))
    if t == "string":
        return misses | st.text(min_size=schema.get("minLength", 0),
                                max_size=min(40, schema.get("maxLength", 40)))
    if t == "integer":
        return misses | st.integers(min_value=low, max_value=high)
    if t == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    return JSON  # no constraint: anything


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None]]:
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            out.append((method.upper(), path, body.get("schema")))
    return out


def test_the_socket_api_publishes_its_openapi_document(fuzz_daemon: DaemonProc) -> None:
    status, raw = socket_call(fuzz_daemon.socket_path, "GET", "/openapi.json", None)
    assert status == 200
    doc = json.loads(raw)
    assert doc["openapi"].startswith("3.")
    ops = operations(doc)
    assert ("POST", "/v1/uploads", ops[[o[1] for o in ops].index("/v1/uploads")][2]) in ops


def _fill(path: str, segment: str | Mapping[str, str]) -> str:
    """``path`` with each ``{name}`` replaced: by ``segment``, or by ``segment[name]``."""
    return re.sub(r"{(\w+)}",
                  lambda mt: segment if isinstance(segment, str) else segment[mt[1]], path)


def test_no_5xx_for_bodies_from_the_schema_or_anything(fuzz_daemon: DaemonProc) -> None:
    status, raw = socket_call(fuzz_daemon.socket_path, "GET", "/openapi.json", None)
    doc = json.loads(raw)
    for method, path, schema in operations(doc):
        if path in ("/v1/jobs/{job_id}/wait",):
            continue  # a long poll: covered by the other job routes
        bodies = JSON if schema is None else st.one_of(from_schema(schema), JSON)
        _socket_check(fuzz_daemon.socket_path, method, path, bodies)()
    # and raw garbage that is not JSON at all
    for junk in (b"{", b"\xff\xfe", b"[" * 5000, b'{"path": ' + b"1" * 10000 + b"}"):
        code, _ = socket_call(fuzz_daemon.socket_path, "POST", "/v1/uploads", junk)
        assert code == 400
    assert fuzz_daemon.running, fuzz_daemon.log_tail()
    assert "Traceback" not in fuzz_daemon.log_text()


HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                      max_size=40)
CALLER_AUTH = st.none() | HEADER_TEXT | HEADER_TEXT.map(lambda t: "Bearer " + t)
"""A caller's Authorization header (the caller's own Chronicle token): none, garbage, or a
bearer token Chronicle does not know."""


def _socket_check(sock: Path, method: str, path: str, bodies: Any) -> Any:
    @FUZZ
    @given(body=bodies, segment=SEGMENT, auth=CALLER_AUTH)
    def check(body: Any, segment: str, auth: str | None) -> None:
        data = None if method == "GET" else json.dumps(body).encode()
        headers = None if auth is None else {"Authorization": auth}
        code, answer = socket_call(sock, method, _fill(path, segment), data, headers)
        assert code < 500, (method, path, body, auth, answer[:300])

    return check


def _http(url: str, method: str, data: bytes | None = None,
          headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP call: (status, body bytes), whatever they are."""
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def _server_endpoint(daemon: DaemonProc) -> tuple[str, dict[str, str]]:
    """The daemon's embedded server: its URL and the headers of a call with a valid token."""
    info = json.loads((daemon.state_dir / "server" / "endpoint.json").read_text())
    token = next(iter(json.loads(Path(info["tokens_file"]).read_text())["tokens"]))
    return info["url"], {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def _server_check(url: str, auth: dict[str, str], method: str, path: str) -> Any:
    @FUZZ
    @given(body=JSON, segment=SEGMENT)
    def check(body: Any, segment: str) -> None:
        data = None if method == "GET" else json.dumps(body).encode()
        code, _ = _http(url + _fill(path, segment), method, data, auth)
        assert code < 500, (method, path, body)

    return check


def test_local_server_routes_never_answer_5xx(fuzz_daemon: DaemonProc) -> None:
    url, auth = _server_endpoint(fuzz_daemon)
    routes = [("POST", "/v1/runs"), ("POST", "/v1/runs/{id}/end"), ("POST", "/v1/assets"),
              ("POST", "/v1/assets/inline"), ("POST", "/v1/assets/{id}/upload-urls"),
              ("POST", "/v1/assets/{id}/finalize"), ("POST", "/v1/assets/{id}/abandon"),
              ("POST", "/v1/assets/{id}/deprecate"), ("POST", "/v1/assets/{id}/access"),
              ("PUT", "/v1/assets/{id}/visibility"), ("POST", "/v1/assets/{id}/move"),
              ("POST", "/v1/experiments"), ("POST", "/v1/experiments/{id}/variations"),
              ("GET", "/v1/assets"), ("GET", "/v1/assets/{id}")]

    for method, path in routes:
        _server_check(url, auth, method, path)()
    for junk in (b"{", b"\xff\xfe", b"[" * 5000, b'{"x": ' + b"1" * 10000 + b"}"):
        code, _ = _http(url + "/v1/assets", "POST", junk, {"Authorization": auth["Authorization"]})
        assert code == 400, junk[:20]


# ---- the local server's OpenAPI document, and fuzzing generated from it ----------------------

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
UNAUTHENTICATED = {("GET", "/v1/health"), ("GET", "/openapi.json"), ("GET", "/metrics"),
                   ("GET", "/storage/{key}"),
                   ("PUT", "/storage/{key}")}
RAW_SEGMENTS = st.sampled_from(["%ff", "%ED%A0%80", "%00", "%2F", "..", "%20", "a" * 3000])
"""Path segments as sent, not quoted again: invalid UTF-8, a lone surrogate, NUL, a slash."""


def _operations_of(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method.upper(), path): op for path, ops in doc["paths"].items()
            for method, op in ops.items()}


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _check_openapi_31(doc: dict[str, Any]) -> None:
    """What makes a document a usable OpenAPI 3.1 one, short of a full validator."""
    assert re.fullmatch(r"3\.1\.\d+", doc["openapi"])
    assert isinstance(doc["info"]["title"], str) and isinstance(doc["info"]["version"], str)
    schemes = doc["components"]["securitySchemes"]
    assert [{"type": "http", "scheme": "bearer"}] == list(schemes.values())
    assert doc["security"] == [{name: []} for name in schemes]
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for (method, path), op in _operations_of(doc).items():
        where = f"{method} {path}"
        assert path.startswith("/") and method.lower() in HTTP_METHODS, where
        assert op["summary"] and op["responses"], where
        assert all(re.fullmatch(r"[1-5](\d\d|XX)|default", c) for c in op["responses"]), where
        assert any(c.startswith("2") for c in op["responses"]), where
        params = op.get("parameters", [])
        assert all(p["in"] in ("path", "query", "header", "cookie") and "schema" in p
                   for p in params), where
        in_path = [p["name"] for p in params if p["in"] == "path"]
        assert sorted(in_path) == sorted(re.findall(r"{(\w+)}", path)), where
        assert all(p["required"] for p in params if p["in"] == "path"), where
        if (method, path) in UNAUTHENTICATED:
            assert op["security"] == [], where
            continue
        assert "security" not in op, where  # the document's bearer token
        error = op["responses"]["4XX"]["content"]["application/json"]["schema"]
        assert error["required"] == ["error"], where
        assert error["properties"]["error"]["required"] == ["code", "message"], where
        assert "401" in op["responses"], where
        if method != "GET":
            assert "Idempotency-Key" in [p["name"] for p in params if p["in"] == "header"]
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            schema = body["schema"]
            if "$ref" in schema:  # a request body's model
                schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
            assert schema["type"] == "object", where
            assert set(schema.get("required", [])) <= set(schema["properties"]), where
            assert op["requestBody"]["required"] == bool(schema.get("required")), where


async def test_the_local_server_publishes_an_openapi_document_of_every_route(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path) as srv:
        r = await srv.api.as_(None).get("/openapi.json")  # no token needed
        assert r.status == 200, r.body
        assert r.headers["Content-Type"].startswith("application/json")
        _check_openapi_31(r.body)
        # the server's own route table: a route without a document entry fails here
        router = srv.server._runner.app.router
        served = {(route.method, route.resource.canonical) for route in router.routes()
                  if route.resource is not None and route.method != "HEAD"}
        assert set(_operations_of(r.body)) == served


def test_a_route_without_a_document_entry_is_left_out() -> None:
    from aiohttp import web

    from agent.server.openapi import document

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/v1/health", handler)
    app.router.add_post("/v1/something-new", handler)
    assert list(document(app.router, "0")["paths"]) == ["/v1/health"]


def _spoil(doc: Any) -> st.SearchStrategy[Any]:
    """``doc`` with one thing wrong somewhere inside: a field dropped, or a value replaced
    by another type, an edge value or anything."""
    if isinstance(doc, dict) and doc:
        return st.sampled_from(sorted(doc)).flatmap(lambda k: st.one_of(
            st.just({x: v for x, v in doc.items() if x != k}),
            _spoil(doc[k]).map(lambda v: {**doc, k: v})))
    if isinstance(doc, list) and doc:
        return st.integers(0, len(doc) - 1).flatmap(
            lambda i: _spoil(doc[i]).map(lambda v: [*doc[:i], v, *doc[i + 1:]]))
    return EDGES | JSON


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _requests(method: str, path: str, op: dict[str, Any], defs: dict[str, Any],
              known: Mapping[str, list[str]], signed: list[dict[str, str]]) -> Any:
    """Requests for one operation: (path segments, query, headers, body), each drawn from
    the document's schemas, from near-misses of them, or from real ids and signatures."""
    params = op.get("parameters", [])
    segments = {p["name"]: st.sampled_from(known.get(p["name"]) or ["x"]) | SEGMENT | RAW_SEGMENTS
                for p in params if p["in"] == "path"}
    query = {p["name"]: from_schema(p["schema"], defs, near=True).map(_as_text)
             | EDGES.map(_as_text) | st.text(max_size=20) for p in params if p["in"] == "query"}
    # header values past ASCII but still HTTP (control characters never reach a handler)
    latin1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                   blacklist_categories=("Cc",)), max_size=300)
    headers = {p["name"]: from_schema(p["schema"], defs) | latin1
               for p in params if p["in"] == "header"}
    queries = st.fixed_dictionaries({}, optional=query)  # any subset, required ones too
    if path.startswith("/storage/"):
        queries = queries | st.sampled_from(signed)
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get(
        "schema")
    bodies = JSON
    if schema is not None:
        valid = from_schema(schema, defs)
        bodies = st.one_of(valid, from_schema(schema, defs, near=True), valid.flatmap(_spoil),
                           JSON)
    if method == "GET":
        bodies = st.none()
    return st.tuples(st.fixed_dictionaries(segments), queries,
                     st.fixed_dictionaries({}, optional=headers), bodies)


def _openapi_check(url: str, auth: dict[str, str], method: str, path: str,
                   requests: Any) -> Any:
    @FUZZ
    @given(req=requests)
    def check(req: tuple[dict[str, str], dict[str, str], dict[str, str], Any]) -> None:
        segments, query, headers, body = req
        target = url + _fill(path, segments) + ("?" + urlencode(query) if query else "")
        data = None if method == "GET" else json.dumps(body).encode()
        code, answer = _http(target, method, data, {**auth, **headers})
        assert code < 500, (method, target, headers, body, answer[:300])

    return check


def _seed(url: str, auth: dict[str, str]) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """Real things for the fuzzing to reach past its 404s: a run, a pending asset (one
    multipart component), a ready one, an experiment and its variation; their ids by path
    parameter name (storage keys under ``key``), and the queries of real signed URLs."""

    def call(method: str, path: str, body: Any = None) -> Any:
        code, raw = _http(url + path, method, None if body is None else json.dumps(body).encode(),
                          auth)
        assert code < 300, (method, path, code, raw[:300])
        return json.loads(raw)

    run = call("POST", "/v1/runs", {"name": "fuzz"})
    pending = call("POST", "/v1/assets", {"asset_type": "checkpoint", "components": [
        {"name": COMPONENT_NAMES[1], "size": 100 * 2**20}, COMPONENT_NAMES[2]]})
    ready = call("POST", "/v1/assets/inline", {"asset_type": "note", "content": "hello"})
    got = call("GET", f"/v1/assets/{ready['asset_id']}?include_presigned=true")
    exp = call("POST", "/v1/experiments", {"name": "fuzz"})
    var = call("POST", f"/v1/experiments/{exp['experiment_id']}/variations",
               {"name": "v", "inputs": [ready["asset_id"]]})
    urls = [urlsplit(u) for u in [*pending["upload_urls"].values(), *got["download_urls"].values(),
                                  pending["multipart"][COMPONENT_NAMES[1]]["parts"][0]["url"]]]
    known = {"run_id": [run["run_id"]], "asset_id": [pending["asset_id"], ready["asset_id"]],
             "experiment_id": [exp["experiment_id"]], "variation_id": [var["variation_id"]],
             "key": [u.path.removeprefix("/storage/") for u in urls]}
    quoted = {name: [quote(v, safe="") if name != "key" else v for v in values]
              for name, values in known.items()}
    return quoted, [dict(parse_qsl(u.query)) for u in urls]


def test_local_server_fuzzed_from_its_openapi_document(fuzz_daemon: DaemonProc) -> None:
    url, auth = _server_endpoint(fuzz_daemon)
    code, raw = _http(url + "/openapi.json", "GET")
    assert code == 200, raw[:300]
    doc = json.loads(raw)
    _check_openapi_31(doc)
    known, signed = _seed(url, auth)
    defs = doc["components"]["schemas"]
    # what destroys the seeded things goes last
    ops = sorted(_operations_of(doc).items(), key=lambda item: (
        item[0][0] == "DELETE", item[0][1].endswith(("/abandon", "/end", "/retract"))))
    for (method, path), op in ops:
        _openapi_check(url, auth, method, path,
                       _requests(method, path, op, defs, known, signed))()
    # the server still answers, and logged no error (the daemon's socket API has its own test)
    assert _http(url + "/v1/health", "GET")[0] == 200
    assert _http(url + "/v1/me/scopes", "GET", None, auth)[0] == 200
    assert fuzz_daemon.running, fuzz_daemon.log_tail()
    errors = re.findall(r".* ERROR (?:agent\.server|aiohttp\.server)\b.*", fuzz_daemon.log_text())
    assert not errors, errors[:5]
