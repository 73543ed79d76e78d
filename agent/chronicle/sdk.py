"""``Chronicle()``: the researcher-side SDK of the assets guide, synchronous, acting with
the caller's own credentials straight against Chronicle.

``Chronicle()`` reads the same configuration as the CLI: ``chronicle.url`` and the token
(``CHRONICLE_AGENT_CHRONICLE__TOKEN``, ``chronicle.token_file``); with no URL configured it
finds the local daemon's embedded server through its ``endpoint.json``.
``Chronicle(url=…, token=…)`` is explicit.

``chronicle.assets`` — create_inline, get (``include_presigned=True`` adds read URLs), list,
latest (the newest ready asset of a run and type), download, deprecate, invalidate, delete,
grant_access, revoke_access, list_access, share_with_scope, set_visibility, move;
``chronicle.me.scopes()``; ``chronicle.experiments`` — create, get, add_variation,
get_variation, add_output, retract.

Downloads: the ``GET …?include_presigned=true`` is made with the caller's credentials (it is
what checks that the caller may read the asset, and it carries the validity flags); the
bytes then go through the local daemon (streamed, verified, resumed, cached) or, when no
daemon is running, are streamed by this process itself (:mod:`agent.transfer.direct`).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
from pathlib import Path
from typing import Any, TypeVar

from agent.chronicle import contract
from agent.chronicle import models as m
from agent.chronicle.sync import SyncChronicle
from agent.config import Settings, load_settings, local_login
from agent.errors import (
    AgentError,
    AssetInvalid,
    DaemonUnreachable,
    JobFailed,
    RetryableError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def discover(settings: Settings) -> tuple[str, str | None]:
    """The Chronicle URL and token this process should use: the configured ones, else the
    local daemon's embedded server (its ``endpoint.json``) and the local user's token."""
    url, token = settings.chronicle.url, settings.token()
    if url:
        return url, token
    endpoint = settings.server_state_dir() / "endpoint.json"
    try:
        info = json.loads(endpoint.read_text())
    except FileNotFoundError:
        raise DaemonUnreachable(
            "no Chronicle URL is configured and no local daemon's embedded server was found "
            f"({endpoint} is missing): start `chronicle-agent daemon`, or set chronicle.url "
            "(CHRONICLE_AGENT_CHRONICLE__URL) and a token"
        ) from None
    except (OSError, ValueError) as e:
        raise DaemonUnreachable(f"cannot read {endpoint}: {e}") from None
    if token is None and info.get("tokens_file"):
        try:
            tokens = json.loads(Path(info["tokens_file"]).read_text()).get("tokens", {})
        except (OSError, ValueError) as e:
            raise DaemonUnreachable(
                f"cannot read the embedded server's tokens file: {e}; set "
                "CHRONICLE_AGENT_CHRONICLE__TOKEN") from None
        want = f"user_{local_login()}"
        token = next((t for t, p in tokens.items() if p.get("principal_id") == want),
                     next(iter(tokens), None))
    return str(info["url"]), token


class _Transport(SyncChronicle):
    """The stdlib carrier; when Chronicle is the daemon's embedded server (found, not
    configured), not reaching it means the daemon is not running."""

    def __init__(self, base_url: str, token: str | None, timeout_s: float,
                 embedded: bool) -> None:
        super().__init__(base_url, token, timeout_s)
        self.embedded = embedded

    def send(self, call: contract.Call[T]) -> T:
        try:
            return super().send(call)
        except RetryableError as e:
            if self.embedded and e.code == "chronicle_unreachable":
                raise DaemonUnreachable(
                    f"the local daemon's embedded Chronicle at {self.base_url} does not "
                    "answer: is `chronicle-agent daemon` running?") from None
            raise


class Assets:
    def __init__(self, t: SyncChronicle, socket_path: Path | None) -> None:
        self._t = t
        self._socket_path = socket_path
        self._feature_set: frozenset[str] | None = None

    def create_inline(self, asset_type: str, content: Any, content_type: str | None = None,
                      output_of: str | None = None, visibility: str | None = None) -> m.Asset:
        return self._t.send(contract.create_inline(
            asset_type, content, content_type=content_type, output_of=output_of,
            visibility=visibility, idempotency_key=f"inline:{os.urandom(12).hex()}"))

    def get(self, asset_id: str, include_presigned: bool = False) -> m.Asset:
        return self._t.send(contract.get_asset(asset_id, include_presigned))

    def list(self, output_of: str | None = None, state: str | None = None,
             asset_type: str | None = None) -> builtins.list[m.Asset]:
        return self._t.send(contract.list_assets(output_of, state, asset_type)).assets

    def search(self, q: str, asset_type: str | None = None, state: str | None = None,
               output_of: str | None = None, limit: int = 50) -> builtins.list[m.SearchHit]:
        """Full-text search (API 1.1): up to ``limit`` assets you may read that match every
        word of ``q`` (the last one as a prefix), best match first, each with its
        ``snippet`` and the first line of its ``text``. Raises :class:`AgentError` against
        a Chronicle that does not offer search (code ``not_supported``)."""
        if "search" not in self._features():
            raise AgentError("this Chronicle does not offer search (API 1.1 'search' is not "
                             "in its /v1/health features)", code="not_supported")
        hits: builtins.list[m.SearchHit] = []
        cursor: str | None = None
        while len(hits) < limit:
            page = self._t.send(contract.search_assets(
                q, asset_type=asset_type, state=state, output_of=output_of,
                limit=min(200, limit - len(hits)), cursor=cursor))
            hits += page.assets
            cursor = page.next_cursor
            if cursor is None or not page.assets:
                break
        return hits[:limit]

    def _features(self) -> frozenset[str]:
        if self._feature_set is None:
            self._feature_set = contract.features_of(self._t.send(contract.health()))
        return self._feature_set

    def latest(self, run_id: str, asset_type: str,
               allow_invalid: bool = False) -> m.Asset | None:
        """The newest ``ready`` asset of run ``run_id`` and type ``asset_type`` (by
        ``created_at``), None when there is none; invalidated ones are skipped unless
        ``allow_invalid``, deprecated ones count (see :mod:`agent.transfer.selection`)."""
        from agent.transfer.selection import latest_call, pick_latest

        listing = self._t.send(latest_call(run_id, asset_type))
        return pick_latest(listing.assets, run_id, asset_type, allow_invalid)

    def download(self, asset: str | m.Asset, dest: str | Path, allow_invalid: bool = False,
                 timeout_s: float | None = None, include: builtins.list[str] | None = None,
                 exclude: builtins.list[str] | None = None) -> dict[str, Any]:
        """Download an asset (an id, or what ``get(…, include_presigned=True)`` returned)
        into ``dest``, a new or empty directory (its missing parents are created, 0700);
        each component lands at its relative name, verified. ``include`` / ``exclude``:
        only the components whose names these globs select (fnmatch on the whole name,
        ``*`` matching ``/`` too; exclude after include; selecting none raises
        :class:`~agent.errors.NothingSelected`). Returns ``{"asset_id", "dest", "files":
        [{"name", "size", "sha256"}], "warnings", "job_id", "cached"}``. An invalidated
        asset raises :class:`~agent.errors.AssetInvalid` unless ``allow_invalid``; a
        deprecated one is downloaded and its reason is in ``warnings`` (and logged)."""
        from agent.transfer.selection import check_patterns, filtered

        inc, exc = check_patterns(include, "include"), check_patterns(exclude, "exclude")
        if isinstance(asset, str) or asset.download_urls is None:
            asset = self.get(asset if isinstance(asset, str) else asset.asset_id,
                             include_presigned=True)
        aid = asset.asset_id
        if asset.invalidated is not None and not allow_invalid:
            raise AssetInvalid(409, "asset_invalid",
                               f"asset {aid} is invalidated ({asset.invalidated.reason}); "
                               "pass allow_invalid=True to download it anyway")
        wanted = filtered(asset, inc, exc)  # selecting nothing fails here, before any job
        target = str(Path(dest).expanduser().absolute())
        try:
            out = self._through_daemon(aid, target, allow_invalid, timeout_s, inc, exc)
        except DaemonUnreachable as e:
            log.info("no daemon (%s): downloading %s in this process", e.message, aid)
            out = None
        if out is None:
            out = self._in_process(wanted, target)
        for w in out["warnings"]:
            log.warning("%s", w)
        return out

    def _through_daemon(self, asset_id: str, dest: str, allow_invalid: bool,
                        timeout_s: float | None, include: builtins.list[str],
                        exclude: builtins.list[str]) -> dict[str, Any] | None:
        """Through the local daemon; None if that daemon talks to another Chronicle."""
        from agent.client import SocketClient

        client = SocketClient(self._socket_path, token=self._t._token)
        theirs = str(client.health().get("chronicle_url") or "").rstrip("/")
        if theirs != self._t.base_url:
            log.info("the local daemon uses Chronicle %s, not %s: downloading %s in this "
                     "process", theirs or "(none)", self._t.base_url, asset_id)
            return None
        body: dict[str, Any] = {"asset_id": asset_id, "dest": dest,
                                "allow_invalid": allow_invalid}
        if include:
            body["include"] = include
        if exclude:
            body["exclude"] = exclude
        job = client.request("POST", "/v1/downloads", body)
        final = client.wait_job(job["job_id"], timeout_s)
        if final["state"] != "done":
            raise JobFailed(final)
        result = final.get("result") or {}
        return {"asset_id": asset_id, "dest": dest, "files": result.get("files") or [],
                "warnings": final.get("warnings") or [], "job_id": final["job_id"],
                "cached": bool(result.get("cached"))}

    def _in_process(self, asset: m.Asset, dest: str) -> dict[str, Any]:
        """``asset``: only the components to fetch."""
        from agent.access import make_dest_parents
        from agent.transfer.direct import download_direct
        from agent.transfer.download import check_asset

        warnings = check_asset(asset, allow_invalid=True)  # refused above unless allowed
        make_dest_parents(dest, [])  # this process is the caller: its own rights
        files = download_direct(
            asset, dest, lambda: self.get(asset.asset_id, include_presigned=True))
        return {"asset_id": asset.asset_id, "dest": dest, "files": files,
                "warnings": warnings, "job_id": None, "cached": False}

    def deprecate(self, asset_id: str, reason: str) -> m.Asset:
        return self._t.send(contract.deprecate(asset_id, reason))

    def invalidate(self, asset_id: str, reason: str) -> m.Asset:
        return self._t.send(contract.invalidate(asset_id, reason))

    def delete(self, asset_id: str) -> None:
        self._t.send(contract.delete(asset_id))

    def grant_access(self, asset_id: str, principal_id: str, action: str) -> builtins.list[
            m.Grant]:
        """Idempotent; needs administer. The asset's explicit grants afterwards."""
        return m.Grants.model_validate(
            self._t.send(contract.grant_access(asset_id, principal_id, action))).grants

    def revoke_access(self, asset_id: str, principal_id: str, action: str) -> builtins.list[
            m.Grant]:
        """Idempotent; needs administer. The asset's explicit grants afterwards."""
        return m.Grants.model_validate(
            self._t.send(contract.revoke_access(asset_id, principal_id, action))).grants

    def list_access(self, asset_id: str) -> builtins.list[m.Grant]:
        """Explicit grants only (visibility is a field of the asset)."""
        return self._t.send(contract.list_access(asset_id)).grants

    def share_with_scope(self, asset_id: str, scope_id: str) -> builtins.list[m.Grant]:
        """A read grant for a whole team or organization; the grants afterwards."""
        return m.Grants.model_validate(
            self._t.send(contract.share_with_scope(asset_id, scope_id))).grants

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


