"""How much an upload slows training: a CPU-bound stand-in for a training loop measures its
own step rate alone, then while the daemon uploads GIB GiB at full speed with its default
settings (niceness 10, idle I/O class), in the same run.

    .venv/bin/python benchmarks/bench_slowdown.py [--gib 4] [--rounds 3]

The stand-in is pinned to CPU 0. The local Chronicle server (a separate process, its disk
store standing in for remote storage) is niced to 19 and pinned away from CPU 0 when the
machine has more than one CPU; the daemon is not pinned (it runs wherever the scheduler puts
it, as on a real node). Prints steps/s alone and during the upload, and the slowdown.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Daemon, Server  # noqa: E402

MiB = 1 << 20


def stand_in(seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """A training step: a fixed chunk of pure-Python arithmetic; reports steps per second."""
    os.sched_setaffinity(0, {0})
    steps, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = 0
        for i in range(20_000):
            x += i * i % 7
        steps += 1
    out.put(steps / seconds)


def measure(seconds: float) -> float:
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    p = mp.Process(target=stand_in, args=(seconds, q))
    p.start()
    rate: float = q.get()
    p.join()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
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
        daemon = Daemon(server)
        daemons.append(daemon)
        client = daemon.client
        alone, busy = [], []
        for r in range(args.rounds):
            alone.append(measure(args.seconds))
            job = client.request("POST", "/v1/uploads", {"path": str(src),
                                                         "asset_type": f"bench{r}"})
            time.sleep(1.0)  # let the upload reach full speed
            busy.append(measure(args.seconds))
            state = client.get_job(job["job_id"])
            final = client.wait_job(job["job_id"], 900)
            assert final["state"] == "done", final
            print(f"round {r + 1}: alone {alone[-1]:.1f} steps/s, during the upload "
                  f"{busy[-1]:.1f} steps/s (upload {state['bytes_done'] / MiB:.0f} MiB in "
                  "at the end of the measurement)")
        a, b = statistics.median(alone), statistics.median(busy)
        print(f"\nmedian of {args.rounds}: alone {a:.1f} steps/s, during a {args.gib:g} GiB "
              f"upload {b:.1f} steps/s: slowdown {100 * (1 - b / a):.1f}% (goal < 5%)")
    finally:
        for d in daemons:
            d.stop()
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
