"""The access model, as a matrix: principals × actions × visibility (and × explicit grants),
each outcome asserted, download URL issuance and delete included.

One standalone local server (in-process, its own event loop in a thread) with a tokens file
written here; every call goes through the synchronous SDK, ``Chronicle(url=…, token=…)``,
as the principal in question. Each cell gets a fresh asset so that no action disturbs
another.

Principals (the tokens file):

- ``creator`` user_alice, member of org_1, org_2 and team_9: creates every asset;
- ``other`` user_bob, no scopes;
- ``team_member`` user_tina, member of team_9;
- ``org_member`` user_olga, member of org_1;
- ``anonymous``: no token at all (401 for everything).

Expected outcomes come from the contract (chronicle-api.md, "Access control"), written out
here independently of the server's code: ``administer`` implies every action; ``write`` and
``delete`` each imply ``read``; visibility only ever adds ``read`` (``public``: every
authenticated principal; ``organization`` / ``team``: members of the asset's organization);
who cannot read an asset gets 404 (its existence is not disclosed), who can read but not act
gets 403; ``move`` needs administer and membership of the target organization.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.chronicle import models as m
from agent.chronicle.sdk import Chronicle
from agent.errors import ChronicleError
from tests.support.helpers_standalone import Standalone, standalone_server

PRINCIPALS = {
    "user_alice": ["org_1", "org_2", "team_9"],
    "user_bob": [],
    "user_tina": ["team_9"],
    "user_olga": ["org_1"],
}
WHO = {"creator": "user_alice", "other": "user_bob", "team_member": "user_tina",
       "org_member": "user_olga", "anonymous": None}
MEMBER_OF = {p: set(s) for p, s in PRINCIPALS.items()}
ACTIONS = ["get", "get_presigned", "download_url", "deprecate", "invalidate", "delete",
           "grant", "revoke", "list_access", "share", "set_visibility", "move"]
NEEDS = {"get": "read", "get_presigned": "read", "download_url": "read", "list_access": "read",
         "deprecate": "write", "invalidate": "write", "delete": "delete", "grant": "administer",
         "revoke": "administer", "share": "administer", "set_visibility": "administer",
         "move": "administer"}
IMPLIES = {"administer": {"read", "write", "delete", "administer"},
           "write": {"read", "write"}, "delete": {"read", "delete"}, "read": {"read"}}
CONTENT = "the asset's bytes: " + "x" * 1000


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standalone]:
    with standalone_server(tmp_path_factory.mktemp("perm"), PRINCIPALS) as s:
        yield s


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def outcome(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(status, result or error body) of one SDK call."""
    try:
        return 200, fn()
    except ChronicleError as e:
        assert "Signature=" not in e.message and "/storage/" not in e.message
        return e.status, e


def make_asset(srv: Standalone, visibility: str, org: str | None) -> m.Asset:
    alice = srv.client("user_alice")
    asset = alice.assets.create_inline(asset_type="dataset", content=CONTENT,
                                       content_type="text/plain")
    if org is not None:
        asset = alice.assets.move(asset.asset_id, organization_id=org, visibility=visibility)
    elif visibility != "private":
        asset = alice.assets.set_visibility(asset.asset_id, visibility)
    assert asset.visibility == visibility and asset.created_by == "user_alice"
    return asset


def expected(rights: set[str], action: str, member_of_target: bool) -> int:
    if "read" not in rights:
        return 404
    ok = NEEDS[action] in rights and (action != "move" or member_of_target)
    return 200 if ok else 403


def act(c: Chronicle, action: str, aid: str, move_to: str) -> Callable[[], Any]:
    a = c.assets
    return {
        "get": lambda: a.get(aid),
        "get_presigned": lambda: a.get(aid, include_presigned=True),
        "download_url": lambda: a.get(aid, include_presigned=True),
        "deprecate": lambda: a.deprecate(aid, reason="superseded"),
        "invalidate": lambda: a.invalidate(aid, reason="labeling bug"),
        "delete": lambda: a.delete(aid),
        "grant": lambda: a.grant_access(aid, principal_id="user_zed", action="read"),
        "revoke": lambda: a.revoke_access(aid, principal_id="user_pre", action="read"),
        "list_access": lambda: a.list_access(aid),
        "share": lambda: a.share_with_scope(aid, scope_id="team_42"),
        "set_visibility": lambda: a.set_visibility(aid, "public"),
        "move": lambda: a.move(aid, organization_id=move_to, visibility="organization"),
    }[action]


