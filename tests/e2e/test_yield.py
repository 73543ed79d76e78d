"""The daemon keeps out of training's way: its transfer threads run under the scheduling
policy it claims, it holds back while other processes keep the CPUs busy and lets go after,
and the progress floor still finishes an upload on a machine busy to the last cycle. Real
daemons, real CPU burners, the kernel's own view of the threads (/proc)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.priority import thread_policy
from agent.yielding import own_ticks
from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_e2e import socket_get_text
from tests.support.helpers_watch import wait_until

MiB = 1024 * 1024


@contextmanager
def burners(n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` processes spinning at nice 0, as training's threads do."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def policy_cpu(pid: int) -> dict[str, int]:
    """CPU ticks the daemon's threads used so far, by their scheduling policy."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            pol = thread_policy(int(tid), pid)
            ticks = own_ticks(f"{pid}/task/{tid}")
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        out[pol] = out.get(pol, 0) + ticks
    return out


def upload(d: DaemonProc, path: Path) -> str:
    job = d.client().request("POST", "/v1/uploads", {"path": str(path),
                                                       "asset_type": "checkpoint"})
    return str(job["job_id"])


def big_file(tmp_path: Path, size: int) -> Path:
    p = tmp_path / "ckpt.bin"
    with open(p, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB))
    return p


def test_transfer_threads_run_under_the_policy_the_daemon_claims(tmp_path: Path) -> None:
    """The hashing and reading of an upload (and the embedded server's hashing and writing
    of what it receives) run in SCHED_IDLE threads; the event loop's thread does not. With
    agent.bulk_policy = "normal" no thread of the daemon is SCHED_IDLE."""
    src = big_file(tmp_path, 256 * MiB)
    for policy in ("idle", "normal"):
        with start_daemon({"CHRONICLE_AGENT_AGENT__BULK_POLICY": policy}) as d:
            pid = int(d.client().request("GET", "/v1/health")["pid"])
            assert thread_policy(pid, pid) == "normal"  # the event loop: never idle
            before = policy_cpu(pid)
            seen: set[str] = set()
            stop = threading.Event()

            def sample(pid: int = pid, stop: threading.Event = stop,
                       seen: set[str] = seen) -> None:
                while not stop.is_set():
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        try:
                            seen.add(thread_policy(int(tid), pid))
                        except (OSError, IndexError):
                            pass
                    time.sleep(0.01)

            t = threading.Thread(target=sample)
            t.start()
            try:
                job = d.client().wait_job(upload(d, src), timeout_s=120)
            finally:
                stop.set()
                t.join()
            assert job["state"] == "done", job
            used = policy_cpu(pid)
            idle_ticks = used.get("idle", 0) - before.get("idle", 0)
            health = d.client().request("GET", "/v1/health")
            assert health["yield"]["bulk_policy"] == policy
            if policy == "idle":
                assert "idle" in seen
                # the 256 MiB were hashed twice (daemon, server): that CPU was idle-class
                assert idle_ticks >= 10, (before, used)
            else:
                assert "idle" not in seen and idle_ticks == 0, (seen, used)


def test_holding_back_engages_under_cpu_load_and_releases_after(tmp_path: Path) -> None:
    """Two spinning processes on this machine's CPUs: the daemon holds back (status,
    /metrics, the transfer cap) within a few looks, and lets go once they stop."""
    env = {"CHRONICLE_AGENT_AGENT__BUSY_CHECK_S": "0.2",
           "CHRONICLE_AGENT_AGENT__BUSY_BYTES_PER_S": str(8 * MiB),
           "CHRONICLE_AGENT_AGENT__BUSY_CPU_FRACTION": "0.4"}  # the default
    cpus = len(os.sched_getaffinity(0))
    with start_daemon(env) as d:
        def health() -> dict[str, object]:
            return dict(d.client().request("GET", "/v1/health")["yield"])

        with burners(cpus):
            held = wait_until(lambda: (h := health())["holding_back"] and h, 20, "holding back")
            assert held["rate_cap_bytes_per_s"] == 8 * MiB
            assert "other processes use" in str(held["reason"])
            assert float(str(held["others_cpu"])) >= 0.4 * cpus
            assert "chronicle_agent_holding_back 1" in socket_get_text(d.socket_path,
                                                                       "/metrics")
            status = d.run_cli("status")
            assert "holding back: other processes use" in status.stdout, status
        wait_until(lambda: not health()["holding_back"], 30, "released")
        assert health()["rate_cap_bytes_per_s"] == 0  # no cap configured: none again
        assert "chronicle_agent_holding_back 0" in socket_get_text(d.socket_path, "/metrics")
        log = d.log_text()
        assert "holding back: other processes use" in log
        assert "no longer holding back" in log


def test_the_progress_floor_completes_an_upload_on_a_fully_busy_machine(
        tmp_path: Path) -> None:
    """Twice as many spinning processes as CPUs and the daemon at nice 19: its idle threads
    get next to nothing, so the progress floor lets them stop yielding, and the upload
    finishes: its parts, and the finalize, where the embedded server hashes the assembled
    object (work that moves no transfer bytes, in short calls the floor can boost); the
    floor lets go after."""
    src = big_file(tmp_path, 12 * MiB)  # three parts
    env = {"CHRONICLE_AGENT_SERVER__MULTIPART_THRESHOLD_BYTES": str(8 * MiB),
           "CHRONICLE_AGENT_SERVER__PART_SIZE_BYTES": str(5 * MiB),
           "CHRONICLE_AGENT_AGENT__BUSY_CHECK_S": "0.2",
           "CHRONICLE_AGENT_AGENT__BUSY_BYTES_PER_S": str(16 * MiB),
           "CHRONICLE_AGENT_AGENT__BUSY_CPU_FRACTION": "0.4",
           "CHRONICLE_AGENT_AGENT__NICE": "19"}
    with start_daemon(env) as d, burners(2 * len(os.sched_getaffinity(0))):
        wait_until(lambda: d.client().request("GET", "/v1/health")["yield"]["holding_back"],
                   20, "holding back")
        job = d.client().wait_job(upload(d, src), timeout_s=240)
        assert job["state"] == "done", job
        log = d.log_text()
        assert "progress floor: transfers moved under" in log, log[-3000:]
        wait_until(lambda: not d.client().request("GET", "/v1/health")["yield"]["floor_boost"],
                   20, "the floor let go")


def test_agent_cpus_pins_every_thread_and_a_cpu_it_may_not_use_is_refused(
        tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    with start_daemon({"CHRONICLE_AGENT_AGENT__CPUS": f"[{allowed[-1]}]"}) as d:
        pid = int(d.client().request("GET", "/v1/health")["pid"])
        d.client().wait_job(upload(d, big_file(tmp_path, 8 * MiB)), timeout_s=60)
        for tid in os.listdir(f"/proc/{pid}/task"):
            assert os.sched_getaffinity(int(tid)) == {allowed[-1]}
    r = subprocess.run([sys.executable, "-m", "agent", "daemon"], capture_output=True,
                       text=True, timeout=60,
                       env=d.env | {"CHRONICLE_AGENT_AGENT__CPUS": "[4096]"})
    assert r.returncode != 0
    assert "agent.cpus = [4096]: this process may only use CPUs" in r.stderr, r.stderr
