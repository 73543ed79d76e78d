"""How much an upload slows real training: a PyTorch loop (a tiny GPT-2 from a config, 2
layers of width 64, random weights, AdamW steps on batches of 8 × 32 random tokens; torch
2.13 on the CPU) measures its own step
rate while the daemon uploads, and alone, in alternating windows of the same run.

    .venv/bin/python benchmarks/bench_slowdown.py [--gib 4] [--pairs 16] [--window 1.5]
        [--threads all,all-but-one] [--settings default,before] [--server embedded,separate]
        [--full-upload]

Workloads (``--threads``): ``all`` = torch's intra-op threads on every core (torch's own
default: the case where any neighbour hurts most), ``all-but-one`` = one core left free.
Settings (``--settings``): ``default`` = the daemon as installed (nice 10, idle I/O class,
bulk threads SCHED_IDLE, holding back while other processes keep the CPUs busy);
``before`` = the same but with ``agent.bulk_policy = "normal"`` and
``agent.busy_cpu_fraction = 0`` (what the daemon did before it yielded); ``idle-only`` and
``cap-4MiB`` (below) take the mechanisms apart.
Server: ``embedded`` = the daemon's own local Chronicle, as a new
user runs it (its ingest is part of the daemon's CPU); ``separate`` = ``chronicle-agent
server`` as its own process (standing in for remote storage; its CPU is reported on its
own, and it is paused and resumed with the daemon).

This VM's speed drifts by 10-20% over tens of seconds, more than the effect measured. So
"alone" and "during" are adjacent windows: while an upload runs, the daemon (and a separate
server) are paused (SIGSTOP) for one window — the training's rate alone — and resumed
(SIGCONT) for the next — its rate during the upload. Each pair gives a ratio; the slowdown
printed is one minus the median ratio. CPU-s per GiB: the daemon's and the server's CPU time
over the bytes sent while they ran. ``--full-upload`` also times one whole upload of
``--gib`` GiB with training running throughout, per workload, default settings.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Daemon, Server  # noqa: E402

from agent.client import SocketClient  # noqa: E402
from agent.yielding import own_ticks  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
SETTLE_S = 0.3
"""After a resume, how long the upload gets to reach its pace again before measuring."""
TICK = os.sysconf("SC_CLK_TCK")
SETTINGS = {
    "default": {},
    "before": {"CHRONICLE_AGENT_AGENT__BULK_POLICY": "normal",
               "CHRONICLE_AGENT_AGENT__BUSY_CPU_FRACTION": "0"},
    "idle-only": {"CHRONICLE_AGENT_AGENT__BUSY_CPU_FRACTION": "0"},
    "cap-4MiB": {"CHRONICLE_AGENT_AGENT__BUSY_BYTES_PER_S": str(4 * MiB)},
    "hold-0.75": {"CHRONICLE_AGENT_AGENT__BUSY_CPU_FRACTION": "0.75"},
}
"""``idle-only``: SCHED_IDLE bulk threads without holding back; ``cap-4MiB``: holding back
at 4 MiB/s instead of 16; ``hold-0.75``: holding back only from 0.75 of the CPUs busy
instead of 0.4 (the first default: on two cores it does not hold back for one busy core)."""


def trainer(conn: Connection, threads: int) -> None:
    """A training loop. For each window length received, trains for that long and answers
    with steps per second."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=1000,
                                       n_positions=64, bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 1000, (8, 32))

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(5):
        step()
    conn.send("ready")
    while True:
        seconds = conn.recv()
        if seconds is None:
            return
        steps, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            step()
            steps += 1
        conn.send(steps / seconds)


class Trainer:
    def __init__(self, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=trainer, args=(child, threads), daemon=True)
        self.proc.start()
        assert self.conn.recv() == "ready"

    def rate(self, seconds: float) -> float:
        self.conn.send(seconds)
        value: float = self.conn.recv()
        return value

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


def pause(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, sig)


def job_bytes(client: SocketClient, job_ids: list[str]) -> int:
    return sum(int(client.get_job(j)["bytes_done"]) for j in job_ids)


