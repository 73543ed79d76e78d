"""Hostile input, property-based: bodies generated from the socket API's own OpenAPI
document (and arbitrary JSON besides) never get a 5xx and never crash the daemon; the local
Chronicle server's routes get the same treatment with arbitrary JSON."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers_daemon import DaemonProc, start_daemon
from tests.helpers_e2e import socket_call

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


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[DaemonProc]:
    with start_daemon() as d:
        yield d


def from_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """A strategy for JSON documents that a JSON Schema (as pydantic writes them: objects,
    scalars, enums, anyOf, arrays, local $refs) accepts, plus near-misses through the
    fuzzing of each field's type."""
    defs = schema.get("$defs", defs or {})
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    t = schema.get("type")
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, defs) for k, v in props.items() if k in required},
            optional={k: from_schema(v, defs) for k, v in props.items() if k not in required},
        )
    if t == "array":
        return st.lists(from_schema(schema.get("items", {}), defs), max_size=4)
    if t == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=40)
    if t == "integer":
        return st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum"))
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
    assert len(ops) >= 15


def _fill(path: str, segment: str) -> str:
    while "{" in path:
        i, j = path.index("{"), path.index("}")
        path = path[:i] + segment + path[j + 1:]
    return path


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


def _socket_check(sock: Path, method: str, path: str, bodies: Any) -> Any:
    @FUZZ
    @given(body=bodies, segment=SEGMENT)
    def check(body: Any, segment: str) -> None:
        data = None if method == "GET" else json.dumps(body).encode()
        code, answer = socket_call(sock, method, _fill(path, segment), data)
        assert code < 500, (method, path, body, answer[:300])

    return check


def _server_check(url: str, token: str, method: str, path: str) -> Any:
    @FUZZ
    @given(body=JSON, segment=SEGMENT)
    def check(body: Any, segment: str) -> None:
        data = None if method == "GET" else json.dumps(body).encode()
        req = urllib.request.Request(url + _fill(path, segment), data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
            e.close()
        assert code < 500, (method, path, body)

    return check


def test_local_server_routes_never_answer_5xx(fuzz_daemon: DaemonProc) -> None:
    info = json.loads((fuzz_daemon.state_dir / "server" / "endpoint.json").read_text())
    token = next(iter(json.loads(Path(info["tokens_file"]).read_text())["tokens"]))
    routes = [("POST", "/v1/runs"), ("POST", "/v1/runs/{id}/end"), ("POST", "/v1/assets"),
              ("POST", "/v1/assets/inline"), ("POST", "/v1/assets/{id}/upload-urls"),
              ("POST", "/v1/assets/{id}/finalize"), ("POST", "/v1/assets/{id}/abandon"),
              ("POST", "/v1/assets/{id}/deprecate"), ("POST", "/v1/assets/{id}/access"),
              ("PUT", "/v1/assets/{id}/visibility"), ("POST", "/v1/assets/{id}/move"),
              ("POST", "/v1/experiments"), ("POST", "/v1/experiments/{id}/variations"),
              ("GET", "/v1/assets"), ("GET", "/v1/assets/{id}")]

    for method, path in routes:
        _server_check(info["url"], token, method, path)()
    for junk in (b"{", b"\xff\xfe", b"[" * 5000, b'{"x": ' + b"1" * 10000 + b"}"):
        req = urllib.request.Request(info["url"] + "/v1/assets", data=junk, method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            urllib.request.urlopen(req, timeout=30).close()
            code = 200
        except urllib.error.HTTPError as e:
            code = e.code
            e.close()
        assert code == 400, junk[:20]
