"""Chaos, for real: random ``kill -9`` of the daemon while it uploads a 1 GiB file and 300
small files to a real S3 store (SeaweedFS) through a fault proxy that resets connections,
answers 503 SlowDown, stalls and says URLs expired. Afterwards every asset is ready, an
independent S3 client reading the store directly finds byte-identical objects, Chronicle
holds no duplicate, and the test prints how many bytes were sent more than once."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.helpers_daemon import start_daemon
from tests.support.helpers_e2e import FAST_ENV, MiB, chronicle_for, write_random
from tests.support.helpers_seaweed import Seaweed

KILLS = 4
SEED = int(os.environ.get("CHAOS_SEED", "0")) or random.randrange(1, 1 << 30)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def s3_client(sw: Seaweed) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=sw.endpoint, aws_access_key_id=sw.access_key,
        aws_secret_access_key=sw.secret_key, region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def stored_sha256(client: Any, bucket: str, key: str) -> tuple[int, str]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    h, n = hashlib.sha256(), 0
    for chunk in body.iter_chunks(4 * MiB):
        h.update(chunk)
        n += len(chunk)
    body.close()
    return n, h.hexdigest()


@pytest.mark.timeout(600)
def test_random_kills_and_faults_on_real_s3(seaweed: Seaweed, tmp_path: Path) -> None:
    print(f"\nchaos seed {SEED} (CHAOS_SEED={SEED} repeats this run's choices)")
    rng = random.Random(SEED)
    big = tmp_path / "big"
    write_random(big / "model.safetensors", 1024 * MiB)
    small = tmp_path / "small"
    small.mkdir()
    for i in range(300):
        (small / f"shard-{i:03d}.bin").write_bytes(os.urandom(rng.randrange(1, 200_000)))
    sources = {"big": big, "small": small}
    total_bytes = sum(p.stat().st_size for d in sources.values() for p in d.rglob("*")
                      if p.is_file())

    with FaultProxy(seaweed.endpoint, seed=SEED) as proxy:
        env = dict(FAST_ENV)
        env.update(seaweed.env())
        env.update({
            "CHRONICLE_AGENT_SERVER__STORAGE": f"s3://{seaweed.bucket}?endpoint={proxy.url}",
            "CHRONICLE_AGENT_SERVER__PART_SIZE_BYTES": str(16 * MiB),
            "CHRONICLE_AGENT_UPLOAD__STALL_TIMEOUT_S": "3",
        })
        with start_daemon(env) as daemon:
            # Faults on presigned PUTs (the signature in the query), set once the server has
            # made its bucket: the agent's, and the server's own CopyObject at finalize
            # (which it retries as botocore would).
            agent = "X-Amz-Signature="
            proxy.set_rules([
                {"action": "reset_request", "method": "PUT", "after_bytes": 256 * 1024,
                 "probability": 0.03, "path_regex": agent},
                {"action": "status", "code": "s3_slowdown", "method": "PUT",
                 "probability": 0.03, "path_regex": agent},
                {"action": "stall_request", "method": "PUT", "after_bytes": 64 * 1024,
                 "seconds": 5, "then_close": True, "probability": 0.01, "path_regex": agent},
                {"action": "status", "code": "expired", "method": "PUT", "probability": 0.02,
                 "path_regex": agent},
            ])
            client = daemon.client()
            client.request("POST", "/v1/runs", {"run_id": "run_chaos"})
            jobs = {name: client.request("POST", "/v1/uploads", {
                "path": str(src), "asset_type": "checkpoint", "run_id": "run_chaos"})["job_id"]
                for name, src in sources.items()}
            kills = 0
            deadline = time.monotonic() + 420
            while kills < KILLS:
                time.sleep(rng.uniform(1.5, 4.0))
                states = {client.get_job(j)["state"] for j in jobs.values()}
                if states <= {"done"}:
                    break
                daemon.kill()
                kills += 1
                daemon.start()
                client = daemon.client()
                assert time.monotonic() < deadline
            finals = {name: client.wait_job(j, max(1.0, deadline - time.monotonic()))
                      for name, j in jobs.items()}
            for name, job in finals.items():
                assert job["state"] == "done", (name, job, daemon.log_tail())

            stats = proxy.stats()
            chron = chronicle_for(daemon)
            assets = chron.assets.list(output_of="run_chaos")
            assert sorted(a.asset_id for a in assets) == sorted(
                j["asset_id"] for j in finals.values()), "a duplicate or missing asset"
            assert all(a.state == "ready" for a in assets)

            s3 = s3_client(seaweed)
            for name, job in finals.items():
                asset = chron.assets.get(job["asset_id"])
                src = sources[name]
                assert {c.name for c in asset.components} == {
                    p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
                for comp in asset.components:
                    local = src / comp.name
                    # multipart and copied components live at ready/…; small ones whose
                    # URL bound their digest stay where they were PUT (create-only URLs)
                    keys = [f"{p}/{job['asset_id']}/{comp.name}" for p in ("ready", "assets")]
                    listed = {o["Key"] for k in keys for o in s3.list_objects_v2(
                        Bucket=seaweed.bucket, Prefix=k).get("Contents", [])}
                    size, digest = stored_sha256(
                        s3, seaweed.bucket, next(k for k in keys if k in listed))
                    assert (size, digest) == (local.stat().st_size, sha256_file(local)), comp.name

    resent = max(0, stats["bytes_up"] - total_bytes)
    print(f"chaos: {kills} kills, faults {dict(stats['faults'])}, {stats['requests']} requests; "
          f"{total_bytes / MiB:.0f} MiB of files, {stats['bytes_up'] / MiB:.0f} MiB sent "
          f"through the proxy: {resent / MiB:.1f} MiB ({100 * resent / total_bytes:.1f}%) "
          "sent more than once (request headers included)")
