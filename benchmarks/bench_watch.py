"""Watcher benchmark: seal-to-ready latency, and the CPU an idle daemon spends watching.

    .venv/bin/python benchmarks/bench_watch.py [--rounds 30] [--idle-s 60] [--runs 1000]
        [--ckpts 10] [--only marker,writers,idle]

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
3. Real writers under ``chronicle-agent exec --watch OUT --type checkpoint`` (the default
   seal rules, a fresh daemon with default settings each: nice 10, idle I/O class): the
   Hugging Face Trainer, Lightning's ModelCheckpoint, torch.distributed.checkpoint,
   ``torch.save`` + rename and safetensors written in place (``tests/support/writers/``), CKPTS
   checkpoints each, about a second apart. The clock starts when the writer's save returned
   (its own save callback logs the time) and stops at the job's ``created_at`` (sealed:
   the job is queued) and ``updated_at`` (done: the asset is ``ready``); median and p95.
   Each writer once idle and once beside two CPU burners at nice 0 (one per core), printed
   side by side.
"""

from __future__ import annotations

import argparse
import datetime
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
from tests.support.writers._common import read_saves  # noqa: E402

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


WRITERS = REPO / "tests" / "writers"


def writer_cases(n: int) -> list[tuple[str, list[str]]]:
    """Each writer's script and arguments for ``n`` checkpoints about a second apart."""
    return [
        ("HF Trainer", ["hf_train.py", "--steps", str(2 * n), "--save-steps", "2",
                        "--limit", "2", "--pause-s", "0.5"]),
        ("Lightning", ["lightning_train.py", "--epochs", str(n), "--pause-s", "0.25"]),
        ("DCP", ["dcp_save.py", "--steps", str(n), "--pause-s", "1.0"]),
        ("torch.save+rename", ["file_save.py", "--kind", "rename", "--steps", str(n),
                               "--pause-s", "1.0"]),
        ("safetensors in place", ["file_save.py", "--kind", "safetensors", "--steps", str(n),
                                  "--pause-s", "1.0"]),
    ]


def _epoch(rfc3339: str) -> float:
    return datetime.datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.UTC).timestamp()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
        else path.stat().st_size


def burners(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def writer_latency(writer: list[str], busy: bool) -> dict[str, float]:
    """One writer under ``exec`` with a fresh daemon (default settings); per checkpoint, the
    seconds from its save returning to its job queued (sealed) and done (ready)."""
    root = Path(tempfile.mkdtemp(prefix="bw-", dir="/tmp"))
    out, ref = root / "out", root / "ref"
    d = Daemon(root, [])
    spin = burners(os.cpu_count() or 2) if busy else []
    try:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CHRONICLE_AGENT_", "METHODIC_RUN_ID"))}
        env.update(PYTHONPATH=str(REPO), CHRONICLE_AGENT_SOCKET=str(root / "agent.sock"),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
        r = subprocess.run(
            [sys.executable, "-m", "agent", "exec", "--run", "run_w", "--watch", str(out),
             "--type", "checkpoint", "--", sys.executable, str(WRITERS / writer[0]),
             str(out), str(ref), *writer[1:]],
            env=env, capture_output=True, text=True, timeout=600, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{writer[0]} exited {r.returncode}: {r.stderr[-2000:]}")
        deadline = time.monotonic() + 120
        while d.client.request("GET", "/v1/runs/run_w")["state"] != "ended":
            if time.monotonic() > deadline:
                raise RuntimeError("the run did not end within 120 s")
            time.sleep(0.2)
        jobs = [j for j in d.client.list_jobs(run_id="run_w") if "checkpoint" in j]
    finally:
        for p in spin:
            p.kill()
            p.wait()
        d.stop()
    saves = read_saves(str(ref))
    sealed: list[float] = []
    ready: list[float] = []
    for j in sorted((j for j in jobs if j["state"] == "done"), key=lambda j: j["created_at"]):
        created = _epoch(j["created_at"])
        # the save it captured: the latest save of that path before the seal (a marker or
        # rename can seal a moment before the writer's callback runs: 0.5 s of slack)
        mine = [s for s in saves if s["path"] == j["checkpoint"]
                and float(str(s["t"])) <= created + 0.5]
        if mine:
            t = float(str(mine[-1]["t"]))
            sealed.append(created - t)
            ready.append(_epoch(j["updated_at"]) - t)
    size = statistics.median(_size(Path(str(s["ref"]))) for s in saves) if saves else 0
    shutil.rmtree(root, ignore_errors=True)
    if not ready:
        raise RuntimeError(f"{writer[0]}: no checkpoint became ready: {jobs}")
    return {"saves": len(saves), "done": len(ready),
            "other": sum(j["state"] != "done" for j in jobs), "size": size,
            "sealed_median_ms": statistics.median(sealed) * 1000,
            "sealed_p95_ms": pct(sealed, 0.95) * 1000,
            "ready_median_ms": statistics.median(ready) * 1000,
            "ready_p95_ms": pct(ready, 0.95) * 1000}


def writers(n: int) -> None:
    print(f"seal-to-ready per writer under exec, default rules and settings, {n} checkpoints "
          "each; ms from the writer's save returning (median / p95)")
    group = f"{'sealed (ms)':>15}{'ready (ms)':>15}{'done':>7}"
    print(f"{'':22} {'':>10} | {'idle':^37} | {'both cores busy':^37}")
    print(f"{'writer':22} {'size':>10} | {group} | {group}")
    for name, writer in writer_cases(n):
        cols = []
        size = 0.0
        for busy in (False, True):
            r = writer_latency(writer, busy)
            size = r["size"]
            done = f"{r['done']:.0f}/{r['saves']:.0f}"
            cols.append(f"{r['sealed_median_ms']:6.0f} / {r['sealed_p95_ms']:<6.0f}"
                        f"{r['ready_median_ms']:6.0f} / {r['ready_p95_ms']:<6.0f}{done:>7}")
            if r["other"]:
                cols[-1] += f" ({r['other']:.0f} not done)"
        print(f"{name:22} {size / 1024:6.0f} KiB | {cols[0]} | {cols[1]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1],
                    help="agent.workers for the idle daemons (0 = the default, 4); one "
                         "figure each")
    ap.add_argument("--ckpts", type=int, default=10,
                    help="checkpoints per real writer (section 3)")
    ap.add_argument("--only", default="marker,writers,idle",
                    help="sections to run, comma-separated: marker, writers, idle")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if "writers" in only:
        writers(args.ckpts)
    if "marker" in only:
        marker(args.rounds)
    if "idle" in only:
        idle(args)


def marker(rounds: int) -> None:
    lat = latency(rounds)
    print(f"seal-to-ready, 1 MiB checkpoint, {rounds} rounds: "
          f"median {lat['ready_median_ms']:.0f} ms, p95 {lat['ready_p95_ms']:.0f} ms "
          f"(marker to queued: median {lat['sealed_median_ms']:.0f} ms, "
          f"p95 {lat['sealed_p95_ms']:.0f} ms)")


def idle(args: argparse.Namespace) -> None:
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