def check_cell(srv: Standalone, principal: str | None, rights: set[str], action: str,
               asset: m.Asset, move_to: str) -> None:
    aid = asset.asset_id
    alice = srv.client("user_alice")
    alice.assets.grant_access(aid, principal_id="user_pre", action="read")  # for revoke
    before = alice.assets.get(aid, include_presigned=True)
    creators_url = (before.download_urls or {})["content"]
    grants = {(g.principal_id, g.action) for g in alice.assets.list_access(aid)}
    want = 401 if principal is None else expected(
        rights, action, move_to in MEMBER_OF.get(principal, set()))
    status, got = outcome(act(srv.client(principal), action, aid, move_to))
    assert status == want, (principal, action, got)
    after = outcome(lambda: alice.assets.get(aid))[1]
    if status != 200:
        # refused: nothing changed, and no URL was handed out
        assert not isinstance(got, m.Asset)
        assert isinstance(after, m.Asset)
        assert after.model_dump(exclude={"download_urls", "expires_at"}) == before.model_dump(
            exclude={"download_urls", "expires_at"})
        assert {(g.principal_id, g.action) for g in alice.assets.list_access(aid)} == grants
        assert fetch(creators_url)[0] == 200
        code, _ = fetch(f"{srv.url}/storage/assets/{aid}/content")  # no signature
        assert code == 403
        return
    if action == "get":
        assert got.asset_id == aid and got.download_urls is None
    elif action in ("get_presigned", "download_url"):
        assert set(got.download_urls) == {"content"}
        if action == "download_url":
            code, data = fetch(got.download_urls["content"])
            assert code == 200 and data.decode() == CONTENT
            assert hashlib.sha256(data).hexdigest() == got.components[0].sha256
    elif action == "deprecate":
        assert after.deprecated is not None and after.deprecated.reason == "superseded"
    elif action == "invalidate":
        assert after.invalidated is not None and after.state == "ready"
    elif action == "delete":
        assert got is None
        assert isinstance(after, ChronicleError) and after.status == 404
        assert fetch(creators_url)[0] == 404  # the bytes are gone: an old URL finds nothing
    elif action in ("grant", "revoke", "share"):
        pairs = {(g.principal_id, g.action) for g in alice.assets.list_access(aid)}
        assert pairs == {"grant": grants | {("user_zed", "read")},
                         "revoke": grants - {("user_pre", "read")},
                         "share": grants | {("team_42", "read")}}[action]
        assert [(g.principal_id, g.action) for g in got] == sorted(pairs)
    elif action == "list_access":
        assert {(g.principal_id, g.action) for g in got} == grants
    elif action == "set_visibility":
        assert after.visibility == "public"
    elif action == "move":
        assert after.organization_id == move_to and after.visibility == "organization"
        assert after.created_by == "user_alice"


# ---- principals × actions × visibility (no explicit grants) ------------------------------


def rights_by_visibility(who: str, visibility: str) -> set[str]:
    if who == "creator":
        return set(IMPLIES["administer"])
    if visibility == "public":
        return {"read"}
    if visibility in ("organization", "team") and who == "org_member":
        return {"read"}
    return set()


@pytest.mark.parametrize("visibility", ["private", "organization", "team", "public"])
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("who", list(WHO))
def test_visibility_matrix(srv: Standalone, who: str, action: str, visibility: str) -> None:
    asset = make_asset(srv, visibility, org="org_1")
    check_cell(srv, WHO[who], rights_by_visibility(who, visibility), action, asset,
               move_to="org_2")


# ---- grantees × granted action × actions (a private asset in no organization) -------------

GRANTEES = {  # who is granted → who calls
    "user": ("user_bob", "other"),
    "team": ("team_9", "team_member"),
    "organization": ("org_1", "org_member"),
    "everyone": ("everyone", "other"),
}


