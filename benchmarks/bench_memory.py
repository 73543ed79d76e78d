"""The daemon's memory: its peak RSS (VmHWM) idle, while uploading a directory of many small
files, and while uploading one large file, each from a fresh daemon against the local
server (its own process, disk store).

    .venv/bin/python benchmarks/bench_memory.py [--small-count 1000] [--small-kib 1024]
        [--large-gib 2] [--bandwidth-mib M] [--compare CHECKOUT]

``--compare CHECKOUT`` runs the same uploads with the ``agent`` package of another checkout
(e.g. a ``git worktree`` of an older commit) side by side, in the same run, and prints the
ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, Daemon, Server  # noqa: E402

MiB = 1 << 20


def upload_peak(server: Server, repo: Path, path: Path,
                env: dict[str, str]) -> tuple[float, float, float]:
    """(idle RSS MiB, peak RSS MiB, wall s) of a fresh daemon uploading ``path``."""
    d = Daemon(server, env, repo=repo)
    try:
        time.sleep(0.5)
        idle = d.peak_rss_mb()
        t0 = time.monotonic()
        job = d.client.request("POST", "/v1/uploads", {"path": str(path),
                                                       "asset_type": "bench"})
        final = d.client.wait_job(job["job_id"], 1800)
        assert final["state"] == "done", final
        return idle, d.peak_rss_mb(), time.monotonic() - t0
    finally:
        d.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-count", type=int, default=1000)
    ap.add_argument("--small-kib", type=int, default=1024)
    ap.add_argument("--large-gib", type=float, default=2.0)
    ap.add_argument("--compare", type=Path, default=None)
    ap.add_argument("--bandwidth-mib", type=float, default=0,
                    help="upload.bandwidth_limit_bytes_per_s, in MiB/s (a slow uplink: reading "
                         "can outrun sending)")
    args = ap.parse_args()
    env = ({"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S":
            str(int(args.bandwidth_mib * MiB))} if args.bandwidth_mib else {})
    root = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    server = Server(root, prefix=["nice", "-n", "5"])
    try:
        small = root / "small"
        small.mkdir()
        for i in range(args.small_count):
            (small / f"f{i:05d}.bin").write_bytes(os.urandom(args.small_kib * 1024))
        large = root / "large.bin"
        block = os.urandom(8 * MiB)
        with open(large, "wb") as f:
            for _ in range(int(args.large_gib * 1024 * MiB) // len(block)):
                f.write(block)
        repos = {"this checkout": REPO}
        if args.compare is not None:
            repos["compared"] = args.compare.resolve()
        cases = {f"{args.small_count} x {args.small_kib} KiB": small,
                 f"1 x {args.large_gib:g} GiB": large}
        peaks: dict[tuple[str, str], float] = {}
        for case, path in cases.items():
            for name, repo in repos.items():
                idle, peak, wall = upload_peak(server, repo, path, env)
                peaks[(case, name)] = peak
                print(f"{case:<20} {name:<14} idle {idle:6.1f} MiB  peak {peak:7.1f} MiB  "
                      f"wall {wall:6.1f} s")
        if args.compare is not None:
            for case in cases:
                print(f"{case}: peak RSS, this checkout / compared = "
                      f"{peaks[(case, 'this checkout')] / peaks[(case, 'compared')]:.2f}")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
