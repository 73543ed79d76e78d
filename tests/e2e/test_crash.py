"""kill -9 of the daemon at every step of an upload, then a restart: the job completes and
Chronicle holds exactly one asset for it, byte-identical. The daemon kills itself at a named
step (``debug.crash_point``, armed on the first start only), which hits windows a timed
external kill would rarely hit."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from tests.support.helpers_daemon import start_daemon
from tests.support.helpers_e2e import (
    FAST_ENV,
    MiB,
    assert_same_tree,
    chronicle_for,
    proxied_daemon,
    write_random,
)

POINTS = [
    "before_register",
    "after_register_sent",
    "after_register",
    "after_part:2",
    "after_component:1",
    "before_finalize",
    "after_finalize_sent",
    "after_finalize",
]


def checkpoint(root: Path, big: int, small: int, size: int) -> Path:
    write_random(root / "model.bin", big)
    (root / "small").mkdir(parents=True)
    for i in range(small):
        (root / "small" / f"{i:03d}.bin").write_bytes(os.urandom(size + i))
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("crash") / "ckpt", 23 * MiB, 5, 20_000)  # 5 parts


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More small files than register declares when the rest is declared later (API 1.1
    asset_keys: 64 at register, then batches of 256 and more while those upload)."""
    return checkpoint(tmp_path_factory.mktemp("crash-many") / "ckpt", 6 * MiB, 400, 1000)


PIPELINED_POINTS = ["after_register_sent", "after_declare:1",
                    "after_component:150", "before_finalize"]


@pytest.mark.parametrize("point", PIPELINED_POINTS)
def test_kill_while_small_files_are_declared_then_restart_completes_once(
    many: Path, tmp_path: Path, point: str
) -> None:
    run_kill_and_restart(many, tmp_path, point)


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_step_then_restart_completes_once(
    src: Path, tmp_path: Path, point: str
) -> None:
    run_kill_and_restart(src, tmp_path, point)


def run_kill_and_restart(src: Path, tmp_path: Path, point: str) -> None:
    env = dict(FAST_ENV, CHRONICLE_AGENT_DEBUG__CRASH_POINT=f"{point}@1",
               CHRONICLE_AGENT_UPLOAD__CONCURRENCY="2")
    with start_daemon(env) as daemon:
        client = daemon.client()
        client.request("POST", "/v1/runs", {"run_id": "run_crash"})
        job = client.request("POST", "/v1/uploads", {
            "path": str(src), "asset_type": "checkpoint", "run_id": "run_crash"})
        assert daemon.proc is not None
        daemon.proc.wait(60)  # it kills itself at the crash point
        assert daemon.proc.returncode == -9, daemon.log_tail()
        assert f"crash point {point.split(':')[0]} reached" in daemon.log_text()
        if point == "before_finalize" and (src / "model.bin").stat().st_size > int(
                FAST_ENV["CHRONICLE_AGENT_SERVER__MULTIPART_THRESHOLD_BYTES"]):
            assert_parts_recorded(daemon.state_dir / "queue.db", src / "model.bin")
        daemon.start()  # second start: the crash point is disarmed
        final = daemon.client().wait_job(job["job_id"], 120)
        assert final["state"] == "done", (final, daemon.log_tail())
        chron = chronicle_for(daemon)
        assets = chron.assets.list(output_of="run_crash")
        assert [a.asset_id for a in assets] == [final["asset_id"]]
        assert assets[0].state == "ready"
        dest = tmp_path / "dl"
        chron.assets.download(final["asset_id"], dest)
        assert_same_tree(src, dest)


