"""The Chronicle asset API as data: one function per call, each returning a :class:`Call`.

This is the only place in the agent that knows Chronicle's routes and bodies. A transport
(``agent.chronicle.sync`` on the standard library, ``agent.chronicle.aio`` on aiohttp)
sends a Call and hands the decoded JSON to ``call.parse``. A Chronicle that differs in
detail needs a change here, not in the daemon.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlencode

from agent.chronicle import models as m
from agent.errors import RETRYABLE_STATUSES, RetryableError, chronicle_error

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    json: Any = None
    query: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    ok: tuple[int, ...] = (200, 201)
    repeatable: bool = False
    """A mutating call that is harmless to repeat without an Idempotency-Key (the same
    declaration twice changes nothing): retried like a read."""

    @property
    def mutating(self) -> bool:
        return self.method != "GET"

    def target(self) -> str:
        """Path and query (no host)."""
        q = {k: v for k, v in self.query.items() if v is not None}
        return self.path + ("?" + urlencode(q) if q else "")

    def request(self, token: str | None) -> tuple[dict[str, str], bytes | None]:
        """The headers and body every carrier sends for this call."""
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if self.idempotency_key:
            headers["Idempotency-Key"] = header_safe_key(self.idempotency_key)
        data = None
        if self.json is not None:
            data = json.dumps(self.json).encode()
            headers["Content-Type"] = "application/json"
        return headers, data

    def answer(self, status: int, raw: bytes) -> T:
        """Decode Chronicle's answer: the parsed result, or the error it stands for."""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        if status in self.ok:
            return self.parse(body)
        if status in RETRYABLE_STATUSES:
            raise RetryableError(
                f"Chronicle {self.method} {self.path}: HTTP {status}", status=status
            )
        raise chronicle_error(status, body)


def header_safe_key(key: str) -> str:
    """An idempotency key as a header value: printable ASCII as is, anything else (a path
    with non-ASCII characters, a control character) as its SHA-256, the same every time."""
    if key.isascii() and key.isprintable() and len(key) <= 200:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _p(segment: str) -> str:
    return quote(segment, safe="")


def _raw(body: Any) -> Any:
    return body


def _none(body: Any) -> None:
    return None


