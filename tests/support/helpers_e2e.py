"""Shared pieces of the end-to-end tests: files, trees, a Chronicle client for a test
daemon's embedded server, a daemon whose storage traffic goes through a fault proxy."""

from __future__ import annotations

import filecmp
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.chronicle.sdk import Chronicle
from agent.config import load_settings
from tests.support.faultproxy import FaultProxy
from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_seaweed import Seaweed

MiB = 1024 * 1024


def write_random(path: Path, size: int) -> None:
    """Incompressible bytes, written in 8 MiB pieces (never the whole file in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def assert_same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def chronicle_for(daemon: DaemonProc, token: str | None = None) -> Chronicle:
    """A Chronicle client on the daemon's embedded server with ``token``, else the local
    user's (the daemon's own)."""
    info = json.loads((daemon.state_dir / "server" / "endpoint.json").read_text())
    if token is None:
        token = next(iter(json.loads(Path(info["tokens_file"]).read_text())["tokens"]))
    settings = load_settings(overrides={"agent": {"socket_path": str(daemon.socket_path)}})
    return Chronicle(url=info["url"], token=token, settings=settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Small parts and quick retries so that faults cost seconds, not minutes.
FAST_ENV = {
    "CHRONICLE_AGENT_SERVER__MULTIPART_THRESHOLD_BYTES": str(8 * MiB),
    "CHRONICLE_AGENT_SERVER__PART_SIZE_BYTES": str(5 * MiB),
    "CHRONICLE_AGENT_UPLOAD__BACKOFF_BASE_S": "0.05",
    "CHRONICLE_AGENT_UPLOAD__BACKOFF_MAX_S": "0.5",
    "CHRONICLE_AGENT_UPLOAD__STALL_TIMEOUT_S": "2",
}


@contextmanager
def proxied_daemon(
    extra_env: dict[str, str] | None = None, seaweed: Seaweed | None = None
) -> Iterator[tuple[DaemonProc, FaultProxy]]:
    """A daemon whose storage traffic goes through a fault proxy; Chronicle API calls go
    straight to its embedded server. Disk store: the server's presigned URLs point at the
    proxy (``server.public_url``). S3 (``seaweed``): the server's S3 endpoint is the proxy,
    which forwards to SeaweedFS with the Host header the URLs were signed for."""
    env = dict(FAST_ENV)
    if seaweed is None:
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
    else:
        upstream = seaweed.endpoint
        env.update(seaweed.env())
    with FaultProxy(upstream) as proxy:
        if seaweed is None:
            env["CHRONICLE_AGENT_SERVER__LISTEN"] = f"127.0.0.1:{port}"
            env["CHRONICLE_AGENT_SERVER__PUBLIC_URL"] = proxy.url
        else:
            env["CHRONICLE_AGENT_SERVER__STORAGE"] = (
                f"s3://{seaweed.bucket}?endpoint={proxy.url}")
        env.update(extra_env or {})
        with start_daemon(env) as d:
            yield d, proxy


def socket_call(
    socket_path: Path, method: str, path: str, body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One raw HTTP call on the daemon's socket: (status, body bytes), whatever they are."""
    status, raw, _headers = socket_exchange(socket_path, method, path, body, headers)
    return status, raw


def socket_exchange(
    socket_path: Path, method: str, path: str, body: bytes | None = None,
    headers: dict[str, str] | None = None, timeout_s: float = 30,
) -> tuple[int, bytes, dict[str, str]]:
    """:func:`socket_call`, with the answer's headers too."""
    import http.client

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(socket_path))
            self.sock = s

    conn = _Conn("localhost", timeout=timeout_s)
    try:
        sent = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers={**sent, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.headers)
    finally:
        conn.close()


def socket_get_text(socket_path: Path, path: str) -> str:
    """GET a non-JSON resource (``/metrics``) from the daemon's socket."""
    status, raw = socket_call(socket_path, "GET", path)
    assert status == 200, raw
    return raw.decode()


@contextmanager
def tiny_tmpfs(size: str = "8m") -> Iterator[Path]:
    """A size-limited tmpfs mounted for a test (we run as root), unmounted after."""
    import subprocess
    import tempfile

    import pytest

    where = Path(tempfile.mkdtemp(prefix="ca-tmpfs-", dir="/tmp"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                          str(where)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        where.rmdir()
        pytest.fail("cannot mount a size-limited tmpfs for a full-disk test (needs root "
                    f"and mount(8)): {res.stderr.strip() or res.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def fill_up(fs: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about ``leave_bytes`` free on ``fs``."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler
