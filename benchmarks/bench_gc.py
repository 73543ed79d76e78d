"""Storage sweep time per 10,000 objects (issue 15), on the disk store and on SeaweedFS.

    .venv/bin/python benchmarks/bench_gc.py [--objects 10000] [--rounds 3] [--only disk,s3]

For each store a local server runs in this process (as the daemon embeds it) with one
ready asset of ``--objects`` small components (1 KiB, uploaded through their presigned
URLs and finalized). Then, ``--rounds`` times each:

- scan: a sweep that finds nothing to remove, so every object is listed, looked up in the
  database and kept: what a periodic sweep costs on a clean store;
- remove: ``--objects`` orphans (objects with no asset row, put straight into the store)
  beside the live ones, then one sweep that removes them all.

Printed per store: the median wall time and the server's CPU time (this process: the sweep
runs in the server) of each kind, and both per 10,000 objects (scan: objects seen; remove:
objects removed). On the disk store the first sweep also removes each small component's
upload key (the finalize's hard link); it runs before the rounds and is not counted.
SeaweedFS runs as its own process on the same 2 cores: its CPU is not in the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import _common  # noqa: E402,F401  (stop on SIGTERM through the finally blocks)
import aiohttp  # noqa: E402

from agent.config import Settings  # noqa: E402
from agent.server.gc import sweep_storage  # noqa: E402
from agent.server.runner import start_server  # noqa: E402
from tests.support.helpers_seaweed import start_seaweed  # noqa: E402

KiB = 1024


async def _populate(server: Any, n: int) -> None:
    """One ready asset of ``n`` 1 KiB components, through the API and presigned PUTs."""
    files = {f"d{i % 100:02d}/f{i:06d}.bin": os.urandom(KiB) for i in range(n)}
    headers = {"Authorization": f"Bearer {server.local_token}"}
    async with aiohttp.ClientSession(headers=headers) as http, \
            aiohttp.ClientSession() as raw:
        async with http.post(f"{server.url}/v1/assets", json={
                "asset_type": "dataset", "components": [
                    {"name": k, "size": len(v), "sha256": hashlib.sha256(v).hexdigest()}
                    for k, v in files.items()]}) as r:
            plan = await r.json()
            assert r.status == 201, plan
        gate = asyncio.Semaphore(32)

        async def put(name: str) -> None:
            async with gate, raw.put(
                    plan["upload_urls"][name], data=files[name],
                    headers=plan.get("upload_headers", {}).get(name, {}),
                    skip_auto_headers=("Content-Type",)) as r:
                assert r.status == 200, await r.text()

        await asyncio.gather(*(put(n) for n in files))
        async with http.post(f"{server.url}/v1/assets/{plan['asset_id']}/finalize",
                             json={}) as r:
            assert r.status == 200, await r.text()


async def _orphans(core: Any, n: int) -> None:
    gate = asyncio.Semaphore(32)
    tag = os.urandom(4).hex()

    async def put(i: int) -> None:
        async with gate:
            await core.storage.put_object(f"assets/ast_gone{tag}{i:06d}/x.bin", b"x" * KiB,
                                          "application/octet-stream")

    await asyncio.gather(*(put(i) for i in range(n)))


async def _timed(core: Any) -> tuple[float, float, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    report = await sweep_storage(core, grace_s=0)
    assert not report.errors, report.errors
    return time.perf_counter() - t0, time.process_time() - c0, report


async def bench(storage: str, root: Path, n: int, rounds: int) -> dict[str, Any]:
    settings = Settings(agent={"state_dir": root / "state"},
                        server={"storage": storage, "gc_interval_s": 0})
    server = await start_server(settings, embedded=True)
    try:
        core = server._core
        await _populate(server, n)
        await _timed(core)  # the disk store: the finalize's upload-key links go here
        scans, removes = [], []
        for _ in range(rounds):
            wall, cpu, report = await _timed(core)
            assert not report.removed
            scans.append((wall, cpu, report.objects_seen))
            await _orphans(core, n)
            wall, cpu, report = await _timed(core)
            assert len(report.removed) == n, len(report.removed)
            removes.append((wall, cpu, len(report.removed)))
        return {"scan": scans, "remove": removes}
    finally:
        await server.stop()


def _row(name: str, kind: str, runs: list[tuple[float, float, int]]) -> str:
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    count = runs[0][2]
    per = 10_000 / count
    return (f"| {name} | {kind} | {count} | {wall:.2f} | {cpu:.2f} | {wall * per:.2f} | "
            f"{cpu * per:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="disk,s3")
    args = ap.parse_args()
    wanted = set(args.only.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp_s:
        tmp = Path(tmp_s)
        if "disk" in wanted:
            got = asyncio.run(bench("", tmp / "disk", args.objects, args.rounds))
            rows += [_row("disk", k, v) for k, v in got.items()]
        if "s3" in wanted:
            with start_seaweed(tmp / "weed") as sw:
                os.environ.update(sw.env())
                got = asyncio.run(bench(sw.storage_url("gc-bench"), tmp / "s3", args.objects,
                                        args.rounds))
                rows += [_row("SeaweedFS", k, v) for k, v in got.items()]
    print(f"storage sweep, medians of {args.rounds} rounds; scan: nothing to remove, every "
          "object listed and kept; remove: that many orphans removed beside the live ones")
    print("| store | sweep | objects seen / removed | wall s | server CPU s | "
          "wall s per 10k | CPU s per 10k |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