def _components(components: Iterable[str | m.ComponentDecl | Mapping[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for c in components:
        if isinstance(c, m.ComponentDecl):
            out.append(c.wire())
        elif isinstance(c, str):
            out.append(c)
        else:
            out.append(m.ComponentDecl.model_validate(dict(c)).wire())
    return out


# ---- service -------------------------------------------------------------------------------


def health() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/health", _raw)


def features_of(health: Any) -> frozenset[str]:
    """The API 1.1 features a ``/v1/health`` answer advertises (none if it lists none)."""
    raw = health.get("features") if isinstance(health, dict) else None
    return frozenset(f for f in raw if isinstance(f, str)) if isinstance(raw, list) \
        else frozenset()


CHECKSUM_HEADER = "x-amz-checksum-sha256"
"""API 1.1 ``checksum_urls``: the header a checksum-bound upload URL is sent with."""


def checksum_header(sha256: str) -> dict[str, str]:
    """That header for a hex SHA-256: the digest in base64."""
    return {CHECKSUM_HEADER: base64.b64encode(bytes.fromhex(sha256)).decode()}


def checksum_of(value: str) -> str | None:
    """The hex digest an ``x-amz-checksum-sha256`` header carries, or None if it is not
    the base64 of 32 bytes."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return None
    return raw.hex() if len(raw) == 32 else None


# ---- runs ----------------------------------------------------------------------------------


def create_run(run_id: str | None = None, name: str | None = None) -> Call[m.Run]:
    body: dict[str, Any] = {}
    if run_id:
        body["run_id"] = run_id
    if name:
        body["name"] = name
    key = f"run-create:{run_id}" if run_id else None
    return Call("POST", "/v1/runs", m.Run.model_validate, body, idempotency_key=key)


def get_run(run_id: str) -> Call[m.Run]:
    return Call("GET", f"/v1/runs/{_p(run_id)}", m.Run.model_validate)


def end_run(run_id: str, status: str, idempotency_key: str | None = None) -> Call[m.Run]:
    return Call(
        "POST",
        f"/v1/runs/{_p(run_id)}/end",
        m.Run.model_validate,
        {"status": status},
        idempotency_key=idempotency_key,
    )


# ---- assets: upload ------------------------------------------------------------------------


def create_inline(
    asset_type: str,
    content: Any,
    *,
    content_type: str | None = None,
    output_of: str | None = None,
    visibility: str | None = None,
    idempotency_key: str | None = None,
) -> Call[m.Asset]:
    body: dict[str, Any] = {"asset_type": asset_type, "content": content}
    if content_type:
        body["content_type"] = content_type
    if output_of:
        body["output_of"] = output_of
    if visibility:
        body["visibility"] = visibility
    return Call(
        "POST", "/v1/assets/inline", m.Asset.model_validate, body, idempotency_key=idempotency_key
    )


def register(
    asset_type: str,
    components: Iterable[str | m.ComponentDecl | Mapping[str, Any]],
    *,
    output_of: str | None = None,
    visibility: str | None = None,
    idempotency_key: str | None = None,
    key: str | None = None,
) -> Call[m.UploadUrls]:
    """``key`` (API 1.1 ``asset_keys``, with ``output_of``): join the pending asset that
    has it, or create it."""
    body: dict[str, Any] = {"asset_type": asset_type, "components": _components(components)}
    if output_of:
        body["output_of"] = output_of
    if visibility:
        body["visibility"] = visibility
    if key is not None:
        body["key"] = key
    return Call(
        "POST", "/v1/assets", m.UploadUrls.model_validate, body, idempotency_key=idempotency_key
    )


def upload_urls(
    asset_id: str,
    components: Iterable[str | m.ComponentDecl | Mapping[str, Any]],
    parts: Mapping[str, list[int]] | None = None,
) -> Call[m.UploadUrls]:
    body: dict[str, Any] = {"components": _components(components)}
    if parts:
        body["parts"] = {k: list(v) for k, v in parts.items()}
    return Call(
        "POST", f"/v1/assets/{_p(asset_id)}/upload-urls", m.UploadUrls.model_validate, body
    )


def add_components(
    asset_id: str, components: Iterable[str | m.ComponentDecl | Mapping[str, Any]],
) -> Call[m.UploadUrls]:
    """API 1.1 ``asset_keys``: declare more components of a pending asset; their URLs."""
    return Call("POST", f"/v1/assets/{_p(asset_id)}/components", m.UploadUrls.model_validate,
                {"components": _components(components)}, repeatable=True)


def list_uploads(asset_id: str) -> Call[m.Uploads]:
    return Call("GET", f"/v1/assets/{_p(asset_id)}/uploads", m.Uploads.model_validate)


def finalize(
    asset_id: str,
    components: Mapping[str, m.FinalizeComponent | Mapping[str, Any]],
    idempotency_key: str | None = None,
) -> Call[m.Asset]:
    """``components``: models, or their wire form already (a plain dict per component:
    10,000 models cost the daemon a noticeable share of an upload of tiny files)."""
    body = {"components": {
        k: v.model_dump(exclude_none=True) if isinstance(v, m.FinalizeComponent) else dict(v)
        for k, v in components.items()}}
    return Call(
        "POST",
        f"/v1/assets/{_p(asset_id)}/finalize",
        m.Asset.model_validate,
        body,
        idempotency_key=idempotency_key,
    )


def abandon(asset_id: str, reason: str, idempotency_key: str | None = None) -> Call[m.Asset]:
    return Call(
        "POST",
        f"/v1/assets/{_p(asset_id)}/abandon",
        m.Asset.model_validate,
        {"reason": reason},
        idempotency_key=idempotency_key,
    )


# ---- assets: read --------------------------------------------------------------------------


def get_asset(asset_id: str, include_presigned: bool = False) -> Call[m.Asset]:
    query = {"include_presigned": "true"} if include_presigned else {}
    return Call("GET", f"/v1/assets/{_p(asset_id)}", m.Asset.model_validate, query=query)


def list_assets(
    output_of: str | None = None, state: str | None = None, asset_type: str | None = None
) -> Call[m.AssetList]:
    query = {
        k: v
        for k, v in {"output_of": output_of, "state": state, "asset_type": asset_type}.items()
        if v
    }
    return Call("GET", "/v1/assets", m.AssetList.model_validate, query=query)


def search_assets(
    q: str, *, asset_type: str | None = None, state: str | None = None,
    output_of: str | None = None, limit: int = 50, cursor: str | None = None,
) -> Call[m.SearchPage]:
    """API 1.1 ``search``: the assets the caller may read that match ``q``, best first."""
    query = {k: v for k, v in {"q": q, "asset_type": asset_type, "state": state,
                               "output_of": output_of, "limit": str(limit),
                               "cursor": cursor}.items() if v}
    return Call("GET", "/v1/assets/search", m.SearchPage.model_validate, query=query)


# ---- assets: management --------------------------------------------------------------------


def deprecate(asset_id: str, reason: str) -> Call[m.Asset]:
    return Call(
        "POST", f"/v1/assets/{_p(asset_id)}/deprecate", m.Asset.model_validate, {"reason": reason}
    )


def invalidate(asset_id: str, reason: str) -> Call[m.Asset]:
    return Call(
        "POST", f"/v1/assets/{_p(asset_id)}/invalidate", m.Asset.model_validate, {"reason": reason}
    )


def delete(asset_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/assets/{_p(asset_id)}", _none, ok=(200, 204))


def grant_access(asset_id: str, principal_id: str, action: str) -> Call[Any]:
    body = {"principal_id": principal_id, "action": action}
    return Call("POST", f"/v1/assets/{_p(asset_id)}/access", _raw, body)


def revoke_access(asset_id: str, principal_id: str, action: str) -> Call[Any]:
    query = {"principal_id": principal_id, "action": action}
    return Call("DELETE", f"/v1/assets/{_p(asset_id)}/access", _raw, query=query, ok=(200, 204))


def list_access(asset_id: str) -> Call[m.Grants]:
    return Call("GET", f"/v1/assets/{_p(asset_id)}/access", m.Grants.model_validate)


def share_with_scope(asset_id: str, scope_id: str) -> Call[Any]:
    return Call("POST", f"/v1/assets/{_p(asset_id)}/share", _raw, {"scope_id": scope_id})


def set_visibility(asset_id: str, visibility: str) -> Call[m.Asset]:
    return Call(
        "PUT",
        f"/v1/assets/{_p(asset_id)}/visibility",
        m.Asset.model_validate,
        {"visibility": visibility},
    )


def move(asset_id: str, organization_id: str, visibility: str | None = None) -> Call[m.Asset]:
    body: dict[str, Any] = {"organization_id": organization_id}
    if visibility:
        body["visibility"] = visibility
    return Call("POST", f"/v1/assets/{_p(asset_id)}/move", m.Asset.model_validate, body)


def me_scopes() -> Call[m.Scopes]:
    return Call("GET", "/v1/me/scopes", m.Scopes.model_validate)


# ---- experiments (only what assets need) ---------------------------------------------------


def create_experiment(name: str) -> Call[m.Experiment]:
    return Call("POST", "/v1/experiments", m.Experiment.model_validate, {"name": name})


def get_experiment(experiment_id: str) -> Call[m.Experiment]:
    return Call("GET", f"/v1/experiments/{_p(experiment_id)}", m.Experiment.model_validate)


def create_variation(
    experiment_id: str, name: str, inputs: list[str], allow_invalid_assets: bool = False
) -> Call[m.Variation]:
    body = {"name": name, "inputs": inputs, "allow_invalid_assets": allow_invalid_assets}
    return Call("POST", f"/v1/experiments/{_p(experiment_id)}/variations",
                m.Variation.model_validate, body)


def get_variation(variation_id: str) -> Call[m.Variation]:
    return Call("GET", f"/v1/variations/{_p(variation_id)}", m.Variation.model_validate)


def add_output(variation_id: str, asset_id: str) -> Call[m.Variation]:
    return Call("POST", f"/v1/variations/{_p(variation_id)}/outputs", m.Variation.model_validate,
                {"asset_id": asset_id})


def retract_experiment(experiment_id: str, reason: str) -> Call[m.Experiment]:
    """The retracted experiment; ``invalidated`` lists the outputs this invalidated."""
    return Call("POST", f"/v1/experiments/{_p(experiment_id)}/retract",
                m.Experiment.model_validate, {"reason": reason})