def assert_parts_recorded(queue_db: Path, big: Path) -> None:
    """Every part of ``big`` is in the queue's records with its size and its own ETag,
    read from the database itself (not only through what a restart makes of it)."""
    with contextlib.closing(sqlite3.connect(f"file:{queue_db}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT part_number, part_size, size, etag FROM parts "
                          "WHERE name = ? ORDER BY part_number", (big.name,)).fetchall()
    size = big.stat().st_size
    assert rows, "no part of the multipart component was recorded"
    part_size = rows[0][1]
    assert [r[0] for r in rows] == list(range(1, -(-size // part_size) + 1)), rows
    assert [r[2] for r in rows] == [min(part_size, size - (n - 1) * part_size)
                                    for n, *_ in rows], rows
    etags = [r[3] for r in rows]
    assert all(etags) and len(set(etags)) == len(etags), etags


def test_external_kill_mid_upload_then_restart(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "big.bin", 60 * MiB)
    env = dict(FAST_ENV, CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S=str(20 * MiB),
               CHRONICLE_AGENT_UPLOAD__CONCURRENCY="2")
    with start_daemon(env) as daemon:
        client = daemon.client()
        client.request("POST", "/v1/runs", {"run_id": "run_kill"})
        job = client.request("POST", "/v1/uploads", {
            "path": str(src), "asset_type": "checkpoint", "run_id": "run_kill"})
        deadline = time.monotonic() + 30
        while client.get_job(job["job_id"])["bytes_done"] < 15 * MiB:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        daemon.kill()
        daemon.start()
        final = daemon.client().wait_job(job["job_id"], 120)
        assert final["state"] == "done"
        chron = chronicle_for(daemon)
        assert [a.asset_id for a in chron.assets.list(output_of="run_kill")] == [
            final["asset_id"]]
        dest = tmp_path / "dl"
        chron.assets.download(final["asset_id"], dest)
        assert_same_tree(src, dest)


@pytest.mark.parametrize("point", ["after_part_sent:2", "after_part:2"])
def test_a_restart_resends_only_the_parts_in_flight(tmp_path: Path, point: str) -> None:
    """Storage acknowledged part 2; the daemon dies before (or after) storing its ETag.
    After the restart, parts acknowledged before the kill are not sent again: the ETag is
    either in the local record or adopted from Chronicle's uploads listing."""
    src = tmp_path / "src"
    write_random(src / "model.bin", 24 * MiB)  # 5 parts of 5 MiB
    env = {"CHRONICLE_AGENT_DEBUG__CRASH_POINT": f"{point}@1",
           "CHRONICLE_AGENT_UPLOAD__CONCURRENCY": "1"}
    with proxied_daemon(env) as (daemon, proxy):
        job = daemon.client().request("POST", "/v1/uploads",
                                      {"path": str(src), "asset_type": "checkpoint"})
        assert daemon.proc is not None
        daemon.proc.wait(60)
        daemon.start()
        final = daemon.client().wait_job(job["job_id"], 120)
        assert final["state"] == "done", daemon.log_tail()
        puts: dict[int, int] = {}
        for e in proxy.stats()["log"]:
            if e["method"] == "PUT":
                n = int(e["part"]) if "part" in e else 0
                puts[n] = puts.get(n, 0) + 1
        assert puts.get(1) == 1 and puts.get(2) == 1, puts  # acknowledged: never re-sent
        if point.startswith("after_part_sent"):  # part 2 came back from the listing
            assert "2 parts already in storage" in daemon.log_text(), daemon.log_tail()
        assert all(c <= 2 for c in puts.values()), puts
        assert sum(c - 1 for c in puts.values()) <= 1, puts  # concurrency 1: one in flight
        dest = tmp_path / "dl"
        chronicle_for(daemon).assets.download(final["asset_id"], dest)
        assert_same_tree(src, dest)


def test_sigterm_mid_upload_stops_promptly_and_the_restart_resumes(tmp_path: Path) -> None:
    """A graceful stop: no new work is claimed, in-flight transfers stop, the process exits
    0 within seconds, and the next start carries on without re-sending acknowledged parts."""
    src = tmp_path / "src"
    write_random(src / "model.bin", 40 * MiB)  # 8 parts of 5 MiB
    env = {"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(8 * MiB),
           "CHRONICLE_AGENT_UPLOAD__CONCURRENCY": "1"}
    with proxied_daemon(env) as (daemon, proxy):
        client = daemon.client()
        job = client.request("POST", "/v1/uploads", {"path": str(src), "asset_type": "ckpt"})
        deadline = time.monotonic() + 30
        while client.get_job(job["job_id"])["bytes_done"] < 12 * MiB:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - t0 < 10, "SIGTERM took too long"
        daemon.start()
        final = daemon.client().wait_job(job["job_id"], 120)
        assert final["state"] == "done", final
        puts: dict[int, int] = {}
        for e in proxy.stats()["log"]:
            if e["method"] == "PUT":
                puts[e["part"]] = puts.get(e["part"], 0) + 1
        assert sorted(puts) == list(range(1, 9))
        assert sum(c - 1 for c in puts.values()) <= 1, puts  # only the part in flight again
        dest = tmp_path / "dl"
        chronicle_for(daemon).assets.download(final["asset_id"], dest)
        assert_same_tree(src, dest)
