"""The local Chronicle server over real HTTP on 127.0.0.1, with real SQLite and storage.

Tests marked with the ``backend`` fixture run against every storage backend (the disk store,
and S3 through SeaweedFS when the ``weed`` binary is available); the others exercise the disk
store or the JSON API alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from agent.server import db as server_db
from agent.server.bodies import name_problem
from agent.server.storage import MiB, part_count, plan_part_size
from tests.support.helpers_server import Running, add_principal, running_server, sha256

EXPIRED = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
EXPIRED_CORE = b"<Code>AccessDenied</Code><Message>Request has expired</Message>"
SMALL_PARTS = {"multipart_threshold_bytes": 5 * MiB, "part_size_bytes": 5 * MiB}

MakeServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[MakeServer]:
    """Start servers (disk store) with the given ``[server]`` settings; stopped after."""
    async with AsyncExitStack() as stack:
        n = 0

        async def make(**server: Any) -> Running:
            nonlocal n
            n += 1
            return await stack.enter_async_context(running_server(tmp_path / f"state{n}", **server))

        yield make


@pytest.fixture
async def srv(make_server: MakeServer) -> Running:
    return await make_server(**SMALL_PARTS)


@pytest.fixture
async def any_srv(make_server: MakeServer, storage_backend: str) -> Running:
    """A server on each storage backend (see ``storage_backend`` in conftest)."""
    return await make_server(storage=storage_backend, **SMALL_PARTS)


def err(r: Any) -> tuple[int, str | None]:
    return r.status, r.code


# ---- health, auth, malformed input ----------------------------------------------------------


async def test_health_needs_no_token_and_names_the_server(srv: Running) -> None:
    r = await srv.api.as_(None).get("/v1/health")
    assert r.status == 200
    assert r.body["status"] == "ok"
    assert r.body["url"] == srv.server.url
    assert r.body["version"]


async def test_missing_or_unknown_token_is_401_in_the_error_shape(srv: Running) -> None:
    for api in (srv.api.as_(None), srv.api.as_("not-a-token")):
        r = await api.get("/v1/me/scopes")
        assert r.status == 401
        assert r.body["error"]["code"] == "unauthorized"
        assert r.body["error"]["message"]
        r = await api.post("/v1/assets", {"asset_type": "x", "components": ["a"]})
        assert r.status == 401


async def test_me_scopes_come_from_the_tokens_file(srv: Running) -> None:
    r = await srv.api.get("/v1/me/scopes")
    assert r.status == 200
    assert r.body == {"principal_id": f"user_{_login()}", "scopes": []}
    scopes = [{"id": "team_9", "kind": "team", "name": "Nine"}]
    token = add_principal(srv.tokens_file, "user_alice", scopes)
    r = await srv.api.as_(token).get("/v1/me/scopes")
    assert r.body == {"principal_id": "user_alice", "scopes": scopes}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"components": ["a"]}', "asset_type"),
        (b'{"asset_type": "x", "components": "a"}', "components"),
        (b'{"asset_type": "x", "components": []}', "components"),
        (b'{"asset_type": "x", "components": [{"name": "a", "size": -1}]}', "size"),
        (b'{"asset_type": "x", "components": [{"name": "a", "size": "1"}]}', "size"),
        (b'{"asset_type": "x", "components": ["a", "a"]}', "twice"),
        (b'{"asset_type": "x", "components": ["a"], "visibility": "secret"}', "visibility"),
        (b'{"asset_type": 7, "components": ["a"]}', "asset_type"),
        (b'{"asset_type": "x", "components": ["\\ud800"]}', "surrogate"),
        (b'{"asset_type": "x", "components": ["a"], "n": NaN}', "NaN"),
    ],
)
async def test_malformed_register_bodies_are_400_naming_the_problem(
    srv: Running, raw: bytes, needle: str
) -> None:
    r = await srv.api.call("POST", "/v1/assets", raw=raw)
    assert err(r) == (400, "invalid_request"), r.body
    assert needle in r.body["error"]["message"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "a/../b", "..", "a//b", "a/", "a\x00b", "", "./a"])
async def test_bad_component_names_are_400(srv: Running, bad: str) -> None:
    r = await srv.api.post("/v1/assets", {"asset_type": "x", "components": [bad]})
    assert err(r) == (400, "invalid_request"), r.body
    r = await srv.api.post("/v1/assets", {"asset_type": "x", "components": [{"name": bad}]})
    assert err(r) == (400, "invalid_request"), r.body


def test_component_name_rules() -> None:
    for good in ["model.safetensors", "shard/0001.bin", "a b/c-d_e.f", "ünïcode/名前", ".hidden"]:
        assert name_problem(good) is None, good
    for bad in ["/abs", "x/../y", "x//y", "x/", "nul\x00", "", "./x", "x" * 901]:
        assert name_problem(bad) is not None, bad


async def test_bad_finalize_bodies_are_400_not_500(srv: Running) -> None:
    plan = await srv.api.register(["a"])
    path = f"/v1/assets/{plan['asset_id']}/finalize"
    for body in (
        {"components": ["a"]},
        {"components": {"a": 5}},
        {"components": {"a": {"sha256": "xyz"}}},
        {"components": {"a": {"size": 1.5}}},
        {"components": {"a": {"parts": [{"part_number": 0, "etag": "x"}]}}},
        {
            "components": {
                "a": {"parts": [{"part_number": 2, "etag": "x"}, {"part_number": 1, "etag": "y"}]}
            }
        },
        {"components": {"nope": {"size": 1}}},
    ):
        r = await srv.api.post(path, body)
        assert err(r) == (400, "invalid_request"), (body, r.body)


async def test_unknown_endpoint_and_method_use_the_error_shape(srv: Running) -> None:
    r = await srv.api.get("/v1/nothing-here")
    assert r.status == 404 and r.code == "not_found"
    r = await srv.api.call("PATCH", "/v1/runs")
    assert r.status == 405 and r.body["error"]["code"]


# ---- the presigned flow ----------------------------------------------------------------------


async def test_register_put_finalize_becomes_ready_and_downloads(any_srv: Running) -> None:
    api = any_srv.api
    files = {"model.safetensors": os.urandom(300_000), "meta/info.json": b'{"step": 1}'}
    plan = await api.register(list(files))
    assert plan["asset_id"].startswith("ast_")
    assert set(plan["upload_urls"]) == set(files) and plan["multipart"] == {}
    assert plan["expires_at"].endswith("Z")
    body = await api.upload(plan, files)
    r = await api.finalize(plan["asset_id"], body)
    assert r.status == 200, r.body
    asset = r.body
    assert asset["state"] == "ready" and asset["finalized_at"]
    assert asset["created_by"] == f"user_{_login()}" and asset["visibility"] == "private"
    by_name = {c["name"]: c for c in asset["components"]}
    for name, data in files.items():
        assert by_name[name]["size"] == len(data)
        assert by_name[name]["sha256"] == sha256(data)
        assert by_name[name]["uploaded"] is True
    r = await api.get(f"/v1/assets/{plan['asset_id']}", params={"include_presigned": "true"})
    assert r.status == 200 and set(r.body["download_urls"]) == set(files)
    for name, data in files.items():
        status, got, _ = await api.get_url(r.body["download_urls"][name])
        assert status == 200 and got == data


async def test_finalize_with_empty_body_checks_what_storage_holds(srv: Running) -> None:
    plan = await srv.api.register(["a.bin"])
    await srv.api.upload(plan, {"a.bin": b"abc"})
    r = await srv.api.finalize(plan["asset_id"], {})
    assert r.status == 200
    assert r.body["components"][0]["sha256"] == sha256(b"abc")
    assert r.body["components"][0]["size"] == 3


async def test_multipart_plan_part_put_and_assemble(any_srv: Running) -> None:
    api = any_srv.api
    data = os.urandom(12 * MiB + 123)
    plan = await api.register([{"name": "big.bin", "size": len(data)}, "small.txt"])
    assert list(plan["upload_urls"]) == ["small.txt"]
    mp = plan["multipart"]["big.bin"]
    assert mp["part_size"] == 5 * MiB
    assert [p["part_number"] for p in mp["parts"]] == [1, 2, 3]
    body = await api.upload(plan, {"big.bin": data, "small.txt": b"hi"})
    etags = [p["etag"] for p in body["components"]["big.bin"]["parts"]]
    assert all(e.startswith('"') and e.endswith('"') for e in etags)

    r = await api.get(f"/v1/assets/{plan['asset_id']}/uploads")
    assert r.status == 200
    big = r.body["components"]["big.bin"]
    assert big["uploaded"] is False
    assert [(p["part_number"], p["etag"], p["size"]) for p in big["parts"]] == [
        (1, etags[0], 5 * MiB),
        (2, etags[1], 5 * MiB),
        (3, etags[2], 2 * MiB + 123),
    ]
    assert r.body["components"]["small.txt"]["uploaded"] is True

    r = await api.finalize(plan["asset_id"], body)
    assert r.status == 200, r.body
    comp = {c["name"]: c for c in r.body["components"]}["big.bin"]
    assert comp["size"] == len(data) and comp["sha256"] == sha256(data)
    r = await api.get(f"/v1/assets/{plan['asset_id']}", params={"include_presigned": "1"})
    status, got, _ = await api.get_url(r.body["download_urls"]["big.bin"])
    assert status == 200 and sha256(got) == sha256(data)


async def test_multipart_finalize_without_parts_assembles_the_plan(any_srv: Running) -> None:
    data = os.urandom(10 * MiB + 1)
    plan = await any_srv.api.register([{"name": "big", "size": len(data)}])
    await any_srv.api.upload(plan, {"big": data})
    r = await any_srv.api.finalize(plan["asset_id"], {})
    assert r.status == 200, r.body
    assert r.body["components"][0]["size"] == len(data)
    assert r.body["components"][0]["sha256"] == sha256(data)
    listed = await any_srv.api.get(f"/v1/assets/{plan['asset_id']}/uploads")
    assert listed.body["components"]["big"] == {"uploaded": True, "size": len(data), "parts": []}


async def test_multipart_finalize_refuses_a_wrong_etag_and_a_missing_part(any_srv: Running) -> None:
    api = any_srv.api
    data = os.urandom(11 * MiB)
    plan = await api.register([{"name": "big", "size": len(data)}])
    body = await api.upload(plan, {"big": data})
    parts = body["components"]["big"]["parts"]
    wrong = [dict(parts[0], etag='"' + "0" * 32 + '"'), *parts[1:]]
    r = await api.finalize(plan["asset_id"], {"components": {"big": {"parts": wrong}}})
    assert err(r) == (422, "checksum_mismatch"), r.body
    extra = [*parts, {"part_number": 4, "etag": parts[0]["etag"]}]
    r = await api.finalize(plan["asset_id"], {"components": {"big": {"parts": extra}}})
    assert err(r) == (409, "components_missing"), r.body
    r = await api.finalize(plan["asset_id"], body)
    assert r.status == 200, r.body


async def test_multipart_with_a_part_never_sent_is_components_missing(any_srv: Running) -> None:
    api = any_srv.api
    data = os.urandom(11 * MiB)
    plan = await api.register([{"name": "big", "size": len(data)}])
    mp = plan["multipart"]["big"]
    for p in mp["parts"][:2]:  # part 3 never sent
        n = p["part_number"]
        r = await api.put_url(p["url"], data[(n - 1) * mp["part_size"] : n * mp["part_size"]])
        assert r.status == 200
    r = await api.finalize(plan["asset_id"], {})
    assert err(r) == (409, "components_missing"), r.body
    r = await api.finalize(plan["asset_id"], {"components": {"big": {"size": len(data)}}})
    assert err(r) == (409, "components_missing"), r.body


def test_part_size_rule() -> None:
    # max(part_size_bytes, ceil(size / 10000)) rounded up to a whole MiB, never under 5 MiB
    assert plan_part_size(12 * MiB, 5 * MiB) == 5 * MiB
    assert plan_part_size(100 * 1024 * MiB, 32 * MiB) == 32 * MiB
    assert plan_part_size(5 * MiB + 1, 5 * MiB + 1) == 6 * MiB
    tib = 1024**4
    assert plan_part_size(tib, 32 * MiB) == 105 * MiB  # ceil(1 TiB / 10000) = 104.9 MiB
    assert plan_part_size(5 * tib, 32 * MiB) == 525 * MiB
    for size in (tib, 5 * tib, 320 * 1024 * MiB + 1, 10_000 * 32 * MiB + 1):
        ps = plan_part_size(size, 32 * MiB)
        assert ps % MiB == 0 and ps >= 5 * MiB
        assert part_count(size, ps) <= 10_000


async def test_a_huge_declared_size_is_planned_within_10000_parts(srv: Running) -> None:
    size = 1024**4  # 1 TiB
    plan = await srv.api.register([{"name": "huge", "size": size}])
    mp = plan["multipart"]["huge"]
    assert mp["part_size"] == 105 * MiB
    assert len(mp["parts"]) == part_count(size, 105 * MiB) == 9987
    assert mp["parts"][-1]["part_number"] == 9987


async def test_wrong_digest_or_size_is_422(any_srv: Running) -> None:
    api = any_srv.api
    plan = await api.register(["a", "b"])
    body = await api.upload(plan, {"a": b"hello", "b": b"world"})
    bad_sha = json.loads(json.dumps(body))
    bad_sha["components"]["a"]["sha256"] = sha256(b"other")
    r = await api.finalize(plan["asset_id"], bad_sha)
    assert err(r) == (422, "checksum_mismatch"), r.body
    bad_size = json.loads(json.dumps(body))
    bad_size["components"]["b"]["size"] = 6
    r = await api.finalize(plan["asset_id"], bad_size)
    assert err(r) == (422, "checksum_mismatch"), r.body
    r = await api.get(f"/v1/assets/{plan['asset_id']}")
    assert r.body["state"] == "pending"
    r = await api.finalize(plan["asset_id"], body)
    assert r.status == 200 and r.body["state"] == "ready"


async def test_declared_size_at_register_is_checked_at_finalize(srv: Running) -> None:
    plan = await srv.api.register([{"name": "a", "size": 10}])
    await srv.api.put_url(plan["upload_urls"]["a"], b"123")
    r = await srv.api.finalize(plan["asset_id"], {})
    assert err(r) == (422, "checksum_mismatch"), r.body


async def test_missing_component_is_409(any_srv: Running) -> None:
    api = any_srv.api
    plan = await api.register(["a", "b"])
    await api.put_url(plan["upload_urls"]["a"], b"x")
    r = await api.finalize(plan["asset_id"], {"components": {"a": {"size": 1}, "b": {"size": 1}}})
    assert err(r) == (409, "components_missing"), r.body
    assert "'b'" in r.body["error"]["message"]


async def test_finalize_is_idempotent_on_a_ready_asset(srv: Running) -> None:
    plan = await srv.api.register(["a"])
    body = await srv.api.upload(plan, {"a": b"data"})
    first = await srv.api.finalize(plan["asset_id"], body)
    again = await srv.api.finalize(plan["asset_id"], body)
    assert first.status == again.status == 200
    assert first.body == again.body
    body["components"]["a"]["sha256"] = sha256(b"else")
    r = await srv.api.finalize(plan["asset_id"], body)
    assert err(r) == (409, "asset_not_pending")


# ---- presigned URL enforcement ------------------------------------------------------------------


async def test_expired_urls_get_the_s3_error_body(
    make_server: MakeServer, storage_backend: str
) -> None:
    s = await make_server(storage=storage_backend, url_expiry_s=1)
    plan = await s.api.register(["a"])
    # an inline asset is ready without a client PUT: no race with the 1 s expiry
    inline = await s.api.post("/v1/assets/inline", {"asset_type": "x", "content": "abc"})
    got = await s.api.get(
        f"/v1/assets/{inline.body['asset_id']}", params={"include_presigned": "true"}
    )
    await asyncio.sleep(2.5)
    r = await s.api.put_url(plan["upload_urls"]["a"], b"abc")
    assert r.status == 403
    assert EXPIRED_CORE in r.body.encode()
    status, body, headers = await s.api.get_url(got.body["download_urls"]["content"])
    assert status == 403
    assert EXPIRED_CORE in body
    assert headers["Content-Type"].startswith("application/xml")


async def test_disk_store_expired_body_is_exact(make_server: MakeServer) -> None:
    s = await make_server(url_expiry_s=1)
    plan = await s.api.register(["a"])
    await asyncio.sleep(2.2)
    r = await s.api.put_url(plan["upload_urls"]["a"], b"abc")
    assert r.status == 403
    assert r.body.encode() == EXPIRED
    assert r.headers["Content-Type"] == "application/xml"


async def test_tampered_urls_are_signature_mismatches(
    any_srv: Running, storage_backend: str
) -> None:
    plan = await any_srv.api.register(["a", "b"])
    url_a, url_b = plan["upload_urls"]["a"], plan["upload_urls"]["b"]
    key_b = url_b.split("?")[0]
    forged = key_b + "?" + url_a.split("?", 1)[1]  # a's signature on b's object
    r = await any_srv.api.put_url(forged, b"x")
    assert r.status == 403 and "<Code>SignatureDoesNotMatch</Code>" in r.body
    if storage_backend:
        return
    # the disk store also binds the method and the expiry
    r2 = await any_srv.api.put_url(url_a.replace("Expires=", "Expires=1"), b"x")
    assert r2.status == 403 and "<Code>SignatureDoesNotMatch</Code>" in r2.body


async def test_disk_store_get_url_is_bound_to_the_method(srv: Running) -> None:
    plan = await srv.api.register(["a"])
    r = await srv.api.put_url(plan["upload_urls"]["a"], b"abc")
    assert r.status == 200
    status, body, _ = await srv.api.get_url(plan["upload_urls"]["a"])  # a PUT URL used to GET
    assert status == 403 and b"SignatureDoesNotMatch" in body
    no_sig = plan["upload_urls"]["a"].split("?")[0]
    r = await srv.api.put_url(no_sig, b"abc")
    assert r.status == 403 and "AccessDenied" in r.body


async def test_range_get(any_srv: Running) -> None:
    data = os.urandom(100_000)
    plan = await any_srv.api.register(["a"])
    await any_srv.api.upload(plan, {"a": data})
    assert (await any_srv.api.finalize(plan["asset_id"], {})).status == 200
    r = await any_srv.api.get(f"/v1/assets/{plan['asset_id']}", params={"include_presigned": "1"})
    url = r.body["download_urls"]["a"]
    status, got, headers = await any_srv.api.get_url(url, {"Range": "bytes=1000-1999"})
    assert status == 206
    assert got == data[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    status, got, _ = await any_srv.api.get_url(url, {"Range": "bytes=99990-"})
    assert status == 206 and got == data[99990:]


async def test_chunked_put_is_refused(srv: Running) -> None:
    plan = await srv.api.register(["a"])

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"

    async with srv.api.session.put(plan["upload_urls"]["a"], data=body()) as r:
        assert r.status == 501
        assert "<Code>NotImplemented</Code>" in await r.text()
    r2 = await srv.api.finalize(plan["asset_id"], {})
    assert err(r2) == (409, "components_missing")


async def _raw_put(url: str, head_extra: str, body: bytes) -> bytes:
    """Send a PUT by hand (to cut it short or omit Content-Length); whatever came back."""
    u = URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    writer.write(
        f"PUT {u.raw_path_qs} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\n{head_extra}\r\n".encode()
        + body
    )
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(4096), 0.5)
    except TimeoutError:
        return b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_put_without_content_length_is_411(srv: Running) -> None:
    plan = await srv.api.register(["a"])
    answer = await _raw_put(plan["upload_urls"]["a"], "Connection: close\r\n", b"")
    assert answer.startswith(b"HTTP/1.1 411")
    assert b"MissingContentLength" in answer


async def test_a_truncated_put_leaves_no_object(srv: Running) -> None:
    plan = await srv.api.register(["a"])
    answer = await _raw_put(
        plan["upload_urls"]["a"], "Content-Length: 1000000\r\n", os.urandom(300_000)
    )
    assert answer == b""  # the server was still waiting for the rest
    tmp_dir = srv.server.state_dir / "objects" / "tmp"
    for _ in range(50):
        if not any(tmp_dir.iterdir()):
            break
        await asyncio.sleep(0.05)
    assert list(tmp_dir.iterdir()) == []
    r = await srv.api.get(f"/v1/assets/{plan['asset_id']}/uploads")
    assert r.body["components"]["a"]["uploaded"] is False
    r = await srv.api.finalize(plan["asset_id"], {})
    assert err(r) == (409, "components_missing")


async def test_a_large_put_streams_with_little_memory(srv: Running, tmp_path: Path) -> None:
    """256 MiB through the disk store: the server never holds a component in memory."""
    psutil = pytest.importorskip("psutil")
    size = 256 * MiB
    src = tmp_path / "big.bin"
    block = os.urandom(MiB)
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    plan = await srv.api.register(["big.bin"])
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    with open(src, "rb") as body:
        async with srv.api.session.put(
            plan["upload_urls"]["big.bin"],
            data=body,
            headers={"Content-Length": str(size)},
            skip_auto_headers=("Content-Type",),
        ) as r:
            assert r.status == 200
    done.set()
    await sampler
    assert peak - base < 64 * MiB, f"RSS grew by {(peak - base) // MiB} MiB"
    r2 = await srv.api.finalize(plan["asset_id"], {"components": {"big.bin": {"size": size}}})
    assert r2.status == 200
    assert r2.body["components"][0]["sha256"] == sha256(block * (size // MiB))


async def test_a_replaced_object_is_described_by_its_new_bytes(srv: Running) -> None:
    plan = await srv.api.register(["a"])
    await srv.api.put_url(plan["upload_urls"]["a"], b"first")
    await srv.api.put_url(plan["upload_urls"]["a"], b"second!")
    r = await srv.api.finalize(
        plan["asset_id"], {"components": {"a": {"sha256": sha256(b"second!")}}}
    )
    assert r.status == 200, r.body
    assert r.body["components"][0]["size"] == 7


# ---- upload URLs: refresh, re-plan, parts subset ------------------------------------------------


async def test_upload_urls_plans_replans_and_aborts_the_old_plan(any_srv: Running) -> None:
    api = any_srv.api
    plan = await api.register(["big"])
    assert list(plan["upload_urls"]) == ["big"]  # name only: one URL until a size is declared
    aid = plan["asset_id"]
    r = await api.post(
        f"/v1/assets/{aid}/upload-urls", {"components": [{"name": "big", "size": 11 * MiB}]}
    )
    assert r.status == 200, r.body
    mp = r.body["multipart"]["big"]
    assert len(mp["parts"]) == 3 and r.body["upload_urls"] == {}
    first = os.urandom(5 * MiB)
    assert (await api.put_url(mp["parts"][0]["url"], first)).status == 200
    listed = await api.get(f"/v1/assets/{aid}/uploads")
    assert [p["part_number"] for p in listed.body["components"]["big"]["parts"]] == [1]

    # same size again: the same plan, fresh URLs, the part is kept
    r = await api.post(
        f"/v1/assets/{aid}/upload-urls",
        {"components": [{"name": "big", "size": 11 * MiB}], "parts": {"big": [2, 3]}},
    )
    assert [p["part_number"] for p in r.body["multipart"]["big"]["parts"]] == [2, 3]
    listed = await api.get(f"/v1/assets/{aid}/uploads")
    assert len(listed.body["components"]["big"]["parts"]) == 1

    # a new size: re-planned, the old upload (and its part) aborted
    r = await api.post(
        f"/v1/assets/{aid}/upload-urls", {"components": [{"name": "big", "size": 16 * MiB}]}
    )
    assert len(r.body["multipart"]["big"]["parts"]) == 4
    listed = await api.get(f"/v1/assets/{aid}/uploads")
    assert listed.body["components"]["big"]["parts"] == []
    old = await api.put_url(mp["parts"][1]["url"], os.urandom(5 * MiB))
    assert old.status == 404 and "NoSuchUpload" in old.body

    # small again: a single URL
    r = await api.post(
        f"/v1/assets/{aid}/upload-urls", {"components": [{"name": "big", "size": 3}]}
    )
    assert list(r.body["upload_urls"]) == ["big"] and r.body["multipart"] == {}
    await api.put_url(r.body["upload_urls"]["big"], b"abc")
    r = await api.finalize(aid, {"components": {"big": {"size": 3, "sha256": sha256(b"abc")}}})
    assert r.status == 200, r.body


async def test_upload_urls_replans_an_upload_storage_lost(any_srv: Running) -> None:
    api = any_srv.api
    data = os.urandom(11 * MiB)
    plan = await api.register([{"name": "big", "size": len(data)}])
    aid = plan["asset_id"]
    core = any_srv.server._core  # abort the upload behind the server's back
    asset = await core.db.read(server_db.get_asset, aid)
    assert asset is not None
    [comp] = asset.components
    assert comp.upload_id
    await core.storage.abort_multipart(comp.object_key, comp.upload_id)
    r = await api.post(
        f"/v1/assets/{aid}/upload-urls", {"components": [{"name": "big", "size": len(data)}]}
    )
    assert r.status == 200
    body = await api.upload({**plan, **r.body}, {"big": data})
    r = await api.finalize(aid, body)
    assert r.status == 200, r.body


async def test_upload_urls_refuses_unknown_components_and_parts(srv: Running) -> None:
    plan = await srv.api.register([{"name": "big", "size": 11 * MiB}, "small"])
    aid = plan["asset_id"]
    for body in (
        {"components": ["nope"]},
        {"parts": {"big": [4]}},
        {"parts": {"small": [1]}},
        {"parts": {"big": "1"}},
    ):
        r = await srv.api.post(f"/v1/assets/{aid}/upload-urls", body)
        assert err(r) == (400, "invalid_request"), (body, r.body)
    r = await srv.api.post(f"/v1/assets/{aid}/upload-urls", {})
    assert r.status == 200
    assert set(r.body["upload_urls"]) == {"small"} and set(r.body["multipart"]) == {"big"}


# ---- idempotency ------------------------------------------------------------------------------


async def test_idempotency_key_replays_and_creates_nothing_new(srv: Running) -> None:
    api = srv.api
    body = {"asset_type": "checkpoint", "components": ["a", "b"]}
    first = await api.post("/v1/assets", body, headers={"Idempotency-Key": "k-1"})
    again = await api.post("/v1/assets", body, headers={"Idempotency-Key": "k-1"})
    assert first.status == again.status == 201
    assert first.body == again.body
    assert again.headers.get("Idempotent-Replayed") == "true"
    listed = await api.get("/v1/assets", params={"state": "pending"})
    assert [a["asset_id"] for a in listed.body["assets"]] == [first.body["asset_id"]]

    other = await api.post("/v1/assets", body, headers={"Idempotency-Key": "k-2"})
    assert other.body["asset_id"] != first.body["asset_id"]

    r = await api.post(
        "/v1/assets", {**body, "components": ["c"]}, headers={"Idempotency-Key": "k-1"}
    )
    assert err(r) == (409, "conflict")

    inline = {"asset_type": "notes", "content": {"x": 1}}
    a = await api.post("/v1/assets/inline", inline, headers={"Idempotency-Key": "k-3"})
    b = await api.post("/v1/assets/inline", inline, headers={"Idempotency-Key": "k-3"})
    assert a.status == b.status == 201 and a.body == b.body


async def test_idempotency_keys_belong_to_their_principal(srv: Running) -> None:
    bob = srv.api.as_(add_principal(srv.tokens_file, "user_bob"))
    body = {"asset_type": "x", "components": ["a"]}
    mine = await srv.api.post("/v1/assets", body, headers={"Idempotency-Key": "same"})
    his = await bob.post("/v1/assets", body, headers={"Idempotency-Key": "same"})
    assert mine.status == his.status == 201
    assert mine.body["asset_id"] != his.body["asset_id"]


async def test_concurrent_retries_with_one_key_create_one_asset(srv: Running) -> None:
    body = {"asset_type": "x", "components": ["a"]}
    replies = await asyncio.gather(
        *(srv.api.post("/v1/assets", body, headers={"Idempotency-Key": "race"}) for _ in range(8))
    )
    assert {r.status for r in replies} == {201}
    assert len({r.body["asset_id"] for r in replies}) == 1


async def test_an_error_is_not_recorded_under_the_key(srv: Running) -> None:
    plan = await srv.api.register(["a"])
    path = f"/v1/assets/{plan['asset_id']}/finalize"
    r = await srv.api.post(path, {}, headers={"Idempotency-Key": "fin"})
    assert err(r) == (409, "components_missing")
    await srv.api.put_url(plan["upload_urls"]["a"], b"now")
    r = await srv.api.post(path, {}, headers={"Idempotency-Key": "fin"})
    assert r.status == 200 and r.body["state"] == "ready"


# ---- inline ----------------------------------------------------------------------------------


async def test_inline_assets_are_ready_with_their_content_type(any_srv: Running) -> None:
    api = any_srv.api
    r = await api.post(
        "/v1/assets/inline", {"asset_type": "takeaways_report", "content": {"summary": "converged"}}
    )
    assert r.status == 201 and r.body["state"] == "ready"
    assert r.body["content_type"] == "application/json"
    [comp] = r.body["components"]
    assert comp["name"] == "content" and comp["content_type"] == "application/json"
    got = await api.get(f"/v1/assets/{r.body['asset_id']}", params={"include_presigned": "1"})
    _, data, _ = await api.get_url(got.body["download_urls"]["content"])
    assert json.loads(data) == {"summary": "converged"}
    assert comp["sha256"] == sha256(data) and comp["size"] == len(data)

    r = await api.post("/v1/assets/inline", {"asset_type": "notes", "content": "plain words"})
    assert r.body["content_type"] == "text/plain"
    r = await api.post(
        "/v1/assets/inline",
        {"asset_type": "hypothesis_report", "content": "# H1", "content_type": "text/markdown"},
    )
    assert r.body["content_type"] == "text/markdown"
    r = await api.post("/v1/assets/inline", {"asset_type": "x"})
    assert err(r) == (400, "invalid_request")


async def test_inline_past_the_limit_is_413(make_server: MakeServer) -> None:
    s = await make_server(inline_max_bytes=1000)
    r = await s.api.post("/v1/assets/inline", {"asset_type": "x", "content": "y" * 1000})
    assert r.status == 201
    r = await s.api.post("/v1/assets/inline", {"asset_type": "x", "content": "y" * 1001})
    assert r.status == 413 and r.body["error"]["code"] == "payload_too_large"
    listed = await s.api.get("/v1/assets")
    assert len(listed.body["assets"]) == 1


# ---- runs, abandon ------------------------------------------------------------------------------


async def test_runs_are_created_idempotently_and_ending_abandons_pending_assets(
    srv: Running,
) -> None:
    api = srv.api
    r = await api.post("/v1/runs", {"run_id": "run_abc", "name": "sweep"})
    assert r.status == 201 and r.body["run_id"] == "run_abc" and r.body["status"] == "running"
    r = await api.post("/v1/runs", {"run_id": "run_abc"})
    assert r.status == 200 and r.body["name"] == "sweep"
    r = await api.post("/v1/runs", {})
    assert r.status == 201 and r.body["run_id"].startswith("run_")

    pending = await api.register(["a"], output_of="run_abc")
    done = await api.register(["b"], output_of="run_abc")
    await api.upload(done, {"b": b"b"})
    assert (await api.finalize(done["asset_id"], {})).status == 200
    inline = await api.post(
        "/v1/assets/inline", {"asset_type": "r", "content": "x", "output_of": "run_abc"}
    )
    listed = await api.get("/v1/assets", params={"output_of": "run_abc", "state": "pending"})
    assert [a["asset_id"] for a in listed.body["assets"]] == [pending["asset_id"]]

    r = await api.post("/v1/runs/run_abc/end", {"status": "failed"})
    assert r.status == 200 and r.body["status"] == "failed" and r.body["ended_at"]
    assert r.body["abandoned"] == [pending["asset_id"]]
    states = {
        a["asset_id"]: a["state"]
        for a in (await api.get("/v1/assets", params={"output_of": "run_abc"})).body["assets"]
    }
    assert states == {
        pending["asset_id"]: "abandoned",
        done["asset_id"]: "ready",
        inline.body["asset_id"]: "ready",
    }
    r = await api.finalize(pending["asset_id"], {})
    assert err(r) == (409, "asset_not_pending")
    r = await api.post(
        "/v1/assets", {"asset_type": "x", "components": ["c"], "output_of": "run_abc"}
    )
    assert err(r) == (409, "conflict")
    assert (await api.get("/v1/runs/run_abc")).body["status"] == "failed"


async def test_unknown_run_is_404(srv: Running) -> None:
    r = await srv.api.post(
        "/v1/assets", {"asset_type": "x", "components": ["a"], "output_of": "run_nope"}
    )
    assert err(r) == (404, "not_found")
    r = await srv.api.post(
        "/v1/assets/inline", {"asset_type": "x", "content": "y", "output_of": "run_nope"}
    )
    assert err(r) == (404, "not_found")
    assert err(await srv.api.get("/v1/runs/run_nope")) == (404, "not_found")
    assert err(await srv.api.post("/v1/runs/run_nope/end", {"status": "finished"})) == (
        404,
        "not_found",
    )
    r = await srv.api.post("/v1/runs", {"run_id": "a/b"})
    assert err(r) == (400, "invalid_request")


async def test_abandon_aborts_uploads_and_blocks_finalize(any_srv: Running) -> None:
    api = any_srv.api
    data = os.urandom(11 * MiB)
    plan = await api.register([{"name": "big", "size": len(data)}])
    mp = plan["multipart"]["big"]
    assert (await api.put_url(mp["parts"][0]["url"], data[: 5 * MiB])).status == 200
    r = await api.post(f"/v1/assets/{plan['asset_id']}/abandon", {"reason": "run crashed"})
    assert r.status == 200 and r.body["state"] == "abandoned"
    r = await api.put_url(mp["parts"][1]["url"], data[5 * MiB : 10 * MiB])
    assert r.status == 404  # the multipart upload is gone
    r = await api.finalize(plan["asset_id"], {})
    assert err(r) == (409, "asset_not_pending")
    r = await api.post(f"/v1/assets/{plan['asset_id']}/upload-urls", {})
    assert err(r) == (409, "asset_not_pending")
    again = await api.post(f"/v1/assets/{plan['asset_id']}/abandon", {})
    assert again.status == 200

    ready = await api.post("/v1/assets/inline", {"asset_type": "x", "content": "y"})
    r = await api.post(f"/v1/assets/{ready.body['asset_id']}/abandon", {})
    assert err(r) == (409, "asset_not_pending")


# ---- access control -----------------------------------------------------------------------------


async def test_other_principals_cannot_see_a_private_asset_or_get_urls(srv: Running) -> None:
    api = srv.api
    bob = api.as_(add_principal(srv.tokens_file, "user_bob"))
    plan = await api.register(["a"])
    await api.upload(plan, {"a": b"secret"})
    aid = plan["asset_id"]
    assert (await api.finalize(aid, {})).status == 200

    r = await bob.get(f"/v1/assets/{aid}", params={"include_presigned": "true"})
    assert err(r) == (404, "not_found") and "download_urls" not in json.dumps(r.body)
    assert (await bob.get("/v1/assets")).body["assets"] == []
    for path in ("finalize", "abandon", "deprecate", "upload-urls"):
        r = await bob.post(f"/v1/assets/{aid}/{path}", {})
        assert err(r) == (404, "not_found"), path
    assert err(await bob.get(f"/v1/assets/{aid}/uploads")) == (404, "not_found")
    assert err(await bob.get(f"/v1/assets/{aid}/access")) == (404, "not_found")
    assert err(await bob.call("DELETE", f"/v1/assets/{aid}")) == (404, "not_found")

    r = await api.post(f"/v1/assets/{aid}/access", {"principal_id": "user_bob", "action": "read"})
    assert r.status == 200
    assert r.body == {"grants": [{"principal_id": "user_bob", "action": "read"}]}
    r = await bob.get(f"/v1/assets/{aid}", params={"include_presigned": "true"})
    assert r.status == 200 and set(r.body["download_urls"]) == {"a"}
    _, data, _ = await bob.get_url(r.body["download_urls"]["a"])
    assert data == b"secret"
    r = await bob.post(f"/v1/assets/{aid}/deprecate", {"reason": "mine now"})
    assert err(r) == (403, "forbidden")
    r = await bob.post(
        f"/v1/assets/{aid}/access", {"principal_id": "user_bob", "action": "administer"}
    )
    assert err(r) == (403, "forbidden")
    assert err(await bob.call("DELETE", f"/v1/assets/{aid}")) == (403, "forbidden")

    r = await api.call(
        "DELETE", f"/v1/assets/{aid}/access", params={"principal_id": "user_bob", "action": "read"}
    )
    assert r.status == 200 and r.body == {"grants": []}
    assert err(await bob.get(f"/v1/assets/{aid}")) == (404, "not_found")


async def test_grants_imply_and_visibility_broadcasts(srv: Running) -> None:
    api = srv.api
    bob = api.as_(
        add_principal(
            srv.tokens_file, "user_bob", [{"id": "team_9", "kind": "team", "name": "Nine"}]
        )
    )
    carol = api.as_(add_principal(srv.tokens_file, "user_carol"))
    aid = (await api.post("/v1/assets/inline", {"asset_type": "x", "content": "y"})).body[
        "asset_id"
    ]

    await api.post(f"/v1/assets/{aid}/share", {"scope_id": "team_9"})
    assert (await bob.get(f"/v1/assets/{aid}")).status == 200
    assert (await carol.get(f"/v1/assets/{aid}")).status == 404

    await api.post(f"/v1/assets/{aid}/access", {"principal_id": "user_carol", "action": "write"})
    r = await carol.post(f"/v1/assets/{aid}/deprecate", {"reason": "superseded"})
    assert r.status == 200 and r.body["deprecated"]["reason"] == "superseded"
    assert err(await carol.call("DELETE", f"/v1/assets/{aid}")) == (403, "forbidden")

    r = await api.call("PUT", f"/v1/assets/{aid}/visibility", {"visibility": "public"})
    assert r.status == 200 and r.body["visibility"] == "public"
    dave = api.as_(add_principal(srv.tokens_file, "user_dave"))
    assert (await dave.get(f"/v1/assets/{aid}")).status == 200
    assert err(
        await dave.call("PUT", f"/v1/assets/{aid}/visibility", {"visibility": "private"})
    ) == (403, "forbidden")

    r = await api.post(f"/v1/assets/{aid}/access", {"principal_id": "everyone", "action": "delete"})
    assert r.status == 200
    assert (await dave.call("DELETE", f"/v1/assets/{aid}")).status == 204


async def test_organization_visibility_and_move(srv: Running) -> None:
    org = [{"id": "org_1", "kind": "organization", "name": "One"}]
    alice = srv.api.as_(add_principal(srv.tokens_file, "user_alice", org))
    member = srv.api.as_(add_principal(srv.tokens_file, "user_member", org))
    outsider = srv.api.as_(add_principal(srv.tokens_file, "user_out"))
    aid = (
        await alice.post(
            "/v1/assets/inline", {"asset_type": "x", "content": "y", "visibility": "organization"}
        )
    ).body["asset_id"]
    # in no organization yet: as private
    assert (await member.get(f"/v1/assets/{aid}")).status == 404
    r = await outsider.post(f"/v1/assets/{aid}/move", {"organization_id": "org_1"})
    assert err(r) == (404, "not_found")  # cannot read it: its existence is not disclosed
    r = await alice.post(f"/v1/assets/{aid}/move", {"organization_id": "org_2"})
    assert err(r) == (403, "forbidden")
    r = await alice.post(
        f"/v1/assets/{aid}/move", {"organization_id": "org_1", "visibility": "team"}
    )
    assert r.status == 200
    assert r.body["organization_id"] == "org_1" and r.body["created_by"] == "user_alice"
    assert r.body["visibility"] == "team"
    assert (await member.get(f"/v1/assets/{aid}")).status == 200
    assert (await outsider.get(f"/v1/assets/{aid}")).status == 404
    r = await member.get(f"/v1/assets/{aid}/access")
    assert r.status == 200 and r.body == {"grants": []}


async def test_runs_belong_to_their_creator(srv: Running) -> None:
    bob = srv.api.as_(add_principal(srv.tokens_file, "user_bob"))
    await srv.api.post("/v1/runs", {"run_id": "run_mine"})
    assert (await bob.get("/v1/runs/run_mine")).status == 200
    r = await bob.post("/v1/runs/run_mine/end", {"status": "finished"})
    assert err(r) == (403, "forbidden")
    r = await bob.post(
        "/v1/assets", {"asset_type": "x", "components": ["a"], "output_of": "run_mine"}
    )
    assert err(r) == (403, "forbidden")


# ---- validity, delete, experiments --------------------------------------------------------------


async def test_delete_removes_the_asset_and_its_bytes(any_srv: Running) -> None:
    plan = await any_srv.api.register(["a"])
    await any_srv.api.upload(plan, {"a": b"bytes"})
    aid = plan["asset_id"]
    assert (await any_srv.api.finalize(aid, {})).status == 200
    got = await any_srv.api.get(f"/v1/assets/{aid}", params={"include_presigned": "1"})
    r = await any_srv.api.call("DELETE", f"/v1/assets/{aid}")
    assert r.status == 204 and r.body is None
    assert err(await any_srv.api.get(f"/v1/assets/{aid}")) == (404, "not_found")
    status, _, _ = await any_srv.api.get_url(got.body["download_urls"]["a"])
    assert status == 404


async def test_experiments_link_warn_block_and_retract(srv: Running) -> None:
    api = srv.api

    async def inline() -> str:
        r = await api.post("/v1/assets/inline", {"asset_type": "dataset", "content": "d"})
        return str(r.body["asset_id"])

    good, old, bad, out = await inline(), await inline(), await inline(), await inline()
    await api.post(f"/v1/assets/{old}/deprecate", {"reason": "superseded by v2"})
    r = await api.post(f"/v1/assets/{bad}/invalidate", {"reason": "labeling bug"})
    assert r.body["invalidated"]["reason"] == "labeling bug" and r.body["state"] == "ready"

    exp = (await api.post("/v1/experiments", {"name": "sweep"})).body
    assert exp["experiment_id"].startswith("exp_")
    eid = exp["experiment_id"]
    r = await api.post(f"/v1/experiments/{eid}/variations", {"name": "v", "inputs": [good, bad]})
    assert err(r) == (409, "asset_invalid")
    r = await api.post(
        f"/v1/experiments/{eid}/variations",
        {"name": "v", "inputs": [good, bad, old], "allow_invalid_assets": True},
    )
    assert r.status == 201
    assert [w["asset_id"] for w in r.body["warnings"]] == [old]
    assert "superseded by v2" in r.body["warnings"][0]["reason"]
    vid = r.body["variation_id"]
    pending = (await api.register(["p"]))["asset_id"]
    r = await api.post(f"/v1/experiments/{eid}/variations", {"name": "w", "inputs": [pending]})
    assert err(r) == (409, "conflict")

    r = await api.post(f"/v1/variations/{vid}/outputs", {"asset_id": out})
    assert r.status == 200 and r.body["outputs"] == [out]
    for linked in (good, out):
        assert err(await api.call("DELETE", f"/v1/assets/{linked}")) == (409, "asset_linked")

    r = await api.post(f"/v1/experiments/{eid}/retract", {"reason": "wrong baseline"})
    assert r.status == 200 and r.body["invalidated"] == [out]
    got = (await api.get(f"/v1/assets/{out}")).body
    assert "wrong baseline" in got["invalidated"]["reason"]
    assert (await api.get(f"/v1/assets/{good}")).body["invalidated"] is None

    bob = api.as_(add_principal(srv.tokens_file, "user_bob"))
    r = await bob.post(f"/v1/experiments/{eid}/variations", {"name": "x", "inputs": []})
    assert err(r) == (403, "forbidden")


# ---- files and processes ------------------------------------------------------------------------


async def test_state_files_are_private(srv: Running) -> None:
    state = srv.server.state_dir
    endpoint = json.loads((state / "endpoint.json").read_text())
    assert endpoint == {"url": srv.server.url, "tokens_file": str(srv.tokens_file)}
    for name in ("endpoint.json", "tokens.json", "signing.key"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    tokens = json.loads(srv.tokens_file.read_text())["tokens"]
    assert [t["principal_id"] for t in tokens.values()] == [f"user_{_login()}"]
    assert srv.server.local_token in tokens


async def test_restart_keeps_tokens_assets_and_urls(tmp_path: Path) -> None:
    async with running_server(tmp_path / "s") as first:
        plan = await first.api.register(["a"])
        token = first.token
    async with running_server(tmp_path / "s") as second:
        assert second.token == token
        r = await second.api.get(f"/v1/assets/{plan['asset_id']}")
        assert r.status == 200 and r.body["state"] == "pending"
    assert not (tmp_path / "s" / "server" / "endpoint.json").exists()


async def test_public_url_is_the_base_of_presigned_urls(make_server: MakeServer) -> None:
    s = await make_server(public_url="http://proxy.example:9000/")
    plan = await s.api.register(["a"])
    assert plan["upload_urls"]["a"].startswith("http://proxy.example:9000/storage/")
    assert s.server.url.startswith("http://127.0.0.1:")


async def test_a_given_tokens_file_is_used(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"tok-1": {"principal_id": "user_ci"}}}))
    async with running_server(tmp_path / "s", tokens_file=tokens) as s:
        assert s.server.tokens_file == tokens
        r = await s.api.as_("tok-1").get("/v1/me/scopes")
        assert r.body["principal_id"] == "user_ci"


def test_serve_forever_prints_url_and_tokens_and_stops_on_sigterm(tmp_path: Path) -> None:
    code = (
        "import sys; from agent.config import Settings; "
        "from agent.server.runner import serve_forever;"
        f"sys.exit(serve_forever(Settings(agent={{'state_dir': {str(tmp_path)!r}}},"
        "server={'listen': '127.0.0.1:0'})))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONICLE_AGENT_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url_line = proc.stdout.readline().strip()
        tokens_line = proc.stdout.readline().strip()
        assert url_line.startswith("url: http://127.0.0.1:"), url_line
        assert tokens_line == f"tokens_file: {tmp_path / 'server' / 'tokens.json'}"
        import urllib.request

        with urllib.request.urlopen(url_line[5:] + "/v1/health", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_serve_forever_reports_a_taken_port(tmp_path: Path) -> None:
    import socket

    from agent.config import Settings
    from agent.server.runner import serve_forever

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(agent={"state_dir": tmp_path}, server={"listen": f"127.0.0.1:{port}"})
        assert serve_forever(settings) == 1
        bad = Settings(agent={"state_dir": tmp_path}, server={"storage": "ftp://x"})
        assert serve_forever(bad) == 2


def _login() -> str:
    from agent.config import local_login

    return local_login()
