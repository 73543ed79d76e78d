"""Watcher benchmark: seal-to-ready latency, and the CPU an idle daemon spends watching.

    .venv/bin/python benchmarks/bench_watch.py [--rounds 30] [--idle-s 60] [--runs 1000]

1. Seal-to-ready: a daemon (default watcher settings, embedded Chronicle, disk store) with
   one ``[[watch]]`` rule; a checkpoint directory with a 1 MiB file is written, then its
   ``_SUCCESS`` marker; the clock runs from the marker's write to the job being ``done``
   (the asset ``ready`` on Chronicle). Also from the marker to the job being queued (the
   seal itself). Median and 95th percentile over ROUNDS checkpoints.
2. Idle CPU: a fresh daemon watching RUNS run directories (``ROOT/run_N/ckpt/``, empty),
   (a) through one config rule ``ROOT/*/ckpt/step-*``, (b) through RUNS runs registered
   over the socket, each with its own watch rule (pid liveness: one pidfd each); after
   a 5 s settle, the daemon's user+system CPU seconds over IDLE_S seconds; once with the
   default ``agent.workers`` and once with 1 (idle workers can wake each other in a loop:
   see the figures' note in the report).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.client import SocketClient  # noqa: E402
from agent.errors import AgentError  # noqa: E402

MiB = 1 << 20


class Daemon:
    def __init__(self, root: Path, rules: list[dict[str, Any]], workers: int = 0) -> None:
        self.root = root
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CHRONICLE_AGENT_", "METHODIC_RUN_ID"))}
        env.update({
            "PYTHONPATH": str(REPO),
            "CHRONICLE_AGENT_AGENT__STATE_DIR": str(root / "state"),
            "CHRONICLE_AGENT_SOCKET": str(root / "agent.sock"),
            "CHRONICLE_AGENT_CONFIG": str(root / "none.toml"),
            "CHRONICLE_AGENT_LOG__LEVEL": "warning",
            "CHRONICLE_AGENT_WATCH": json.dumps(rules),
        })
        if workers:
            env["CHRONICLE_AGENT_AGENT__WORKERS"] = str(workers)
        (root / "none.toml").write_text("")
        self.log = open(root / "daemon.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "daemon"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=root)
        self.client = SocketClient(root / "agent.sock", timeout_s=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.health(timeout_s=2)
                break
            except AgentError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError((root / "daemon.log").read_text()) from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency(rounds: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bw-", dir="/tmp"))
    out = root / "out"
    out.mkdir()
    d = Daemon(root, [{"path": f"{out}/step-*", "run_id": "run_bench"}])
    sealed: list[float] = []
    ready: list[float] = []
    try:
        for i in range(rounds):
            ck = out / f"step-{i}"
            ck.mkdir()
            (ck / "model.bin").write_bytes(os.urandom(MiB))
            time.sleep(0.05)
            t0 = time.perf_counter()
            (ck / "_SUCCESS").write_bytes(b"")
            job = None
            while job is None:
                for j in d.client.list_jobs(run_id="run_bench"):
                    if j.get("checkpoint") == str(ck):
                        job = j
                        break
                else:
                    time.sleep(0.002)
            sealed.append(time.perf_counter() - t0)
            final = d.client.wait_job(job["job_id"], 60)
            ready.append(time.perf_counter() - t0)
            assert final["state"] == "done", final
            time.sleep(0.1)
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {"sealed_median_ms": statistics.median(sealed) * 1000,
            "sealed_p95_ms": pct(sealed, 0.95) * 1000,
            "ready_median_ms": statistics.median(ready) * 1000,
            "ready_p95_ms": pct(ready, 0.95) * 1000}


def idle_cpu(runs: int, idle_s: float, per_run: bool, workers: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bi-", dir="/tmp"))
    data = root / "runs"
    for i in range(runs):
        (data / f"run_{i}" / "ckpt").mkdir(parents=True)
    rules = [] if per_run else [{"path": f"{data}/*/ckpt/step-*",
                                 "run_id": f"{{{len(data.parts)}}}"}]
    d = Daemon(root, rules, workers)
    try:
        if per_run:
            for i in range(runs):
                d.client.request("POST", "/v1/runs", {  # alive while this process is:
                    "run_id": f"run_{i}",             # one pidfd per run, no heartbeats
                    "watch": [{"path": f"{data}/run_{i}/ckpt/step-*"}]})
        p = psutil.Process(d.proc.pid)
        time.sleep(5)
        t0, c0 = time.monotonic(), p.cpu_times()
        time.sleep(idle_s)
        c1, t1 = p.cpu_times(), time.monotonic()
        health = d.client.health()
        rss = p.memory_info().rss
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {"cpu_s": cpu, "window_s": t1 - t0, "cpu_percent": 100 * cpu / (t1 - t0),
            "rss_mib": rss / MiB, "rules": float(health["staging"]["rules"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1],
                    help="agent.workers for the idle daemons (0 = the default, 4); one "
                         "figure each")
    args = ap.parse_args()
    lat = latency(args.rounds)
    print(f"seal-to-ready, 1 MiB checkpoint, {args.rounds} rounds: "
          f"median {lat['ready_median_ms']:.0f} ms, p95 {lat['ready_p95_ms']:.0f} ms "
          f"(marker to queued: median {lat['sealed_median_ms']:.0f} ms, "
          f"p95 {lat['sealed_p95_ms']:.0f} ms)")
    for workers in args.workers:
        for per_run in (False, True):
            r = idle_cpu(args.runs, args.idle_s, per_run, workers)
            how = (f"{args.runs} runs registered over the socket, a rule each" if per_run
                   else f"one config rule over {args.runs} run directories")
            print(f"idle daemon (workers={workers or 'default'}), {how}: {r['cpu_s']:.2f} "
                  f"CPU-s over {r['window_s']:.0f} s ({r['cpu_percent']:.2f}% of a core), "
                  f"RSS {r['rss_mib']:.0f} MiB, {r['rules']:.0f} rule(s)")


if __name__ == "__main__":
    main()