@pytest.mark.parametrize("granted", ["read", "write", "delete", "administer"])
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("grantee", list(GRANTEES))
def test_grant_matrix(srv: Standalone, grantee: str, action: str, granted: str) -> None:
    principal_id, caller = GRANTEES[grantee]
    asset = make_asset(srv, "private", org=None)
    srv.client("user_alice").assets.grant_access(asset.asset_id, principal_id=principal_id,
                                                 action=granted)
    # move target org_1: the org member may move what it administers; the others are not
    # members of it, so administer alone is not enough for them
    check_cell(srv, WHO[caller], set(IMPLIES[granted]), action, asset, move_to="org_1")


# ---- a few facts the matrix does not show -----------------------------------------------


def test_grants_and_revokes_are_idempotent(srv: Standalone) -> None:
    alice = srv.client("user_alice")
    aid = make_asset(srv, "private", None).asset_id
    for _ in range(2):
        grants = alice.assets.grant_access(aid, principal_id="user_bob", action="write")
        assert [(g.principal_id, g.action) for g in grants] == [("user_bob", "write")]
    for _ in range(2):
        assert alice.assets.revoke_access(aid, principal_id="user_bob", action="write") == []
    for _ in range(2):
        grants = alice.assets.share_with_scope(aid, scope_id="team_9")
        assert [(g.principal_id, g.action) for g in grants] == [("team_9", "read")]


def test_revoking_read_takes_the_urls_away(srv: Standalone) -> None:
    alice, bob = srv.client("user_alice"), srv.client("user_bob")
    aid = make_asset(srv, "private", None).asset_id
    alice.assets.grant_access(aid, principal_id="user_bob", action="read")
    assert set(bob.assets.get(aid, include_presigned=True).download_urls or {}) == {"content"}
    alice.assets.revoke_access(aid, principal_id="user_bob", action="read")
    status, err = outcome(lambda: bob.assets.get(aid, include_presigned=True))
    assert status == 404 and isinstance(err, ChronicleError) and err.code == "not_found"


def test_listing_shows_only_what_the_caller_may_read(srv: Standalone) -> None:
    private = make_asset(srv, "private", "org_1").asset_id
    org = make_asset(srv, "organization", "org_1").asset_id
    public = make_asset(srv, "public", "org_1").asset_id
    seen = {p: {a.asset_id for a in srv.client(p).assets.list(asset_type="dataset")}
            for p in ("user_alice", "user_bob", "user_olga")}
    assert {private, org, public} <= seen["user_alice"]
    assert public in seen["user_bob"] and not {private, org} & seen["user_bob"]
    assert {org, public} <= seen["user_olga"] and private not in seen["user_olga"]


def test_a_deleted_assets_old_url_finds_nothing(srv: Standalone) -> None:
    alice = srv.client("user_alice")
    aid = make_asset(srv, "private", None).asset_id
    url = (alice.assets.get(aid, include_presigned=True).download_urls or {})["content"]
    assert fetch(url)[0] == 200
    alice.assets.delete(aid)
    assert fetch(url)[0] == 404


def test_delete_is_refused_while_linked(srv: Standalone) -> None:
    alice = srv.client("user_alice")
    aid = make_asset(srv, "private", None).asset_id
    exp = alice.experiments.create("sweep")
    alice.experiments.add_variation(exp.experiment_id, "v1", inputs=[aid])
    status, err = outcome(lambda: alice.assets.delete(aid))
    assert status == 409 and isinstance(err, ChronicleError) and err.code == "asset_linked"
    assert alice.assets.get(aid).asset_id == aid


def test_me_scopes_per_principal(srv: Standalone) -> None:
    me = srv.client("user_tina").me.scopes()
    assert me.principal_id == "user_tina"
    assert [(s.id, s.kind) for s in me.scopes] == [("team_9", "team")]
    status, err = outcome(lambda: srv.client(None).me.scopes())
    assert status == 401


def test_presigned_urls_are_bound_to_their_object(srv: Standalone, tmp_path: Path) -> None:
    """A reader's URL for one asset cannot be bent to another asset's bytes."""
    alice, bob = srv.client("user_alice"), srv.client("user_bob")
    mine = make_asset(srv, "public", None).asset_id
    secret = make_asset(srv, "private", None).asset_id
    url = (bob.assets.get(mine, include_presigned=True).download_urls or {})["content"]
    assert fetch(url)[0] == 200
    bent = url.replace(mine, secret)
    code, body = fetch(bent)
    assert code == 403 and b"SignatureDoesNotMatch" in body
    assert alice.assets.get(secret).asset_id == secret
