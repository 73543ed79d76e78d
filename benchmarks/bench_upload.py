"""Upload benchmark: the agent beside a plain single-connection aiohttp PUT loop, same files,
same local server, one run.

    .venv/bin/python benchmarks/bench_upload.py [--large-gib 1] [--small-count 1000] [--rounds 3]

Scenarios: 2 × LARGE files, and SMALL-COUNT × 64 KiB files. For each: wall time, CPU seconds
per GiB and peak RSS of the uploading process (the agent's daemon, started fresh per round so
its peak RSS is its own; the baseline in its own process), and the agent/baseline ratios.
Medians over rounds. The local server runs as a separate process (niced) for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Daemon, Server  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30

BASELINE = r'''
import asyncio, json, os, resource, sys, time, urllib.request
import aiohttp

url, token, root = sys.argv[1], sys.argv[2], sys.argv[3]
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
names = [os.path.relpath(p, root) for p in files]

def api(method, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method,
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())

async def main():
    t0 = time.perf_counter()
    reg = api("POST", "/v1/assets", {"asset_type": "bench", "components": names})
    conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=conn) as s:
        for name, path in zip(names, files):
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                async with s.put(reg["upload_urls"][name], data=f,
                                 headers={"Content-Length": str(size)},
                                 skip_auto_headers=("Content-Type",)) as r:
                    assert r.status < 300, (r.status, await r.text())
                    await r.read()
    return time.perf_counter() - t0

wall = asyncio.run(main())
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_mb": ru.ru_maxrss / 1024}))
'''


def make_files(root: Path, large_gib: float, small_count: int) -> tuple[Path, Path]:
    large, small = root / "large", root / "small"
    large.mkdir(parents=True)
    small.mkdir(parents=True)
    block = os.urandom(8 * MiB)
    for i in range(2):
        with open(large / f"shard-{i}.bin", "wb") as f:
            left = int(large_gib * GiB)
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    for i in range(small_count):
        (small / f"f{i:05d}.bin").write_bytes(os.urandom(64 * 1024))
    return large, small


def tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def run_agent(server: Server, src: Path, root: Path) -> dict[str, float]:
    daemon = Daemon(server)
    try:
        p = psutil.Process(daemon.proc.pid)
        cpu0 = sum(p.cpu_times()[:2])
        t0 = time.perf_counter()
        job = daemon.client.request("POST", "/v1/uploads",
                                    {"path": str(src), "asset_type": "bench"})
        final = daemon.client.wait_job(job["job_id"], 600)
        wall = time.perf_counter() - t0
        cpu = sum(p.cpu_times()[:2]) - cpu0
        rss = daemon.peak_rss_mb()
    finally:
        daemon.stop()
    assert final["state"] == "done", final
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss}


def run_baseline(server: Server, src: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", BASELINE, server.url, server.token, str(src)],
                         capture_output=True, text=True, check=True)
    res: dict[str, float] = json.loads(out.stdout)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large-gib", type=float, default=1.0)
    ap.add_argument("--small-count", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        large, small = make_files(root, args.large_gib, args.small_count)
        server = Server(root, prefix=["nice", "-n", "5"])
        try:
            for label, src in ((f"2 x {args.large_gib:g} GiB", large),
                               (f"{args.small_count} x 64 KiB", small)):
                gib = tree_bytes(src) / GiB
                rows: dict[str, list[dict[str, float]]] = {"agent": [], "baseline": []}
                for _ in range(args.rounds):  # interleaved, so drift hits both alike
                    rows["agent"].append(run_agent(server, src, root))
                    rows["baseline"].append(run_baseline(server, src))
                print(f"\n== {label} ({gib:.2f} GiB), median of {args.rounds} ==")
                print(f"{'':10} {'wall s':>8} {'CPU s/GiB':>10} {'peak RSS MB':>12}")
                med: dict[str, dict[str, float]] = {}
                for who, rs in rows.items():
                    med[who] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                    m = med[who]
                    print(f"{who:10} {m['wall_s']:8.2f} {m['cpu_s'] / gib:10.2f} "
                          f"{m['peak_rss_mb']:12.1f}")
                a, b = med["agent"], med["baseline"]
                print(f"{'ratio':10} {a['wall_s'] / b['wall_s']:8.2f} "
                      f"{a['cpu_s'] / b['cpu_s']:10.2f} {a['peak_rss_mb'] / b['peak_rss_mb']:12.2f}"
                      "   (agent / baseline)")
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
