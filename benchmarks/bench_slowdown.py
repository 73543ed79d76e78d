"""How much an upload slows training: a CPU-bound stand-in for a training loop measures its
own step rate while the daemon uploads GIB GiB at full speed with its default settings
(niceness 10, idle I/O class), and alone, in alternating windows of the same run.

    .venv/bin/python benchmarks/bench_slowdown.py [--gib 4] [--pairs 24] [--nice 19]

The stand-in is pinned to CPU 0. The local Chronicle server (a separate process, its disk
store standing in for remote storage) is niced to 19 and pinned away from CPU 0 when the
machine has more than one CPU; the daemon is not pinned (it runs wherever the scheduler puts
it, as on a real node).

This VM's speed drifts by 10-20% over tens of seconds (other tenants), more than the effect
measured. So "alone" and "during" are measured in adjacent windows: while an upload runs,
the daemon and the server are paused (SIGSTOP) for one window, the stand-in's alone rate,
and resumed (SIGCONT) for the next, its rate during the upload. Each pair gives a ratio; the
slowdown printed is one minus the median ratio. ``--nice`` adds daemons with other
``agent.nice`` values, measured the same way in the same run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Daemon, Server  # noqa: E402

MiB = 1 << 20
SETTLE_S = 0.3
"""After a resume, how long the upload gets to reach full speed again before measuring."""


def stand_in(conn: Connection) -> None:
    """A training step: a fixed chunk of pure-Python arithmetic. For each window length
    received, runs steps for that long and answers with steps per second."""
    os.sched_setaffinity(0, {0})
    while True:
        seconds = conn.recv()
        if seconds is None:
            return
        steps, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            x = 0
            for i in range(20_000):
                x += i * i % 7
            steps += 1
        conn.send(steps / seconds)


class StandIn:
    def __init__(self) -> None:
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=stand_in, args=(child,), daemon=True)
        self.proc.start()

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--pairs", type=int, default=24,
                    help="alone/during window pairs per setting")
    ap.add_argument("--window", type=float, default=1.5, help="seconds per window")
    ap.add_argument("--nice", default="",
                    help="also measure with these agent.nice values, side by side (e.g. 19)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-slow-"))
    servers: list[Server] = []
    daemons: list[Daemon] = []
    try:
        src = root / "ckpt"
        src.mkdir()
        block = os.urandom(8 * MiB)
        per_file = int(args.gib * 1024 * MiB / 4)
        for i in range(4):
            with open(src / f"shard-{i}.bin", "wb") as f:
                for _ in range(per_file // len(block)):
                    f.write(block)
        away = "1" if (os.cpu_count() or 1) > 1 else "0"
        server = Server(root, prefix=["taskset", "-c", away, "nice", "-n", "19"])
        servers.append(server)
        settings = [None] + [int(n) for n in args.nice.split(",") if n] if args.nice else [None]
        daemons += [Daemon(server, {} if n is None else {"CHRONICLE_AGENT_AGENT__NICE": str(n)})
                    for n in settings]
        stand = StandIn()
        ratios: dict[int | None, list[float]] = {n: [] for n in settings}
        rates: dict[int | None, list[tuple[float, float]]] = {n: [] for n in settings}
        uploaded = 0
        try:
            while any(len(r) < args.pairs for r in ratios.values()):
                for nice, daemon in zip(settings, daemons, strict=True):
                    if len(ratios[nice]) >= args.pairs:
                        continue
                    job = daemon.client.request("POST", "/v1/uploads", {
                        "path": str(src), "asset_type": f"bench{uploaded}"})
                    uploaded += 1
                    pids = [daemon.proc.pid, server.proc.pid]
                    time.sleep(1.0)  # full speed
                    while len(ratios[nice]) < args.pairs:
                        if daemon.client.get_job(job["job_id"])["state"] != "running":
                            break
                        pause(pids, signal.SIGSTOP)
                        alone = stand.rate(args.window)
                        pause(pids, signal.SIGCONT)
                        time.sleep(SETTLE_S)
                        during = stand.rate(args.window)
                        if daemon.client.get_job(job["job_id"])["state"] != "running":
                            break  # the upload ended within the window: not a full pair
                        ratios[nice].append(during / alone)
                        rates[nice].append((alone, during))
                    final = daemon.client.wait_job(job["job_id"], 900)
                    assert final["state"] == "done", final
        finally:
            stand.close()
        print(f"{args.pairs} pairs of {args.window:g} s windows per setting, {uploaded} uploads "
              f"of {args.gib:g} GiB")
        for nice in settings:
            label = "default settings" if nice is None else f"agent.nice = {nice}"
            alone_med = statistics.median(a for a, _ in rates[nice])
            during_med = statistics.median(d for _, d in rates[nice])
            r = sorted(ratios[nice])
            q1, q3 = r[len(r) // 4], r[(3 * len(r)) // 4]
            print(f"{label}: alone {alone_med:.1f} steps/s, during the upload {during_med:.1f} "
                  f"steps/s; median ratio {statistics.median(r):.3f} (IQR {q1:.3f}-{q3:.3f}): "
                  f"slowdown {100 * (1 - statistics.median(r)):.1f}% (goal < 5%)")
    finally:
        for d in daemons:
            d.stop()
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
