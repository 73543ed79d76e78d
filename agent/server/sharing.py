"""Who may reach an asset: grants, scope sharing, visibility, moving into an organization,
and the caller's own scopes. The rules themselves live in :mod:`.auth`."""

from __future__ import annotations

import sqlite3

from . import auth, db
from .app import Core, Ctx, Route, require_asset
from .bodies import ACTIONS, GrantAccess, Move, SetVisibility, Share
from .http import Reply, forbidden, one_of, req_str


def _grants(conn: sqlite3.Connection, asset_id: str) -> Reply:
    grants = db.list_grants(conn, asset_id)
    return Reply(200, {"grants": [{"principal_id": p, "action": a} for p, a in grants]})


class Sharing:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def grant(self, ctx: Ctx) -> Reply:
        body = ctx.body(GrantAccess)
        return await self._change(ctx, body.principal_id, body.action, add=True)

    async def revoke(self, ctx: Ctx) -> Reply:
        q = dict(ctx.request.query)
        principal_id = req_str(q, "principal_id", where="query parameter ")
        action = one_of(req_str(q, "action", where="query parameter "), ACTIONS, "action")
        assert action is not None
        return await self._change(ctx, principal_id, action, add=False)

    async def share(self, ctx: Ctx) -> Reply:
        return await self._change(ctx, ctx.body(Share).scope_id, "read", add=True)

    async def _change(self, ctx: Ctx, principal_id: str, action: str, *, add: bool) -> Reply:
        asset_id = ctx.arg("asset_id")

        def txn(conn: sqlite3.Connection) -> Reply:
            require_asset(conn, ctx.principal, asset_id, "administer")
            if add:
                db.add_grant(conn, asset_id, principal_id, action)
            else:
                db.remove_grant(conn, asset_id, principal_id, action)
            return _grants(conn, asset_id)

        return await ctx.commit(txn)

    async def list(self, ctx: Ctx) -> Reply:
        asset_id = ctx.arg("asset_id")

        def read(conn: sqlite3.Connection) -> Reply:
            require_asset(conn, ctx.principal, asset_id, "read")
            return _grants(conn, asset_id)

        return await self.core.db.read(read)

    async def visibility(self, ctx: Ctx) -> Reply:
        visibility = ctx.body(SetVisibility).visibility
        return await self._place(ctx, visibility=visibility, organization_id=None, move=False)

    async def move(self, ctx: Ctx) -> Reply:
        body = ctx.body(Move)
        return await self._place(
            ctx, visibility=body.visibility, organization_id=body.organization_id, move=True
        )

    async def _place(
        self, ctx: Ctx, *, visibility: str | None, organization_id: str | None, move: bool
    ) -> Reply:
        asset_id = ctx.arg("asset_id")

        def txn(conn: sqlite3.Connection) -> Reply:
            # Access first (404 for whoever cannot read it), then membership of the target.
            asset = require_asset(conn, ctx.principal, asset_id, "administer")
            if move and not auth.may_move_to(ctx.principal, organization_id or ""):
                raise forbidden(f"moving into {organization_id} needs membership of it")
            db.set_placement(
                conn,
                asset_id,
                visibility=visibility or asset.visibility,
                organization_id=organization_id if move else asset.organization_id,
            )
            changed = db.get_asset(conn, asset_id)
            assert changed is not None
            return Reply(200, changed.to_json())

        return await ctx.commit(txn)

    async def me(self, ctx: Ctx) -> Reply:
        p = ctx.principal
        return Reply(200, {"principal_id": p.id, "scopes": [s.to_json() for s in p.scopes]})


def routes(core: Core) -> list[Route]:
    s = Sharing(core)
    return [
        ("POST", "/v1/assets/{asset_id}/access", s.grant, GrantAccess),
        ("DELETE", "/v1/assets/{asset_id}/access", s.revoke, None),
        ("GET", "/v1/assets/{asset_id}/access", s.list, None),
        ("POST", "/v1/assets/{asset_id}/share", s.share, Share),
        ("PUT", "/v1/assets/{asset_id}/visibility", s.visibility, SetVisibility),
        ("POST", "/v1/assets/{asset_id}/move", s.move, Move),
        ("GET", "/v1/me/scopes", s.me, None),
    ]
