"""Pending assets expire (API 1.1): the server abandons, with reason ``expired``, a pending
asset with no upload activity for ``server.pending_ttl_s`` and releases its storage; an
asset whose uploader keeps asking for URLs stays, a ready one is never touched. The daemon
whose asset expired while it was down fails the job saying so, and ``retry`` uploads the
files anew as a new asset."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from tests.support.helpers_daemon import start_daemon
from tests.support.helpers_e2e import FAST_ENV, assert_same_tree, chronicle_for
from tests.support.helpers_server import running_server, sha256


async def test_an_idle_pending_asset_expires_a_busy_one_does_not(
    tmp_path: Path, storage_backend: str
) -> None:
    data = os.urandom(50_000)
    async with running_server(tmp_path, storage=storage_backend, pending_ttl_s=2,
                              sweep_interval_s=0.2) as s:
        idle = await s.api.register([{"name": "a.bin", "size": len(data)}, "b.bin"])
        r = await s.api.put_url(idle["upload_urls"]["a.bin"], data)  # some bytes, then idle
        assert r.status == 200
        busy = await s.api.register([{"name": "a.bin", "size": len(data)}])
        ready = await s.api.register([{"name": "a.bin", "size": len(data)}])
        body = await s.api.upload(ready, {"a.bin": data})
        assert (await s.api.finalize(ready["asset_id"], body)).status == 200
        for _ in range(8):  # 4 s: twice the TTL
            r = await s.api.post(f"/v1/assets/{busy['asset_id']}/upload-urls", {})
            assert r.status == 200, r.body
            await asyncio.sleep(0.5)
        got = (await s.api.get(f"/v1/assets/{idle['asset_id']}")).body
        assert got["state"] == "abandoned" and got["abandoned_reason"] == "expired"
        r = await s.api.put_url(idle["upload_urls"]["b.bin"], b"late")
        assert r.status != 200 or storage_backend.startswith("s3")  # disk: closed at once
        assert (await s.api.get(f"/v1/assets/{busy['asset_id']}")).body["state"] == "pending"
        got = (await s.api.get(f"/v1/assets/{ready['asset_id']}",
                               params={"include_presigned": "true"})).body
        assert got["state"] == "ready"
        status, stored, _ = await s.api.get_url(got["download_urls"]["a.bin"])
        assert status == 200 and sha256(stored) == sha256(data)
        listed = await s.api.get("/v1/assets", params={"state": "abandoned"})
        assert [a["asset_id"] for a in listed.body["assets"]] == [idle["asset_id"]]


def test_the_daemon_says_its_asset_expired_and_retry_uploads_anew(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(10_000 + i))
    env = dict(FAST_ENV, CHRONICLE_AGENT_DEBUG__CRASH_POINT="after_register@1",
               CHRONICLE_AGENT_SERVER__PENDING_TTL_S="1",
               CHRONICLE_AGENT_SERVER__SWEEP_INTERVAL_S="0.2")
    with start_daemon(env) as daemon:
        client = daemon.client()
        job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "ckpt"})
        assert daemon.proc is not None
        daemon.proc.wait(60)  # registered, then killed: the asset waits, idle
        assert daemon.proc.returncode == -9, daemon.log_tail()
        time.sleep(1.5)  # past the TTL while nobody uploads
        daemon.start()  # its embedded server expires the asset as it starts
        final = daemon.client().wait_job(job["job_id"], 60)
        assert final["state"] == "failed", (final, daemon.log_tail())
        assert final["error"]["code"] == "asset_abandoned", final
        assert "reason: expired" in final["error"]["message"]
        assert f"chronicle-agent retry {job['job_id']}" in final["error"]["message"]
        first = final["error"]["message"].split("asset ")[1].split(" ")[0]
        daemon.client().retry_job(job["job_id"])
        done = daemon.client().wait_job(job["job_id"], 60)
        assert done["state"] == "done", (done, daemon.log_tail())
        assert done["asset_id"] != first
        dest = tmp_path / "dl"
        chronicle_for(daemon).assets.download(done["asset_id"], dest)
        assert_same_tree(src, dest)
