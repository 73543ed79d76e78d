"""The researcher-side commands: ``chronicle-agent assets …`` and ``chronicle-agent me``.

They talk straight to Chronicle with the caller's own credentials (``chronicle.url`` and
token, else the local daemon's embedded server; see :func:`agent.chronicle.sdk.discover`),
not through the daemon. A refusal exits 1 with Chronicle's error code and message (the
common handling in :func:`agent.cli.cli`). Presigned URLs are printed by ``assets get
--presigned`` only, which exists to print them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.progress import format_bytes

if TYPE_CHECKING:
    from agent.chronicle import models as m
    from agent.chronicle.sdk import Chronicle
    from agent.cli import Ctx

ACTIONS = ("read", "write", "delete", "administer")
VISIBILITIES = ("private", "organization", "team", "public")


def add_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add ``assets`` (with its subcommands) and ``me`` to the parser of :mod:`agent.cli`."""
    from agent.cli import _global_options

    assets = command("assets", "manage assets on Chronicle with your own credentials")
    sub = assets.add_subparsers(dest="assets_command", metavar="SUBCOMMAND", required=True)

    def sc(name: str, help_: str, handler: Callable[[Ctx], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _global_options(p)
        p.add_argument("asset_id", metavar="ASSET_ID")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        p.set_defaults(handler=handler)
        return p

    p = sc("get", "show an asset", cmd_get)
    p.add_argument("--presigned", action="store_true",
                   help="also print a presigned read URL per component (credentials: "
                        "anyone holding one can read that component until it expires)")
    p = sc("deprecate", "flag an asset deprecated: a warning wherever it is used", cmd_flag)
    p.add_argument("--reason", required=True, metavar="R")
    p = sc("invalidate", "flag an asset invalidated: refused as a new input", cmd_flag)
    p.add_argument("--reason", required=True, metavar="R")
    sc("delete", "delete an unlinked asset: its row, grants and bytes", cmd_delete)
    for name, help_ in (("grant", "grant a principal an action on an asset"),
                        ("revoke", "revoke a principal's action on an asset")):
        p = sc(name, help_, cmd_grant)
        p.add_argument("--principal", required=True, metavar="P",
                       help="a user, team or organization id, or everyone")
        p.add_argument("--action", required=True, choices=ACTIONS)
    sc("access", "list an asset's explicit grants", cmd_access)
    p = sc("share", "give a whole team or organization read access", cmd_share)
    p.add_argument("--scope", required=True, metavar="S", help="a team or organization id")
    p = sc("visibility", "set who may read an asset beyond its grants", cmd_visibility)
    p.add_argument("visibility", metavar="VALUE", choices=VISIBILITIES,
                   help="private, organization, team or public")
    p = sc("move", "move an asset into an organization", cmd_move)
    p.add_argument("--org", required=True, metavar="ORG")
    p.add_argument("--visibility", choices=VISIBILITIES)

    p = sub.add_parser("search", help="find assets you may read by words of their type, "
                       "component names, validity reasons or text (API 1.1)",
                       description="find assets you may read by words of their type, "
                       "component names, validity reasons or inline text; every word must "
                       "match, the last one also as a prefix; best match first (API 1.1)")
    _global_options(p)
    p.add_argument("query", metavar="QUERY", nargs="+")
    p.add_argument("--type", metavar="T", help="only assets of this type")
    p.add_argument("--run", metavar="R", help="only outputs of this run")
    p.add_argument("--state", choices=("pending", "ready", "abandoned"))
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N (20)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(handler=cmd_search)

    p = command("me", "who you are on Chronicle, and your teams and organizations")
    p.add_argument("--json", action="store_true", help="print the scopes object as JSON")
    p.set_defaults(handler=cmd_me)


def _chronicle(ctx: Ctx) -> Chronicle:
    from agent.chronicle.sdk import Chronicle

    return Chronicle(settings=ctx.settings())


# ---- output ------------------------------------------------------------------------------


def asset_json(asset: m.Asset, presigned: bool = False) -> dict[str, Any]:
    out = asset.model_dump(mode="json", exclude_none=False)
    if not presigned:
        out.pop("download_urls", None)
        out.pop("expires_at", None)
    elif out.get("download_urls") is None:
        out["download_urls"] = {}
    for key in ("warnings",):
        if out.get(key) is None:
            out.pop(key, None)
    return out


def _flag(flag: m.Flag | None) -> str:
    return "-" if flag is None else f"{flag.reason} (since {flag.at})"


def print_asset(ctx: Ctx, asset: m.Asset, presigned: bool = False) -> None:
    if ctx.args.json:
        ctx.print_json(asset_json(asset, presigned))
        return
    total = sum(c.size or 0 for c in asset.components)
    rows = [
        ("asset", asset.asset_id),
        ("type", asset.asset_type),
        ("state", asset.state),
        ("visibility", asset.visibility),
        ("organization", asset.organization_id or "-"),
        ("created_by", asset.created_by or "-"),
        ("output_of", asset.output_of or "-"),
        ("deprecated", _flag(asset.deprecated)),
        ("invalidated", _flag(asset.invalidated)),
        ("components", f"{len(asset.components)}, {format_bytes(total)}"),
    ]
    for key, value in rows:
        ctx.print(f"{key + ':':<14}{value}")
    for c in asset.components:
        sha = (c.sha256 or "-")[:16]
        ctx.print(f"  {c.name}  {format_bytes(c.size or 0)}  sha256 {sha}")
    if presigned:
        urls = asset.download_urls or {}
        if not urls:
            ctx.warn("no download URLs: the asset is not ready")
        for name, url in urls.items():
            ctx.print(f"url {name}: {url}")


def print_grants(ctx: Ctx, grants: list[m.Grant]) -> None:
    if ctx.args.json:
        ctx.print_json({"grants": [g.model_dump(mode="json") for g in grants]})
        return
    if not grants:
        ctx.warn("no explicit grants (the creator holds administer; visibility is a field "
                 "of the asset)")
    for g in grants:
        ctx.print(f"{g.principal_id}  {g.action}")


# ---- commands ----------------------------------------------------------------------------


def cmd_get(ctx: Ctx) -> int:
    presigned = bool(ctx.args.presigned)
    asset = _chronicle(ctx).assets.get(ctx.args.asset_id, include_presigned=presigned)
    print_asset(ctx, asset, presigned)
    return 0


def cmd_flag(ctx: Ctx) -> int:
    assets = _chronicle(ctx).assets
    change = assets.deprecate if ctx.args.assets_command == "deprecate" else assets.invalidate
    print_asset(ctx, change(ctx.args.asset_id, reason=ctx.args.reason))
    return 0


def cmd_delete(ctx: Ctx) -> int:
    _chronicle(ctx).assets.delete(ctx.args.asset_id)
    if ctx.args.json:
        ctx.print_json({"asset_id": ctx.args.asset_id, "deleted": True})
    else:
        ctx.print(f"{ctx.args.asset_id} deleted")
    return 0


def cmd_grant(ctx: Ctx) -> int:
    assets = _chronicle(ctx).assets
    change = assets.grant_access if ctx.args.assets_command == "grant" else assets.revoke_access
    print_grants(ctx, change(ctx.args.asset_id, principal_id=ctx.args.principal,
                             action=ctx.args.action))
    return 0


def cmd_access(ctx: Ctx) -> int:
    print_grants(ctx, _chronicle(ctx).assets.list_access(ctx.args.asset_id))
    return 0


def cmd_share(ctx: Ctx) -> int:
    print_grants(ctx, _chronicle(ctx).assets.share_with_scope(ctx.args.asset_id,
                                                              scope_id=ctx.args.scope))
    return 0


def cmd_visibility(ctx: Ctx) -> int:
    print_asset(ctx, _chronicle(ctx).assets.set_visibility(ctx.args.asset_id,
                                                           ctx.args.visibility))
    return 0


def cmd_move(ctx: Ctx) -> int:
    print_asset(ctx, _chronicle(ctx).assets.move(
        ctx.args.asset_id, organization_id=ctx.args.org, visibility=ctx.args.visibility))
    return 0


def cmd_me(ctx: Ctx) -> int:
    scopes = _chronicle(ctx).me.scopes()
    if ctx.args.json:
        ctx.print_json(scopes.model_dump(mode="json"))
        return 0
    ctx.print(f"principal: {scopes.principal_id}")
    for s in scopes.scopes:
        ctx.print(f"  {s.kind:<13} {s.id}  {s.name or ''}".rstrip())
    if not scopes.scopes:
        ctx.print("  (no teams or organizations)")
    return 0


def cmd_search(ctx: Ctx) -> int:
    from agent.cli import format_table
    from agent.errors import UsageError

    if not 1 <= ctx.args.limit <= 1000:
        raise UsageError(f"--limit must be from 1 to 1000, got {ctx.args.limit}")
    hits = _chronicle(ctx).assets.search(
        " ".join(ctx.args.query), asset_type=ctx.args.type, state=ctx.args.state,
        output_of=ctx.args.run, limit=ctx.args.limit)
    if ctx.args.json:
        ctx.print_json({"assets": [{**asset_json(h), "snippet": h.snippet, "text": h.text}
                                   for h in hits]})
        return 0
    if not hits:
        ctx.warn("no asset you may read matches")
        return 0
    ctx.print(format_table(("ASSET", "TYPE", "STATE", "FLAGS", "CREATED", "TEXT"), [
        (h.asset_id, h.asset_type, h.state,
         ",".join(f for f, on in (("deprecated", h.deprecated), ("invalidated", h.invalidated))
                  if on) or "-",
         (h.created_at or "-")[:19], h.text or h.snippet)
        for h in hits]))
    return 0
