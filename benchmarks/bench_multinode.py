"""One checkpoint written by several nodes, each node's uplink capped at the same rate:
time to ready with every node's agent sending its part, against one agent sending it all.

    .venv/bin/python benchmarks/bench_multinode.py [--gib 4] [--nodes 4] [--rate-mib 40]
        [--rounds 1] [--only node-local,shared,one]

A checkpoint of ``--gib`` GiB in safetensors shards (random bytes, 4 shards per node) and
its ``model.safetensors.index.json`` naming them all. Scenarios, each against a fresh local
server (disk store, niced) and fresh daemons, each daemon's transfers capped at
``--rate-mib`` MiB/s (``upload.bandwidth_limit_bytes_per_s``, the existing per-agent cap):

- **one**: one daemon; the whole checkpoint in one directory.
- **node-local**: ``--nodes`` daemons, each with its own directory holding its node's
  shards (node 0 also the index); ``exec --nodes N --node-rank R``; the index holder
  finalizes.
- **shared**: ``--nodes`` daemons watching one directory that holds everything
  (``exec --nodes N --node-rank R --shared``): each agent sends its share (split by bytes).

Every node runs under ``chronicle-agent exec`` with a command that waits for a start signal,
then renames its prepared ``tmp-step-1`` into ``step-1`` (a rename seals at once). Time to
ready: from the signal until the run's asset is ``ready`` on the server. Printed: the
median time per scenario, the effective rate, and the ratio to **one**.
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
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Daemon, Server  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
SHARDS_PER_NODE = 4
INDEX = "model.safetensors.index.json"

WAIT_AND_RENAME = (
    "import os, sys, time\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.005)\n"
    "if len(sys.argv) > 2:\n"
    "    os.rename(sys.argv[2], sys.argv[3])\n"
)
"""A node's command: waits for the start signal, then renames its checkpoint into place
(nothing to rename on the nodes of a shared directory but the first)."""


def make_source(root: Path, gib: float, nodes: int) -> list[list[str]]:
    """Random shards under ``root`` (one file per shard); the names per node."""
    n = nodes * SHARDS_PER_NODE
    size = int(gib * GiB) // n
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    root.mkdir(parents=True)
    block = os.urandom(8 * MiB)
    for i, name in enumerate(names):
        with open(root / name, "wb") as f:
            left = size
            while left:
                chunk = block[: min(left, len(block))]
                f.write(bytes([i % 251]) + chunk[1:] if left == size else chunk)
                left -= len(chunk)
    (root / INDEX).write_text(json.dumps({
        "metadata": {"total_size": size * n},
        "weight_map": {f"layer{i}.weight": name for i, name in enumerate(names)}}))
    return [names[r * SHARDS_PER_NODE:(r + 1) * SHARDS_PER_NODE] for r in range(nodes)]


def stage(src: Path, watched: Path, names: list[str]) -> Path:
    """``watched/tmp-step-1`` holding hardlinks to ``names`` (ignored until renamed)."""
    tmp = watched / "tmp-step-1"
    tmp.mkdir(parents=True)
    for n in names:
        os.link(src / n, tmp / n)
    return tmp


def api(server: Server, path: str) -> dict:  # type: ignore[type-arg]
    req = urllib.request.Request(server.url + path,
                                 headers={"Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def start_nodes(scenario: str, src: Path, per_node: list[list[str]], work: Path,
                daemons: list[Daemon], run_id: str, go: Path) -> list[subprocess.Popen[str]]:
    """Every node's ``exec``, its checkpoint staged, waiting for ``go``."""
    nodes = len(daemons)
    everything = [n for names in per_node for n in names] + [INDEX]
    procs = []
    for rank, d in enumerate(daemons):
        if scenario == "node-local":
            watched = work / f"node{rank}"
            names = per_node[rank] + ([INDEX] if rank == 0 else [])
        else:
            watched, names = work / "shared", everything
        move: list[str] = []
        if scenario != "shared" or rank == 0:
            move = [str(stage(src, watched, names)), str(watched / "step-1")]
        cmd = [sys.executable, "-m", "agent", "exec", "--run", run_id, "--watch",
               str(watched), "--type", "checkpoint", "--quiet"]
        if nodes > 1:
            cmd += ["--nodes", str(nodes), "--node-rank", str(rank)]
        if scenario == "shared":
            cmd += ["--shared"]
        procs.append(subprocess.Popen(
            [*cmd, "--", sys.executable, "-c", WAIT_AND_RENAME, str(go), *move],
            env={**os.environ, "CHRONICLE_AGENT_SOCKET": str(d.dir / "a.sock")},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def wait_ready(server: Server, run_id: str, t0: float) -> list[dict]:  # type: ignore[type-arg]
    while True:
        assets = api(server, f"/v1/assets?output_of={run_id}")["assets"]
        if assets and all(a["state"] == "ready" for a in assets):
            return assets  # type: ignore[no-any-return]
        if any(a["state"] == "abandoned" for a in assets):
            raise RuntimeError(f"an asset was abandoned: {assets}")
        if time.monotonic() - t0 > 3600:
            raise RuntimeError("not ready within an hour")
        time.sleep(0.05)


def one_round(scenario: str, src: Path, per_node: list[list[str]], rate: int,
              work: Path) -> tuple[float, list[int]]:
    """Seconds from the start signal to the asset ready; bytes each agent sent."""
    nodes = 1 if scenario == "one" else len(per_node)
    server = Server(work / "srv", prefix=["nice", "-n", "5"])
    env = {"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(rate),
           "CHRONICLE_AGENT_DOWNLOAD__CACHE_UPLOADS": "false"}
    daemons = [Daemon(server, env) for _ in range(nodes)]
    run_id = f"run_bench_{scenario.replace('-', '_')}_{os.getpid()}_{time.monotonic_ns()}"
    go = work / "go"
    procs: list[subprocess.Popen[str]] = []
    try:
        procs = start_nodes(scenario, src, per_node, work, daemons, run_id, go)
        time.sleep(3)  # every exec has registered its run and rules
        t0 = time.monotonic()
        go.touch()
        assets = wait_ready(server, run_id, t0)
        took = time.monotonic() - t0
        assert len(assets) == 1, assets
        held = {c["name"] for c in assets[0]["components"]}
        missing = ({n for names in per_node for n in names} | {INDEX}) - held
        assert not missing, sorted(missing)
        for p in procs:
            _, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"{scenario}: exec failed: {err[-2000:]}")
        sent = []
        for d in daemons:
            jobs = d.client.request("GET", f"/v1/jobs?run_id={run_id}")["jobs"]
            sent.append(sum(int(j.get("bytes_total") or 0) for j in jobs))
        return took, sent
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for d in daemons:
            d.stop()
        server.stop()
        go.unlink(missing_ok=True)
        for sub in work.iterdir():
            shutil.rmtree(sub, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rate-mib", type=float, default=40.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", default="one,node-local,shared")
    args = ap.parse_args()
    scenarios = [s for s in ("one", "node-local", "shared") if s in args.only.split(",")]
    rate = int(args.rate_mib * MiB)
    base = Path(tempfile.mkdtemp(prefix="bmn-", dir="/tmp"))
    try:
        src = base / "src"
        per_node = make_source(src, args.gib, args.nodes)
        total = sum((src / n).stat().st_size for n in os.listdir(src))
        times: dict[str, list[float]] = {s: [] for s in scenarios}
        split: dict[str, list[int]] = {}
        for r in range(args.rounds):
            for s in scenarios:  # interleaved rounds
                work = base / "work"
                work.mkdir()
                took, sent = one_round(s, src, per_node, rate, work)
                work.rmdir()
                times[s].append(took)
                split[s] = sent
                print(f"round {r + 1}: {s}: {took:.1f} s, bytes sent per agent {sent}",
                      flush=True)
        print(f"\n{total / GiB:.2f} GiB checkpoint, {args.nodes} nodes, each agent capped at "
              f"{args.rate_mib:g} MiB/s; medians of {args.rounds} round(s)")
        print("| scenario | agents | time to ready | effective MiB/s | vs one agent | "
              "bytes per agent (MiB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        one = statistics.median(times["one"]) if "one" in times else None
        for s in scenarios:
            t = statistics.median(times[s])
            ratio = f"{t / one:.2f}x" if one else "-"
            per = ", ".join(f"{b / MiB:.0f}" for b in split[s])
            print(f"| {s} | {len(split[s])} | {t:.1f} s | {total / MiB / t:.0f} | {ratio} | "
                  f"{per} |")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
