"""Helpers for the local server's tests: start a server on an ephemeral loopback port with
its state in a temp dir, talk to its JSON API and to the presigned URLs it hands out, and
add principals to its tokens file while it runs."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from agent.config import Settings
from agent.server.runner import LocalServer, start_server

MiB = 1024 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add_principal(
    tokens_file: Path, principal_id: str, scopes: list[dict[str, str]] | None = None
) -> str:
    """Add a token for ``principal_id`` to a running server's tokens file; the token."""
    data = json.loads(tokens_file.read_text())
    token = secrets.token_urlsafe(16)
    data["tokens"][token] = {"principal_id": principal_id, "scopes": scopes or []}
    tmp = tokens_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(tokens_file)
    return token


@dataclass
class Reply:
    status: int
    body: Any
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"]["code"])
        return None


class Api:
    """The JSON API as one principal (``token``), plus raw PUT/GET on presigned URLs."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str | None) -> None:
        self.session = session
        self.base = base
        self.token = token

    def as_(self, token: str | None) -> Api:
        return Api(self.session, self.base, token)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> Reply:
        h = dict(headers or {})
        if self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base + path, data=data, headers=h, params=params
        ) as r:
            text = await r.text()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = text
            return Reply(r.status, parsed, CIMultiDict(r.headers))

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.call("POST", path, {} if body is None else body, **kw)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.call("GET", path, **kw)

    async def put_url(self, url: str, data: bytes, headers: dict[str, str] | None = None) -> Reply:
        """PUT exact bytes with a Content-Length and no header the URL was not signed for."""
        body = io.BytesIO(data) if len(data) > 1024 * 1024 else data
        async with self.session.put(
            url, data=body, headers=headers or {}, skip_auto_headers=("Content-Type",)
        ) as r:
            return Reply(r.status, await r.text(), CIMultiDict(r.headers))

    async def get_url(
        self, url: str, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, CIMultiDict[str]]:
        async with self.session.get(url, headers=headers or {}) as r:
            return r.status, await r.read(), CIMultiDict(r.headers)

    # -- the presigned flow, end to end --

    async def register(self, components: list[Any], **extra: Any) -> dict[str, Any]:
        r = await self.post(
            "/v1/assets", {"asset_type": "checkpoint", "components": components, **extra}
        )
        assert r.status == 201, r.body
        return dict(r.body)

    async def upload(self, plan: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        """PUT every file of ``files`` through the plan's URLs; the finalize body."""
        final: dict[str, Any] = {}
        for name, data in files.items():
            spec: dict[str, Any] = {"size": len(data), "sha256": sha256(data)}
            if name in plan.get("multipart", {}):
                mp = plan["multipart"][name]
                parts = []
                for p in mp["parts"]:
                    n = p["part_number"]
                    chunk = data[(n - 1) * mp["part_size"] : n * mp["part_size"]]
                    r = await self.put_url(p["url"], chunk)
                    assert r.status == 200, r.body
                    parts.append({"part_number": n, "etag": r.headers["ETag"]})
                spec["parts"] = parts
            else:
                r = await self.put_url(plan["upload_urls"][name], data,
                                       plan.get("upload_headers", {}).get(name))
                assert r.status == 200, r.body
            final[name] = spec
        return {"components": final}

    async def finalize(self, asset_id: str, body: dict[str, Any]) -> Reply:
        return await self.post(f"/v1/assets/{asset_id}/finalize", body)


def server_settings(state_dir: Path, **server: Any) -> Settings:
    return Settings(agent={"state_dir": state_dir}, server=server)


@dataclass
class Running:
    server: LocalServer
    api: Api
    token: str

    @property
    def tokens_file(self) -> Path:
        return self.server.tokens_file


@asynccontextmanager
async def running_server(state_dir: Path, **server: Any) -> AsyncIterator[Running]:
    """A local server (embedded mode: ephemeral port) and an API client as its local user."""
    srv = await start_server(server_settings(state_dir, **server), embedded=True)
    try:
        assert srv.local_token is not None
        async with aiohttp.ClientSession() as session:
            yield Running(srv, Api(session, srv.url, srv.local_token), srv.local_token)
    finally:
        await srv.stop()
