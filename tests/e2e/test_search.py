"""Search in the local server (API 1.1 ``search``, SQLite FTS5): asset types, component names,
validity reasons and the text of inline assets, best match first, a page at a time; only
what the caller may read, decided from the rows as they are at each query.

Three principals from a tokens file: the owner (member of org_a and team_t), a teammate
(org_a, team_t) and an outsider (no scope). Every way access changes is walked through: the
outsider never gets a title, a count or a snippet of an asset it cannot read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers_server import Api, running_server
from tests.support.helpers_standalone import write_tokens

REPORT = """# Takeaways from sweep 12

The learning-rate warmup fixed the divergence we saw at step 40k.
Next: try a cosine schedule.
"""


@dataclass
class People:
    owner: Api
    mate: Api
    out: Api


@pytest.fixture
async def people(tmp_path: Path) -> AsyncIterator[People]:
    tokens = write_tokens(tmp_path / "tokens.json", {
        "user_owner": ["org_a", "team_t"], "user_mate": ["org_a", "team_t"], "user_out": []})
    async with running_server(tmp_path / "s", tokens_file=tmp_path / "tokens.json") as s:
        def api(p: str) -> Api:
            return Api(s.api.session, s.api.base, tokens[p])
        yield People(api("user_owner"), api("user_mate"), api("user_out"))


async def find(api: Api, q: str, **params: str) -> list[dict[str, Any]]:
    r = await api.get("/v1/assets/search", params={"q": q, **params})
    assert r.status == 200, r.body
    return list(r.body["assets"])


async def ids(api: Api, q: str, **params: str) -> list[str]:
    return [a["asset_id"] for a in await find(api, q, **params)]


async def inline(api: Api, content: Any, asset_type: str = "report", **extra: Any) -> str:
    r = await api.post("/v1/assets/inline", {"asset_type": asset_type, "content": content,
                                             **extra})
    assert r.status == 201, r.body
    return str(r.body["asset_id"])


async def test_a_markdown_report_is_found_by_a_word_of_its_body(people: People) -> None:
    aid = await inline(people.owner, REPORT, content_type="text/markdown")
    hits = await find(people.owner, "divergence")
    assert [h["asset_id"] for h in hits] == [aid]
    assert "[divergence]" in hits[0]["snippet"]
    assert hits[0]["text"] == "# Takeaways from sweep 12"
    assert await ids(people.owner, "cosine sched") == [aid]  # the last word as a prefix
    assert await ids(people.owner, "divergence transformer") == []  # every word is needed
    for q in ('"', "AND", "names:report", "NEAR(a b)", "*", "x OR"):  # FTS5 syntax is text
        assert await ids(people.owner, q) == [], q


async def test_types_names_reasons_and_json_values_are_found(people: People) -> None:
    plan = await people.owner.register(["model.safetensors", "tokenizer.json"],
                                       asset_type="checkpoint")
    metrics = await inline(people.owner, {"loss": 0.125, "note": "plateau after epoch 3",
                                          "tags": ["ablation", "baseline"]}, "metrics")
    assert await ids(people.owner, "safetensors") == [plan["asset_id"]]
    assert await ids(people.owner, "checkpoint") == [plan["asset_id"]]
    assert await ids(people.owner, "plateau") == [metrics]
    assert await ids(people.owner, "ablation") == [metrics]
    assert await ids(people.owner, "0.125") == [metrics]
    assert await ids(people.owner, "loss") == []  # keys are not text
    r = await people.owner.post(f"/v1/assets/{metrics}/invalidate",
                                {"reason": "mislabeled validation split"})
    assert r.status == 200
    hits = await find(people.owner, "mislabeled")
    assert [h["asset_id"] for h in hits] == [metrics]
    assert hits[0]["invalidated"]["reason"] == "mislabeled validation split"  # says so
    r = await people.owner.post(f"/v1/assets/{metrics}/deprecate", {"reason": "superseded"})
    assert (await find(people.owner, "superseded"))[0]["deprecated"]["reason"] == "superseded"


async def test_only_what_the_caller_may_read_every_way_access_changes(people: People) -> None:
    owner, mate, out = people.owner, people.mate, people.out
    aid = await inline(owner, "secret divergence analysis")
    other = await inline(owner, "public divergence note", visibility="public")

    async def who_finds() -> dict[str, bool]:
        return {name: aid in await ids(api, "divergence") for name, api in
                (("owner", owner), ("mate", mate), ("out", out))}

    async def outsider_learns_nothing() -> None:
        r = await out.get("/v1/assets/search", params={"q": "secret", "limit": "1"})
        assert r.body == {"assets": [], "next_cursor": None}  # not even "there is more"
        r = await out.get("/v1/assets/search", params={"q": "divergence", "limit": "1"})
        assert [h["asset_id"] for h in r.body["assets"]] == [other]
        assert r.body["next_cursor"] is None and aid not in json.dumps(r.body)

    assert await who_finds() == {"owner": True, "mate": False, "out": False}
    await outsider_learns_nothing()
    # a grant to the teammate, then revoked
    r = await owner.post(f"/v1/assets/{aid}/access", {"principal_id": "user_mate",
                                                       "action": "read"})
    assert r.status == 200
    assert await who_finds() == {"owner": True, "mate": True, "out": False}
    r = await owner.call("DELETE", f"/v1/assets/{aid}/access",
                         params={"principal_id": "user_mate", "action": "read"})
    assert r.status == 200
    assert await who_finds() == {"owner": True, "mate": False, "out": False}
    # shared with the team (a grant to a scope), then revoked
    assert (await owner.post(f"/v1/assets/{aid}/share", {"scope_id": "team_t"})).status == 200
    assert await who_finds() == {"owner": True, "mate": True, "out": False}
    r = await owner.call("DELETE", f"/v1/assets/{aid}/access",
                         params={"principal_id": "team_t", "action": "read"})
    assert r.status == 200
    assert await who_finds() == {"owner": True, "mate": False, "out": False}
    # moved into the organization and made visible to it, then private again
    r = await owner.post(f"/v1/assets/{aid}/move", {"organization_id": "org_a",
                                                     "visibility": "organization"})
    assert r.status == 200, r.body
    assert await who_finds() == {"owner": True, "mate": True, "out": False}
    await outsider_learns_nothing()
    r = await owner.call("PUT", f"/v1/assets/{aid}/visibility", {"visibility": "private"})
    assert r.status == 200
    assert await who_finds() == {"owner": True, "mate": False, "out": False}
    # public, then a grant to everyone removed with it
    r = await owner.call("PUT", f"/v1/assets/{aid}/visibility", {"visibility": "public"})
    assert await who_finds() == {"owner": True, "mate": True, "out": True}
    r = await owner.call("PUT", f"/v1/assets/{aid}/visibility", {"visibility": "private"})
    await outsider_learns_nothing()
    r = await owner.post(f"/v1/assets/{aid}/access", {"principal_id": "everyone",
                                                       "action": "read"})
    assert await who_finds() == {"owner": True, "mate": True, "out": True}
    r = await owner.call("DELETE", f"/v1/assets/{aid}/access",
                         params={"principal_id": "everyone", "action": "read"})
    assert await who_finds() == {"owner": True, "mate": False, "out": False}
    await outsider_learns_nothing()


async def test_a_deleted_asset_is_never_found_again(people: People) -> None:
    aid = await inline(people.owner, "ephemeral findings", visibility="public")
    assert await ids(people.mate, "ephemeral") == [aid]
    assert (await people.owner.call("DELETE", f"/v1/assets/{aid}")).status == 204
    for api in (people.owner, people.mate, people.out):
        assert await ids(api, "ephemeral") == []


async def test_pages_and_filters(people: People) -> None:
    made = [await inline(people.owner, f"sweep result {i}", "report") for i in range(7)]
    other = await inline(people.owner, "sweep config", "config")
    pages, cursor = [], None
    while True:
        params = {"q": "sweep", "limit": "3", **({"cursor": cursor} if cursor else {})}
        r = await people.owner.get("/v1/assets/search", params=params)
        assert r.status == 200, r.body
        pages.append([a["asset_id"] for a in r.body["assets"]])
        cursor = r.body["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 2]
    assert sorted(sum(pages, [])) == sorted([*made, other])
    assert sorted(await ids(people.owner, "sweep", asset_type="report")) == sorted(made)
    assert await ids(people.owner, "sweep", state="pending") == []
    assert await ids(people.owner, "\x00sweep\x01") == await ids(people.owner, "sweep")
    for params, why in (({"q": ""}, "q is required"), ({"q": "\x00\x07"}, "q is required"),
                        ({"q": "x", "limit": "0"}, "limit"),
                        ({"q": "x", "cursor": "-1"}, "cursor"),
                        ({"q": "x", "state": "gone"}, "state"), ({"q": "x" * 1001}, "1000")):
        r = await people.owner.get("/v1/assets/search", params=params)
        assert r.status == 400 and why in r.body["error"]["message"], (params, r.body)


async def test_a_server_without_search_says_so(tmp_path: Path) -> None:
    async with running_server(tmp_path, search=False) as s:
        assert "search" not in (await s.api.get("/v1/health")).body["features"]
        r = await s.api.get("/v1/assets/search", params={"q": "x"})
        assert r.status == 404 and "search" in r.body["error"]["message"]
