"""The local server's request bodies: one pydantic model per route, the same model for the
check and for the OpenAPI document, and refusals that name the field and the problem."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from agent.errors import ChronicleError
from agent.server import assets, runs, sharing
from agent.server import bodies as b
from agent.server.openapi import OPERATIONS, document


def refused(model: type[b.Body], raw: dict[str, Any]) -> str:
    with pytest.raises(ChronicleError) as e:
        b.parse(model, raw)
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    return e.value.message


@pytest.mark.parametrize(("raw", "says"), [
    ({"components": ["a"]}, "asset_type is required"),
    ({"asset_type": 7, "components": ["a"]}, "asset_type must be a string, not a number"),
    ({"asset_type": "a\nb", "components": ["a"]},
     "asset_type contains the control character U+000A"),
    ({"asset_type": "x" * 129, "components": ["a"]}, "asset_type must be at most 128 characters"),
    ({"asset_type": "x", "components": "a"}, "components must be an array, not a string"),
    ({"asset_type": "x", "components": []}, "components must have at least 1 item"),
    ({"asset_type": "x", "components": [5]}, "components[0] must be a JSON object, not a number"),
    ({"asset_type": "x", "components": [{"name": "a", "size": -1}]},
     "components[0].size must be at least 0"),
    ({"asset_type": "x", "components": [{"name": "a", "size": "1"}]},
     "components[0].size must be an integer, not a string"),
    ({"asset_type": "x", "components": [{"name": "a", "size": True}]},
     "components[0].size must be an integer, not a boolean"),
    ({"asset_type": "x", "components": [{"name": "a", "sha256": "ab"}]},
     "components[0].sha256 must be 64 hex digits"),
    ({"asset_type": "x", "components": ["a", "b", "a"]},
     "components[2]: component 'a' is listed twice"),
    ({"asset_type": "x", "components": ["ok", "a/../b"]},
     "components[1]: component name 'a/../b' contains '..'"),
    ({"asset_type": "x", "components": ["a", "a/b"]}, "both a file and a directory"),
    ({"asset_type": "x", "components": ["a"], "visibility": "secret"},
     "visibility must be 'private', 'organization', 'team' or 'public', not 'secret'"),
    ({"asset_type": "x", "components": ["a"], "key": "k"}, "key needs output_of"),
    ({"asset_type": "x", "components": ["a"], "key": "a\nb", "output_of": "r"},
     "key must be 1 to 256 printable characters"),
])
def test_a_bad_registration_is_refused_naming_the_field(raw: dict[str, Any], says: str) -> None:
    assert says in refused(b.Register, raw)


def test_null_is_absent_unknown_fields_are_ignored_and_digests_are_lower_case() -> None:
    got = b.parse(b.Register, {"asset_type": "t", "components": [
        "a", {"name": "b", "size": 3, "sha256": "AB" * 32, "content_type": None}],
        "visibility": None, "from_a_newer_client": {"x": 1}})
    assert [c.name for c in got.components] == ["a", "b"]
    assert got.components[1].sha256 == "ab" * 32 and got.visibility is None
    assert b.parse(b.RefreshUrls, {"components": []}).components is None  # empty: all of them
    assert b.parse(b.RunCreate, {"run_id": ""}).run_id == ""  # the server picks one
    assert "'a b' is not usable" in refused(b.RunCreate, {"run_id": "a b"})


def test_finalize_parts_are_claims_in_ascending_order() -> None:
    ok = b.parse(b.Finalize, {"components": {"m.bin": {"parts": [
        {"part_number": 1, "etag": "x"}, {"part_number": 2, "etag": "y"}]}, "n": None}})
    assert ok.specs()["n"] == b.FinalizeSpec() and len(ok.specs()["m.bin"].parts or []) == 2
    says = refused(b.Finalize, {"components": {"m.bin": {"parts": [
        {"part_number": 2, "etag": "x"}, {"part_number": 1, "etag": "y"}]}}})
    assert says.startswith("components['m.bin'].parts must be in ascending part_number order")
    assert "part_number must be at most 10000" in refused(
        b.Finalize, {"components": {"m": {"parts": [{"part_number": 10001, "etag": "x"}]}}})


def test_inline_content_is_any_json_value_but_null() -> None:
    for content in ("text", 0, False, [], {"a": [1, None]}):
        assert b.parse(b.Inline, {"asset_type": "t", "content": content}).content == content
    assert "content is required" in refused(b.Inline, {"asset_type": "t", "content": None})
    assert "content is required" in refused(b.Inline, {"asset_type": "t"})


def _routes() -> list[tuple[str, str, Any, type[b.Body] | None]]:
    core: Any = type("FakeCore", (), {"config": None})()  # the route tables only keep it
    return [r for module in (runs, assets, sharing) for r in module.routes(core)]


def test_every_route_with_a_body_has_a_model_and_the_document_shows_it() -> None:
    routes = _routes()
    app = web.Application()
    bodies: dict[tuple[str, str], type[b.Body]] = {}
    for method, path, _handler, model in routes:
        assert (method, path) in OPERATIONS, f"{method} {path} has no document entry"
        assert model is None or method != "GET", f"{method} {path}: a GET reads no body"
        app.router.add_route(method, path, _handler)
        if model is not None:
            bodies[method, path] = model
    doc = document(app.router, "0", bodies)
    schemas = doc["components"]["schemas"]
    for (method, path), model in bodies.items():
        op = doc["paths"][path][method.lower()]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[1]
        assert name == model.__name__ and set(schemas[name]["properties"]) == set(
            model.model_fields)
        assert op["requestBody"]["required"] == bool(schemas[name].get("required"))
    # a POST that takes no body would be one whose fields nobody checks
    assert all(model is not None for method, _p, _h, model in routes
               if method in ("POST", "PUT")), "a POST or PUT route without a body model"