def measure(trainer: Trainer, daemon: Daemon, server: Server | None, src: Path,
            pairs: int, window: float) -> dict[str, Any]:
    """Paired windows while uploads of ``src`` run (a new one when one ends)."""
    pids = [daemon.proc.pid] + ([server.proc.pid] if server else [])
    ratios: list[float] = []
    rates: list[tuple[float, float]] = []
    jobs: list[str] = []
    cpu0 = [own_ticks(p) for p in pids]
    uploads = 0
    while len(ratios) < pairs:
        job = daemon.client.request("POST", "/v1/uploads", {"path": str(src),
                                                             "asset_type": f"bench{uploads}"})
        uploads += 1
        jobs.append(job["job_id"])
        time.sleep(1.0)  # under way
        while len(ratios) < pairs:
            if daemon.client.get_job(job["job_id"])["state"] != "running":
                break
            pause(pids, signal.SIGSTOP)
            alone = trainer.rate(window)
            pause(pids, signal.SIGCONT)
            time.sleep(SETTLE_S)
            during = trainer.rate(window)
            if daemon.client.get_job(job["job_id"])["state"] != "running":
                break  # the upload ended within the window: not a full pair
            ratios.append(during / alone)
            rates.append((alone, during))
    cpu1 = [own_ticks(p) for p in pids]
    moved = job_bytes(daemon.client, jobs)
    for j in jobs:  # the rest is not measured: cancel, so the next setting starts clean
        if daemon.client.get_job(j)["state"] in ("queued", "running"):
            daemon.client.request("POST", f"/v1/jobs/{j}/cancel")
    r = sorted(ratios)
    cpu = [(b - a) / TICK for a, b in zip(cpu0, cpu1, strict=True)]
    return {"alone": statistics.median(a for a, _ in rates),
            "during": statistics.median(d for _, d in rates),
            "ratio": statistics.median(r), "q1": r[len(r) // 4], "q3": r[(3 * len(r)) // 4],
            "daemon_cpu_per_gib": cpu[0] / max(moved / GiB, 1e-9),
            "server_cpu_per_gib": cpu[1] / max(moved / GiB, 1e-9) if server else None,
            "moved_gib": moved / GiB}


def full_upload(trainer: Trainer, daemon: Daemon, src: Path, window: float
                ) -> tuple[float, float]:
    """One whole upload with training running throughout: (seconds, median steps/s)."""
    t0 = time.monotonic()
    job = daemon.client.request("POST", "/v1/uploads", {"path": str(src),
                                                         "asset_type": "bench-full"})
    rates = []
    while daemon.client.get_job(job["job_id"])["state"] in ("queued", "running"):
        rates.append(trainer.rate(window))
    final = daemon.client.get_job(job["job_id"])
    assert final["state"] == "done", final
    return time.monotonic() - t0, statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--pairs", type=int, default=16, help="alone/during pairs per case")
    ap.add_argument("--window", type=float, default=1.5, help="seconds per window")
    ap.add_argument("--threads", default="all,all-but-one")
    ap.add_argument("--settings", default="default,before")
    ap.add_argument("--server", default="embedded,separate")
    ap.add_argument("--full-upload", action="store_true")
    args = ap.parse_args()
    ncpu = len(os.sched_getaffinity(0))
    workloads = {"all": ncpu, "all-but-one": max(1, ncpu - 1)}
    root = Path(tempfile.mkdtemp(prefix="bench-slow-"))
    src = root / "ckpt.bin"
    block = os.urandom(8 * MiB)
    with open(src, "wb") as f:
        for _ in range(int(args.gib * GiB) // len(block)):
            f.write(block)
    print(f"{ncpu} CPUs; {args.pairs} pairs of {args.window:g} s windows per case; uploads of "
          f"{args.gib:g} GiB (one file)")
    print(f"{'training threads':<24}{'setting':<9}{'server':<10}{'alone':>7}{'during':>8}"
          f"{'slowdown':>10}{'IQR of ratio':>15}{'daemon CPU-s/GiB':>18}{'server CPU-s/GiB':>18}")
    try:
        for wname in args.threads.split(","):
            trainer = Trainer(workloads[wname])
            try:
                for server_mode in args.server.split(","):
                    for setting in args.settings.split(","):
                        server = Server(root) if server_mode == "separate" else None
                        env = dict(SETTINGS[setting])
                        daemon = Daemon(server, env, timeout_s=30, hold_back=True)
                        try:
                            m = measure(trainer, daemon, server, src, args.pairs, args.window)
                        finally:
                            daemon.stop()
                            if server:
                                server.stop()
                                shutil.rmtree(root / "server", ignore_errors=True)
                        srv = (f"{m['server_cpu_per_gib']:.2f}"
                               if m["server_cpu_per_gib"] is not None else "(in daemon)")
                        label = f"{wname} ({workloads[wname]})"
                        print(f"{label:<24}{setting:<9}{server_mode:<10}{m['alone']:>7.1f}"
                              f"{m['during']:>8.1f}{100 * (1 - m['ratio']):>9.1f}%"
                              f"{m['q1']:>8.3f}-{m['q3']:.3f}"
                              f"{m['daemon_cpu_per_gib']:>18.2f}{srv:>18}", flush=True)
                if args.full_upload:
                    daemon = Daemon(None, timeout_s=30, hold_back=True)
                    try:
                        secs, steps = full_upload(trainer, daemon, src, args.window)
                    finally:
                        daemon.stop()
                    print(f"  {wname}: one {args.gib:g} GiB upload with training throughout, "
                          f"default settings, embedded server: {secs:.0f} s "
                          f"({args.gib * 1024 / secs:.0f} MiB/s); training {steps:.1f} steps/s",
                          flush=True)
            finally:
                trainer.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("goals: slowdown < 5% with a core left free (all-but-one), < 10% on every core (all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
