"""Uploads through a fault-injecting proxy (a real process on loopback): resets, 500, 503
SlowDown, stalls and expired URLs are retried until the asset is ready; 400 and 404 are not
retried and fail the job with that error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.client import SocketClient
from tests.support.helpers_e2e import (
    MiB,
    assert_same_tree,
    chronicle_for,
    proxied_daemon,
    write_random,
)
from tests.support.helpers_server import add_principal


def _tree(root: Path) -> Path:
    root.mkdir()
    write_random(root / "big.bin", 24 * MiB)  # 5 parts of 5 MiB
    (root / "small.bin").write_bytes(os.urandom(200_000))
    (root / "other.bin").write_bytes(os.urandom(50_000))
    return root


@pytest.mark.parametrize("backend", ["disk", "s3"])
def test_retryable_faults_are_survived(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    src = _tree(tmp_path / "src")
    sw = request.getfixturevalue("seaweed") if backend == "s3" else None
    debug = {"CHRONICLE_AGENT_LOG__LEVEL": "debug"}  # every line, for the redaction check
    with proxied_daemon(debug, seaweed=sw) as (daemon, proxy):
        proxy.set_rules([
            {"action": "reset_request", "method": "PUT", "path_regex": "partNumber=2&",
             "after_bytes": MiB},
            {"action": "status", "code": 500, "method": "PUT", "path_regex": "partNumber=3&",
             "times": 2},
            {"action": "status", "code": "s3_slowdown", "method": "PUT",
             "path_regex": "partNumber=4&"},
            {"action": "stall_request", "method": "PUT", "path_regex": "partNumber=5&",
             "after_bytes": 100_000, "seconds": 8, "then_close": True},
            {"action": "status", "code": "expired", "method": "PUT",
             "path_regex": "small\\.bin"},
            {"action": "status", "code": 503, "method": "PUT", "path_regex": "other\\.bin"},
        ])
        # made with a researcher's own token: it rides every retry and must never be logged
        info = json.loads((daemon.state_dir / "server" / "endpoint.json").read_text())
        alice = SocketClient(daemon.socket_path,
                             token=add_principal(Path(info["tokens_file"]), "user_alice"))
        job = alice.request("POST", "/v1/uploads",
                            {"path": str(src), "asset_type": "checkpoint"})
        final = daemon.client().wait_job(job["job_id"], 120)
        assert final["state"] == "done", final
        assert final["attempts"] == 1  # retried request by request, not job by job
        stats = proxy.stats()
        fired = {r["rule"]["path_regex"]: r["fired"] for r in stats["by_rule"]}
        assert fired == {"partNumber=2&": 1, "partNumber=3&": 2, "partNumber=4&": 1,
                         "partNumber=5&": 1, "small\\.bin": 1, "other\\.bin": 1}
        proxy.clear()
        asset = chronicle_for(daemon, alice._token).assets.get(final["asset_id"])
        assert asset.state == "ready" and asset.created_by == "user_alice"
        dest = tmp_path / "dl"
        dl = alice.request("POST", "/v1/downloads",
                           {"asset_id": final["asset_id"], "dest": str(dest)})
        assert alice.wait_job(dl["job_id"], 120)["state"] == "done"
        assert_same_tree(src, dest)
        # Redaction: the whole log of an upload with retries and an expired URL holds no
        # token and no part of a presigned URL's signature.
        log = daemon.log_text()
        tokens = json.loads((daemon.state_dir / "server" / "tokens.json").read_text())["tokens"]
        for secret in ("Signature=", "Expires=", "X-Amz-Signature", "X-Amz-Credential",
                       *tokens):
            assert secret not in log


@pytest.mark.parametrize("code", [400, 404])
def test_a_400_or_404_is_not_retried_and_fails_the_job(tmp_path: Path, code: int) -> None:
    (tmp_path / "one.bin").write_bytes(os.urandom(1000))
    with proxied_daemon() as (daemon, proxy):
        proxy.set_rules([{"action": "status", "code": code, "method": "PUT", "times": -1}])
        job = daemon.client().request("POST", "/v1/uploads", {
            "path": str(tmp_path / "one.bin"), "asset_type": "checkpoint"})
        final = daemon.client().wait_job(job["job_id"], 60)
        assert final["state"] == "failed"
        assert final["error"]["code"] == f"http_{code}"
        assert str(code) in final["error"]["message"]
        puts = [e for e in proxy.stats()["log"] if e["method"] == "PUT"]
        assert len(puts) == 1  # never retried
        res = daemon.run_cli("jobs", "--state", "failed", "--json")
        assert res.returncode == 0, res.stderr
        [listed] = json.loads(res.stdout)["jobs"]
        assert listed["error"]["code"] == f"http_{code}"


def test_urls_that_really_expire_mid_upload_are_refreshed_before_use(tmp_path: Path) -> None:
    """The server signs URLs for 1 s and bandwidth is capped, so later parts would find
    their URLs expired at the store: the agent asks for fresh ones before using them, and no
    request is wasted on a 403 (the 403 path itself is covered by the injected faults)."""
    src = tmp_path / "src"
    write_random(src / "big.bin", 30 * MiB)
    env = {"CHRONICLE_AGENT_SERVER__URL_EXPIRY_S": "1",
           "CHRONICLE_AGENT_UPLOAD__CONCURRENCY": "1",
           "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(4 * MiB)}
    with proxied_daemon(env) as (daemon, proxy):
        job = daemon.client().request("POST", "/v1/uploads",
                                      {"path": str(src), "asset_type": "checkpoint"})
        final = daemon.client().wait_job(job["job_id"], 120)
        assert final["state"] == "done", final
        assert final["attempts"] == 1
        puts = [e for e in proxy.stats()["log"] if e["method"] == "PUT"]
        assert [e["status"] for e in puts] == [200] * 6  # 6 parts, each sent once
        refreshes = daemon.log_text().count(f"POST /v1/assets/{final['asset_id']}/upload-urls")
        assert refreshes >= 2, daemon.log_tail()
