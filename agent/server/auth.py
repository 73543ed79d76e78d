"""Who is calling and what they may do: bearer tokens → principals, and the access rules.

Every authorization decision of the local server is made here:

- assets: actions ``read`` < ``write`` / ``delete`` < ``administer`` (``administer`` implies all
  three, ``write`` and ``delete`` each imply ``read``). The creator holds ``administer``. An
  explicit grant to the principal, to one of its scopes or to ``everyone`` gives its action.
  Visibility adds ``read``: ``public`` for every authenticated principal; ``organization`` /
  ``team`` for members of the asset's ``organization_id`` (no organization: as private).
- runs and experiments belong to their creator; anyone authenticated may read them.

A principal's scopes (teams, organizations) are listed with its token in the tokens file:
``{"tokens": {"<token>": {"principal_id": "user_…", "scopes": [{"id", "kind", "name"}]}}}``.
The file is re-read when it changes, so principals can be added while the server runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import local_login
from agent.errors import ConfigError

from .bodies import ACTIONS

log = logging.getLogger(__name__)

EVERYONE = "everyone"
_IMPLIED: dict[str, frozenset[str]] = {
    "administer": frozenset(ACTIONS),
    "write": frozenset({"write", "read"}),
    "delete": frozenset({"delete", "read"}),
    "read": frozenset({"read"}),
}


@dataclass(frozen=True)
class Scope:
    id: str
    kind: str
    name: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "kind": self.kind, "name": self.name}


@dataclass(frozen=True)
class Principal:
    id: str
    scopes: tuple[Scope, ...] = ()

    def member_of(self, scope_id: str | None) -> bool:
        return scope_id is not None and any(s.id == scope_id for s in self.scopes)

    def identities(self) -> frozenset[str]:
        """Every principal id a grant may name to reach this caller."""
        return frozenset({self.id, EVERYONE, *(s.id for s in self.scopes)})


@dataclass(frozen=True)
class Protected:
    """What the access rules need to know about an asset."""

    created_by: str
    visibility: str
    organization_id: str | None
    grants: tuple[tuple[str, str], ...]  # (principal_id, action)


def allows(principal: Principal, target: Protected, action: str) -> bool:
    """May ``principal`` perform ``action`` on the asset described by ``target``?"""
    if principal.id == target.created_by:
        return True
    ids = principal.identities()
    for grantee, granted in target.grants:
        if grantee in ids and action in _IMPLIED.get(granted, frozenset()):
            return True
    if action != "read":
        return False
    if target.visibility == "public":
        return True
    if target.visibility in ("organization", "team"):
        return principal.member_of(target.organization_id)
    return False


def owns(principal: Principal, created_by: str) -> bool:
    """Runs, experiments and variations: only their creator changes them."""
    return principal.id == created_by


def may_move_to(principal: Principal, organization_id: str) -> bool:
    return principal.member_of(organization_id)


# ---- tokens file ------------------------------------------------------------------------------


def parse_tokens(data: Any, source: str) -> dict[str, Principal]:
    """Validate a decoded tokens file; ConfigError naming what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), dict):
        raise ConfigError(f'tokens file {source}: expected {{"tokens": {{"<token>": {{...}}}}}}')
    out: dict[str, Principal] = {}
    for n, (token, entry) in enumerate(data["tokens"].items()):
        where = f"tokens file {source}: token #{n + 1}"
        if not token:
            raise ConfigError(f"{where}: empty token")
        if not isinstance(entry, dict) or not isinstance(entry.get("principal_id"), str):
            raise ConfigError(f"{where}: expected an object with a string principal_id")
        scopes = []
        for s in entry.get("scopes") or []:
            if not isinstance(s, dict) or not isinstance(s.get("id"), str):
                raise ConfigError(f"{where}: each scope needs a string id")
            kind = str(s.get("kind") or "team")
            scopes.append(Scope(s["id"], kind, str(s.get("name") or s["id"])))
        out[token] = Principal(entry["principal_id"], tuple(scopes))
    return out


def local_principal_id() -> str:
    return f"user_{local_login()}"


def ensure_tokens_file(path: Path) -> None:
    """Create ``path`` (mode 0600) with one random token for the local user unless it exists."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "tokens": {secrets.token_urlsafe(32): {"principal_id": local_principal_id(), "scopes": []}}
    }
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2)
        f.write("\n")
    try:
        os.link(tmp, path)  # never replaces a file another process created meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


class TokenStore:
    """Bearer token → principal, re-reading the file whenever it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._principals: dict[str, Principal] = {}
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read the file now (blocking: call from a thread or before serving)."""
        st = self.path.stat()
        self._principals = parse_tokens(json.loads(self.path.read_bytes()), str(self.path))
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reload_if_changed(self) -> None:
        try:
            st = self.path.stat()
        except OSError as e:
            log.warning("tokens file %s: %s; keeping the previous tokens", self.path, e.strerror)
            return
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
            return
        try:
            self.load()
        except (OSError, ValueError, ConfigError) as e:
            # A half-written file: keep serving with what we had, try again on the next call.
            log.warning("tokens file %s not reloaded: %s", self.path, e)

    async def principal(self, token: str) -> Principal | None:
        async with self._lock:
            await asyncio.to_thread(self._reload_if_changed)
        return self._principals.get(token) if token else None

    def token_for(self, principal_id: str) -> str | None:
        for token, p in self._principals.items():
            if p.id == principal_id:
                return token
        return None

    def first_token(self) -> str | None:
        return next(iter(self._principals), None)
