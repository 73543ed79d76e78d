"""``Chronicle()``: the researcher-side SDK of the assets guide, synchronous, acting with
the caller's own credentials straight against Chronicle (downloads go through the daemon,
which streams, verifies and resumes them).

``Chronicle()`` reads the same configuration as the CLI: ``chronicle.url`` and the token
(``CHRONICLE_AGENT_CHRONICLE__TOKEN``, ``chronicle.token_file``); with no URL configured it
finds the local daemon's embedded server through its ``endpoint.json``.
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path
from typing import Any

from agent.chronicle import contract
from agent.chronicle import models as m
from agent.chronicle.sync import SyncChronicle
from agent.config import Settings, load_settings, local_login
from agent.errors import ConfigError


def discover(settings: Settings) -> tuple[str, str | None]:
    """The Chronicle URL and token this process should use."""
    url, token = settings.chronicle.url, settings.token()
    if url:
        return url, token
    endpoint = settings.server_state_dir() / "endpoint.json"
    try:
        info = json.loads(endpoint.read_text())
    except FileNotFoundError:
        raise ConfigError(
            "no Chronicle URL configured and no local daemon's embedded server found "
            f"({endpoint} is missing): start `chronicle-agent daemon`, or set chronicle.url"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {endpoint}: {e}") from None
    if token is None and info.get("tokens_file"):
        tokens = json.loads(Path(info["tokens_file"]).read_text()).get("tokens", {})
        want = f"user_{local_login()}"
        token = next((t for t, p in tokens.items() if p.get("principal_id") == want),
                     next(iter(tokens), None))
    return str(info["url"]), token


class Assets:
    def __init__(self, t: SyncChronicle, socket_path: Path | None) -> None:
        self._t = t
        self._socket_path = socket_path

    def create_inline(self, asset_type: str, content: Any, content_type: str | None = None,
                      output_of: str | None = None, visibility: str | None = None) -> m.Asset:
        return self._t.send(contract.create_inline(
            asset_type, content, content_type=content_type, output_of=output_of,
            visibility=visibility, idempotency_key=f"inline:{os.urandom(12).hex()}"))

    def get(self, asset_id: str, include_presigned: bool = False) -> m.Asset:
        return self._t.send(contract.get_asset(asset_id, include_presigned))

    def list(self, output_of: str | None = None, state: str | None = None,
             asset_type: str | None = None) -> list[m.Asset]:
        return self._t.send(contract.list_assets(output_of, state, asset_type)).assets

    def download(self, asset_id: str, dest: str | Path, allow_invalid: bool = False,
                 timeout_s: float | None = None) -> dict[str, Any]:
        """Download through the local daemon (streamed, verified, resumable); returns the
        finished job, whose ``result.files`` lists what landed."""
        from agent.client import SocketClient
        from agent.errors import JobFailed

        client = SocketClient(self._socket_path)
        job = client.request("POST", "/v1/downloads", {
            "asset_id": asset_id, "dest": str(Path(dest).absolute()),
            "allow_invalid": allow_invalid})
        final = client.wait_job(job["job_id"], timeout_s)
        if final["state"] != "done":
            raise JobFailed(final)
        return final

    def deprecate(self, asset_id: str, reason: str) -> m.Asset:
        return self._t.send(contract.deprecate(asset_id, reason))

    def invalidate(self, asset_id: str, reason: str) -> m.Asset:
        return self._t.send(contract.invalidate(asset_id, reason))

    def delete(self, asset_id: str) -> None:
        self._t.send(contract.delete(asset_id))

    def grant_access(self, asset_id: str, principal_id: str, action: str) -> Any:
        return self._t.send(contract.grant_access(asset_id, principal_id, action))

    def revoke_access(self, asset_id: str, principal_id: str, action: str) -> Any:
        return self._t.send(contract.revoke_access(asset_id, principal_id, action))

    def list_access(self, asset_id: str) -> builtins.list[m.Grant]:
        return self._t.send(contract.list_access(asset_id)).grants

    def share_with_scope(self, asset_id: str, scope_id: str) -> Any:
        return self._t.send(contract.share_with_scope(asset_id, scope_id))

    def set_visibility(self, asset_id: str, visibility: str) -> m.Asset:
        return self._t.send(contract.set_visibility(asset_id, visibility))

    def move(self, asset_id: str, organization_id: str,
             visibility: str | None = None) -> m.Asset:
        return self._t.send(contract.move(asset_id, organization_id, visibility))


class Me:
    def __init__(self, t: SyncChronicle) -> None:
        self._t = t

    def scopes(self) -> m.Scopes:
        return self._t.send(contract.me_scopes())


class Chronicle:
    def __init__(self, url: str | None = None, token: str | None = None,
                 settings: Settings | None = None) -> None:
        settings = settings or load_settings()
        if url is None:
            url, found = discover(settings)
            token = token if token is not None else found
        self.url = url
        self._t = SyncChronicle(url, token, settings.chronicle.request_timeout_s)
        self.assets = Assets(self._t, settings.socket_path())
        self.me = Me(self._t)

    def __repr__(self) -> str:
        return f"Chronicle({self.url!r})"

    def send(self, call: contract.Call[Any]) -> Any:
        """Send any call of the contract (experiments, runs …) with these credentials."""
        return self._t.send(call)
