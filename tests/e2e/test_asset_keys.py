"""Assets built by several uploaders (API 1.1 ``asset_keys``), on both storages: a register
with a ``key`` creates the asset, a later one for the same run, type and key joins it while
it is pending (200, the same asset id, URLs for its own components only);
``POST /v1/assets/{id}/components`` adds components; a name declared again the same way is
harmless, with another size or digest a 409 ``conflict``; finalize covers every declared
component; a ready asset takes no more (409 ``asset_not_pending``); uploaders racing on one
key build one asset; a caller without write access adds nothing; databases of schemas 1 to
4 are migrated (their assets indexed for search, inline texts read from storage)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.server.db import SCHEMA, SCHEMA_VERSION
from tests.support.helpers_server import Api, Running, running_server, sha256
from tests.support.helpers_standalone import write_tokens


def decl(name: str, data: bytes, digest: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "size": len(data)}
    if digest:
        d["sha256"] = sha256(data)
    return d


async def new_run(s: Running) -> str:
    r = await s.api.post("/v1/runs", {"name": "keys"})
    assert r.status == 201, r.body
    return str(r.body["run_id"])


async def keyed(api: Api, run: str, key: str, comps: list[Any], status: int = 201,
                **extra: Any) -> dict[str, Any]:
    r = await api.post("/v1/assets", {"asset_type": "checkpoint", "output_of": run,
                                      "key": key, "components": comps, **extra})
    assert r.status == status, r.body
    return dict(r.body)


async def test_uploaders_join_one_asset_by_key(tmp_path: Path, storage_backend: str) -> None:
    files = {f"rank{i}/shard.bin": os.urandom(50_000 + i) for i in range(3)}
    files["meta.json"] = b'{"step": 100}'
    async with running_server(tmp_path, storage=storage_backend) as s:
        run = await new_run(s)
        first = await keyed(s.api, run, "step-100", [decl("rank0/shard.bin",
                                                          files["rank0/shard.bin"])])
        aid = first["asset_id"]
        second = await keyed(s.api, run, "step-100",
                             [decl("rank1/shard.bin", files["rank1/shard.bin"]),
                              decl("rank0/shard.bin", files["rank0/shard.bin"])], status=200)
        assert second["asset_id"] == aid
        assert set(second["upload_urls"]) == {"rank1/shard.bin", "rank0/shard.bin"}
        third = await s.api.post(f"/v1/assets/{aid}/components", {"components": [
            decl("rank2/shard.bin", files["rank2/shard.bin"]),
            decl("meta.json", files["meta.json"], digest=False)]})
        assert third.status == 200 and set(third.body["upload_urls"]) == {
            "rank2/shard.bin", "meta.json"}
        other = await keyed(s.api, run, "step-200", [decl("x", b"x")])
        assert other["asset_id"] != aid  # another key, another asset

        got = (await s.api.get(f"/v1/assets/{aid}")).body
        assert got["key"] == "step-100" and got["state"] == "pending"
        assert [c["name"] for c in got["components"]] == [
            "rank0/shard.bin", "rank1/shard.bin", "rank2/shard.bin", "meta.json"]

        plans = {**first["upload_urls"], **second["upload_urls"], **third.body["upload_urls"]}
        headers = {**first.get("upload_headers", {}), **second.get("upload_headers", {}),
                   **third.body.get("upload_headers", {})}
        body = await s.api.upload({"upload_urls": plans, "upload_headers": headers},
                                  {n: d for n, d in files.items() if n != "rank2/shard.bin"})
        r = await s.api.finalize(aid, body)
        assert r.status == 409 and r.body["error"]["code"] == "components_missing"
        body["components"].update((await s.api.upload(
            {"upload_urls": plans, "upload_headers": headers},
            {"rank2/shard.bin": files["rank2/shard.bin"]}))["components"])
        r = await s.api.finalize(aid, body)
        assert r.status == 200 and r.body["state"] == "ready", r.body
        assert {c["name"]: c["sha256"] for c in r.body["components"]} == {
            n: sha256(d) for n, d in files.items()}

        late = await keyed(s.api, run, "step-100", [decl("rank3/shard.bin", b"3")], status=409)
        assert late["error"]["code"] == "asset_not_pending"
        r = await s.api.post(f"/v1/assets/{aid}/components", {"components": [decl("y", b"y")]})
        assert r.status == 409 and r.body["error"]["code"] == "asset_not_pending"


async def test_a_name_declared_otherwise_is_a_conflict(tmp_path: Path,
                                                       storage_backend: str) -> None:
    a, b = os.urandom(1000), os.urandom(1000)
    async with running_server(tmp_path, storage=storage_backend) as s:
        run = await new_run(s)
        aid = (await keyed(s.api, run, "k", [decl("a.bin", a)]))["asset_id"]
        for other in ({"name": "a.bin", "size": 999}, decl("a.bin", b)):
            r = await s.api.post(f"/v1/assets/{aid}/components", {"components": [other]})
            assert r.status == 409 and r.body["error"]["code"] == "conflict", r.body
            assert "a.bin" in r.body["error"]["message"]
        r = await s.api.post(f"/v1/assets/{aid}/components", {"components": ["a.bin/inner"]})
        assert r.status == 400 and "directory" in r.body["error"]["message"]
        again = await s.api.post(f"/v1/assets/{aid}/components", {"components": [decl("a.bin", a)]})
        assert again.status == 200 and list(again.body["upload_urls"]) == ["a.bin"]
        got = (await s.api.get(f"/v1/assets/{aid}")).body
        assert [c["name"] for c in got["components"]] == ["a.bin"]  # nothing was added


@pytest.mark.parametrize("body, why", [
    ({"key": "k"}, "key needs output_of"),
    ({"key": "", "output_of": "RUN"}, "printable"),
    ({"key": "a\nb", "output_of": "RUN"}, "printable"),
    ({"key": "x" * 257, "output_of": "RUN"}, "printable"),
])
async def test_a_bad_key_is_refused_by_name(tmp_path: Path, body: dict[str, Any],
                                            why: str) -> None:
    async with running_server(tmp_path) as s:
        run = await new_run(s)
        body = {k: run if v == "RUN" else v for k, v in body.items()}
        r = await s.api.post("/v1/assets", {"asset_type": "t", "components": ["a"], **body})
        assert r.status == 400 and why in r.body["error"]["message"], r.body


async def test_uploaders_racing_on_one_key_build_one_asset(tmp_path: Path,
                                                           storage_backend: str) -> None:
    async with running_server(tmp_path, storage=storage_backend) as s:
        run = await new_run(s)
        answers = await asyncio.gather(*(
            s.api.post("/v1/assets", {"asset_type": "checkpoint", "output_of": run, "key": "k",
                                      "components": [decl(f"rank{i}.bin", b"%d" % i)]})
            for i in range(8)))
        assert sorted(r.status for r in answers) == [200] * 7 + [201]
        ids = {r.body["asset_id"] for r in answers}
        assert len(ids) == 1
        got = (await s.api.get(f"/v1/assets/{ids.pop()}")).body
        assert sorted(c["name"] for c in got["components"]) == [f"rank{i}.bin" for i in range(8)]


async def test_without_write_access_nothing_is_added(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.json", {"user_alice": [], "user_bob": []})
    async with running_server(tmp_path / "s", tokens_file=tmp_path / "tokens.json") as s:
        alice = Api(s.api.session, s.api.base, tokens["user_alice"])
        bob = Api(s.api.session, s.api.base, tokens["user_bob"])
        r = await alice.post("/v1/runs", {"name": "keys"})
        run = r.body["run_id"]
        aid = (await keyed(alice, run, "k", [decl("a", b"a")]))["asset_id"]
        r = await bob.post(f"/v1/assets/{aid}/components", {"components": [decl("b", b"b")]})
        assert r.status == 404, r.body  # bob cannot even read it
        r = await bob.post("/v1/assets", {"asset_type": "checkpoint", "output_of": run,
                                          "key": "k", "components": ["b"]})
        assert r.status in (403, 404), r.body  # not his run to record outputs of
        r = await alice.post(f"/v1/assets/{aid}/access", {"principal_id": "user_bob",
                                                           "action": "read"})
        assert r.status == 200, r.body
        r = await bob.post(f"/v1/assets/{aid}/components", {"components": [decl("b", b"b")]})
        assert r.status == 403 and "write" in r.body["error"]["message"], r.body
        got = (await alice.get(f"/v1/assets/{aid}")).body
        assert [c["name"] for c in got["components"]] == ["a"]


async def test_a_server_without_the_feature_says_so(tmp_path: Path) -> None:
    async with running_server(tmp_path, asset_keys=False) as s:
        assert "asset_keys" not in (await s.api.get("/v1/health")).body["features"]
        run = await new_run(s)
        r = await s.api.post("/v1/assets", {"asset_type": "t", "output_of": run, "key": "k",
                                            "components": ["a"]})
        assert r.status == 400 and "asset_keys" in r.body["error"]["message"], r.body
        aid = (await s.api.register(["a"]))["asset_id"]
        r = await s.api.post(f"/v1/assets/{aid}/components", {"components": ["b"]})
        assert r.status == 404 and "asset_keys" in r.body["error"]["message"], r.body


@pytest.mark.parametrize("version", [1, 3, 4])  # each step of 2 is in 1's
async def test_an_older_database_is_migrated(tmp_path: Path, version: int,
                                             storage_backend: str) -> None:
    async with running_server(tmp_path, storage=storage_backend) as s:
        run = await new_run(s)
        plan = await s.api.register([decl("a", b"abc")], output_of=run)
        aid = plan["asset_id"]
        notes = []
        for content in ("# Notes\n\nthe warmup helped", {"verdict": "overfitting", "n": 3}):
            r = await s.api.post("/v1/assets/inline", {"asset_type": "report",
                                                       "content": content})
            notes.append(r.body["asset_id"])
    db = next(tmp_path.rglob("server.db"))
    with sqlite3.connect(db) as conn:  # back to the older schema, as that server left it
        conn.execute("DROP INDEX assets_pending")
        conn.execute("ALTER TABLE assets DROP COLUMN active_at")
        if version < 4:
            conn.execute("DROP TABLE asset_search")
            conn.execute("DROP TABLE search_docs")
        if version < 3:
            conn.execute("DROP INDEX assets_by_key")
            conn.execute("ALTER TABLE assets DROP COLUMN asset_key")
        if version == 1:
            conn.execute("ALTER TABLE components DROP COLUMN bound_sha256")
        conn.execute(f"PRAGMA user_version={version}")
    assert "asset_key" in SCHEMA and SCHEMA_VERSION == 5
    async with running_server(tmp_path, storage=storage_backend) as s:
        got = (await s.api.get(f"/v1/assets/{aid}")).body
        assert got["state"] == "pending" and "key" not in got
        found = await s.api.get("/v1/assets/search", params={"q": "checkpoint"})
        assert [a["asset_id"] for a in found.body["assets"]] == [aid]  # indexed when migrated
        for word, note in (("warmup", notes[0]), ("overfitting", notes[1])):
            found = await s.api.get("/v1/assets/search", params={"q": word})
            assert [a["asset_id"] for a in found.body["assets"]] == [note]  # read at start
        again = await keyed(s.api, run, "k", [decl("b", b"b")])
        assert (await keyed(s.api, run, "k", [decl("c", b"c")], status=200))["asset_id"] == \
            again["asset_id"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
        assert conn.execute("SELECT count(*) FROM search_docs").fetchone()[0] == 4