class Experiments:
    """Experiments and variations, as far as assets need them."""

    def __init__(self, t: SyncChronicle) -> None:
        self._t = t

    def create(self, name: str) -> m.Experiment:
        return self._t.send(contract.create_experiment(name))

    def get(self, experiment_id: str) -> m.Experiment:
        return self._t.send(contract.get_experiment(experiment_id))

    def add_variation(self, experiment_id: str, name: str, inputs: list[str],
                      allow_invalid_assets: bool = False) -> m.Variation:
        """An invalidated input raises AssetInvalid unless ``allow_invalid_assets``; a
        deprecated one is linked and listed in the answer's ``warnings``."""
        var = self._t.send(contract.create_variation(experiment_id, name, inputs,
                                                     allow_invalid_assets))
        for w in var.warnings or []:
            log.warning("%s", w.get("message") if isinstance(w, dict) else w)
        return var

    def get_variation(self, variation_id: str) -> m.Variation:
        return self._t.send(contract.get_variation(variation_id))

    def add_output(self, variation_id: str, asset_id: str) -> m.Variation:
        return self._t.send(contract.add_output(variation_id, asset_id))

    def retract(self, experiment_id: str, reason: str) -> m.Experiment:
        """Invalidates every output of the experiment's variations (``.invalidated``)."""
        return self._t.send(contract.retract_experiment(experiment_id, reason))


class Chronicle:
    def __init__(self, url: str | None = None, token: str | None = None,
                 settings: Settings | None = None) -> None:
        settings = settings or load_settings()
        embedded = False
        if url is None:
            embedded = not settings.chronicle.url
            url, found = discover(settings)
            token = token if token is not None else found
        self.url = url
        self._t = _Transport(url, token, settings.chronicle.request_timeout_s, embedded)
        self.assets = Assets(self._t, settings.socket_path())
        self.me = Me(self._t)
        self.experiments = Experiments(self._t)

    def __repr__(self) -> str:
        return f"Chronicle({self.url!r})"

    def send(self, call: contract.Call[Any]) -> Any:
        """Send any call of the contract (runs …) with these credentials."""
        return self._t.send(call)
