"""A local Chronicle server running on its own event loop in a background thread, so that
synchronous clients (``Chronicle(url=…, token=…)``, the CLI called in-process) can talk to
it from a plain test function. Principals come from a tokens file the test writes."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.chronicle.sdk import Chronicle
from agent.config import Settings
from agent.server.runner import LocalServer, start_server


def scope(sid: str) -> dict[str, str]:
    kind = "organization" if sid.startswith("org_") else "team"
    return {"id": sid, "kind": kind, "name": sid.replace("_", " ").title()}


def write_tokens(path: Path, principals: dict[str, list[str]]) -> dict[str, str]:
    """A tokens file with one token per principal (scope ids by prefix: ``org_…`` are
    organizations, the others teams); principal id → token."""
    tokens = {p: secrets.token_urlsafe(16) for p in principals}
    body = {"tokens": {tokens[p]: {"principal_id": p, "scopes": [scope(s) for s in scopes]}
                       for p, scopes in principals.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)
    return tokens


@dataclass
class Standalone:
    server: LocalServer
    tokens: dict[str, str]
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, principal: str | None) -> Chronicle:
        """``Chronicle(url=…, token=…)`` as ``principal`` (None: no token at all)."""
        token = self.tokens[principal] if principal is not None else None
        return Chronicle(url=self.url, token=token, settings=self.settings)


@contextmanager
def standalone_server(state_dir: Path, principals: dict[str, list[str]],
                      **server: Any) -> Iterator[Standalone]:
    state_dir.mkdir(parents=True, exist_ok=True)
    tokens_file = state_dir / "tokens.json"
    tokens = write_tokens(tokens_file, principals)
    settings = Settings(agent={"state_dir": state_dir, "socket_path": state_dir / "no.sock"},
                        server={"tokens_file": tokens_file, **server})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="chronicle-server", daemon=True)
    thread.start()
    try:
        srv = asyncio.run_coroutine_threadsafe(
            start_server(settings, embedded=True), loop).result(30)
        try:
            yield Standalone(srv, tokens, settings)
        finally:
            asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
