"""The local server's cost of receiving bytes (issue 12): CPU-seconds per GiB that the
disk store spends on presigned PUTs over loopback, beside one SHA-256 pass over the same
bytes.

    .venv/bin/python benchmarks/bench_server_ingest.py [--gib 2] [--part-mib 64,1024]
        [--rounds 3] [--daemon] [--compare OTHER_CHECKOUT]

One ``chronicle-agent server`` process (disk store, its own state dir, not niced). Each
round, for each part size: one asset whose components are GIB / part-size single-PUT
objects, all PUT one after another on one keep-alive connection, then abandoned (its bytes
removed). Then one component of the same total size that the server plans as a multipart
upload (its default part size), its parts PUT in order, then finalized (the disk store
writes each part at its place in one file; the finalize hashes that file once and renames
it into place; before issue 12 it copied the parts into one object and hashed it again):
the server's share of the daemon's path (the finalize's own CPU and wall are printed
apart), then deleted.

The client is a raw socket that sends each body with ``sendfile(2)`` from a file in the
page cache, so it costs next to nothing itself (its CPU is printed too). Measured: the
server process's CPU (user+sys of all its threads, from ``/proc/<pid>/stat``) from the
first request line to the last answer, and the wall time; per GiB, medians over rounds.
Each round also times one SHA-256 pass over the same file, from the page cache:
``sha256sum`` (coreutils' own code) and ``openssl dgst -sha256`` (what Python's hashlib
runs; it uses the CPU's SHA extensions where there are some). CPU from ``wait4``.

``--daemon``: also a fresh ``chronicle-agent daemon`` uploading the same file
(``chronicle-agent upload FILE --type checkpoint --wait``): the daemon's CPU (from
``/proc``, its start-up not counted) and the server's meanwhile (finalize included).
``--compare``: a second server running another checkout's ``agent`` package, interleaved
with this one (which goes first alternates), for before/after figures in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, Daemon, Server  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")
REFERENCES = {"sha256sum": ["sha256sum"], "openssl dgst -sha256": ["openssl", "dgst", "-sha256"]}
"""One SHA-256 pass over the file: coreutils' own code, and OpenSSL's (what hashlib runs;
it uses the CPU's SHA extensions where there are some)."""


def proc_cpu(pid: int) -> float:
    """User + system CPU-seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def make_file(path: Path, size: int) -> None:
    block = os.urandom(8 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def api(server: Server, method: str, path: str, body: object = None) -> dict[str, object]:
    req = urllib.request.Request(
        server.url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {server.token}",
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        raw = r.read()
    return json.loads(raw) if raw else {}


class Conn:
    """An HTTP/1.1 connection that PUTs file ranges with sendfile(2), kept alive unless the
    server says ``Connection: close`` (then a new one)."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.host = u.netloc
        self.address = (u.hostname, u.port)
        self.etag = ""
        self.connect()

    def connect(self) -> None:
        self.sock = socket.create_connection(self.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")

    def put(self, url: str, fd: int, offset: int, count: int) -> tuple[int, bytes]:
        u = urlsplit(url)
        head = (f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Length: {count}\r\nContent-Type: application/octet-stream\r\n\r\n")
        self.sock.sendall(head.encode())
        end = offset + count
        while offset < end:
            offset += os.sendfile(self.sock.fileno(), fd, offset, end - offset)
        status = int(self.rfile.readline().split()[1])
        length, close = 0, False
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
            elif k.lower() == "etag":
                self.etag = v.strip()
            elif k.lower() == "connection":
                close = v.strip().lower() == "close"
        body = self.rfile.read(length)
        if close:  # the server reads large bodies from the socket itself, then hangs up
            self.close()
            self.connect()
        return status, body

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def ingest_round(server: Server, src: Path, size: int, part: int) -> dict[str, float]:
    names = [f"p{i:04d}" for i in range(-(-size // part))]
    reg = api(server, "POST", "/v1/assets", {"asset_type": "bench", "components": names})
    urls = reg["upload_urls"]
    assert isinstance(urls, dict) and set(urls) == set(names), reg
    conn = Conn(server.url)
    fd = os.open(src, os.O_RDONLY)
    try:
        cpu0, me0, t0 = proc_cpu(server.proc.pid), self_cpu(), time.perf_counter()
        for i, name in enumerate(names):
            off = i * part
            status, body = conn.put(urls[name], fd, off, min(part, size - off))
            assert status == 200, (status, body)
        wall = time.perf_counter() - t0
        cpu, me = proc_cpu(server.proc.pid) - cpu0, self_cpu() - me0
    finally:
        os.close(fd)
        conn.close()
    api(server, "POST", f"/v1/assets/{reg['asset_id']}/abandon", {})
    return {"wall_s": wall, "cpu_s": cpu, "client_cpu_s": me}


def multipart_round(server: Server, src: Path, size: int) -> dict[str, float]:
    """One component of ``size`` bytes, planned by the server as a multipart upload (its
    default part size), its parts PUT in order, then finalized: the daemon's path without
    the daemon. CPU and wall of the PUTs and of the finalize (which assembles the parts)."""
    reg = api(server, "POST", "/v1/assets",
              {"asset_type": "bench", "components": [{"name": "big", "size": size}]})
    mp = reg["multipart"]["big"]  # type: ignore[index]
    part = mp["part_size"]
    conn = Conn(server.url)
    fd = os.open(src, os.O_RDONLY)
    etags = []
    try:
        cpu0, me0, t0 = proc_cpu(server.proc.pid), self_cpu(), time.perf_counter()
        for p in mp["parts"]:
            off = (p["part_number"] - 1) * part
            status, body = conn.put(p["url"], fd, off, min(part, size - off))
            assert status == 200, (status, body)
            etags.append({"part_number": p["part_number"], "etag": conn.etag})
        wall = time.perf_counter() - t0
        cpu, me = proc_cpu(server.proc.pid) - cpu0, self_cpu() - me0
    finally:
        os.close(fd)
        conn.close()
    cpu0, t0 = proc_cpu(server.proc.pid), time.perf_counter()
    api(server, "POST", f"/v1/assets/{reg['asset_id']}/finalize",
        {"components": {"big": {"size": size, "parts": etags}}})
    fin_wall, fin_cpu = time.perf_counter() - t0, proc_cpu(server.proc.pid) - cpu0
    api(server, "DELETE", f"/v1/assets/{reg['asset_id']}")
    return {"wall_s": wall + fin_wall, "cpu_s": cpu + fin_cpu, "client_cpu_s": me,
            "finalize_s": fin_wall, "finalize_cpu_s": fin_cpu, "part_mib": part / MiB}


def hash_round(cmd: list[str], src: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    p = subprocess.Popen([*cmd, str(src)], stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0
    return {"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime}


def daemon_round(server: Server, src: Path) -> dict[str, float]:
    daemon = Daemon(server)
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO),
                   CHRONICLE_AGENT_SOCKET=str(daemon.dir / "a.sock"),
                   XDG_CONFIG_HOME=str(daemon.dir / "cfg"))
        cpu0, srv0, t0 = (proc_cpu(daemon.proc.pid), proc_cpu(server.proc.pid),
                          time.perf_counter())
        subprocess.run([sys.executable, "-m", "agent", "upload", str(src), "--type",
                        "checkpoint", "--wait"], env=env, cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        cpu, srv = proc_cpu(daemon.proc.pid) - cpu0, proc_cpu(server.proc.pid) - srv0
    finally:
        daemon.stop()
    return {"wall_s": wall, "cpu_s": cpu, "server_cpu_s": srv}


def report(rows: dict[str, list[dict[str, float]]], size: int, rounds: int) -> None:
    gib = size / GiB
    print(f"\n== {gib:g} GiB per round, median of {rounds} ==")
    width = max(len(k) for k in rows)
    print(f"{'':{width}} {'CPU s/GiB':>10} {'(min-max)':>13} {'MB/s':>7}  other")
    refs = {k: statistics.median(r["cpu_s"] for r in rows[k]) / gib for k in REFERENCES}
    for label, rs in rows.items():
        per = sorted(r["cpu_s"] / gib for r in rs)
        wall = statistics.median(r["wall_s"] for r in rs)
        other = ""
        if "client_cpu_s" in rs[0]:
            other = f"client {statistics.median(r['client_cpu_s'] for r in rs) / gib:.2f}"
        if "finalize_cpu_s" in rs[0]:
            other = (f"{rs[0]['part_mib']:g} MiB parts; finalize "
                     f"{statistics.median(r['finalize_cpu_s'] for r in rs) / gib:.2f} CPU s/GiB, "
                     f"{statistics.median(r['finalize_s'] for r in rs):.2f} s; " + other)
        elif "server_cpu_s" in rs[0]:
            other = f"server {statistics.median(r['server_cpu_s'] for r in rs) / gib:.2f}"
        spread = f"({per[0]:.2f}-{per[-1]:.2f})"
        print(f"{label:{width}} {statistics.median(per):10.2f} {spread:>13} "
              f"{size / wall / 1e6:7.0f}  {other}")
    for label, rs in rows.items():
        if label not in refs:
            cpu = statistics.median(r["cpu_s"] for r in rs) / gib
            print(f"{label}: " + ", ".join(f"{cpu / v:.2f}x {k}" for k, v in refs.items()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0, help="bytes PUT per round (GiB)")
    ap.add_argument("--part-mib", default="64,1024", help="part sizes, comma-separated (MiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--daemon", action="store_true", help="also the daemon's upload, per round")
    ap.add_argument("--compare", type=Path, metavar="CHECKOUT",
                    help="also a server running another checkout's agent package, interleaved")
    args = ap.parse_args()
    size = int(args.gib * GiB)
    parts = [int(float(p) * MiB) for p in args.part_mib.split(",")]
    if shutil.disk_usage(tempfile.gettempdir()).free < 2.5 * size:
        print("not enough free space in the temp dir", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    rows: dict[str, list[dict[str, float]]] = {}
    servers: dict[str, Server] = {}
    try:
        src = root / "src.bin"
        make_file(src, size)
        servers["server"] = Server(root / "this")
        if args.compare:
            servers["compared"] = Server(root / "compared", repo=args.compare.resolve())
        for r in range(args.rounds):  # interleaved, so drift hits every column alike
            order = list(servers.items())
            for name, server in order[::-1] if r % 2 else order:  # who goes first alternates
                for part in parts:
                    label = f"{name}, {part // MiB} MiB PUTs"
                    rows.setdefault(label, []).append(ingest_round(server, src, size, part))
                rows.setdefault(f"{name}, multipart+finalize", []).append(
                    multipart_round(server, src, size))
            for label, cmd in REFERENCES.items():
                rows.setdefault(label, []).append(hash_round(cmd, src))
            if args.daemon:
                for name, server in servers.items():
                    label = f"daemon upload ({name})" if args.compare else "daemon upload"
                    rows.setdefault(label, []).append(daemon_round(server, src))
            print(f"round {r + 1}: " + "  ".join(
                f"{k} {v[-1]['cpu_s'] / args.gib:.2f}" for k, v in rows.items())
                + "  (CPU s/GiB)", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    report(rows, size, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
