"""Runs end to end: liveness by pidfd and by lease, what a dead run leaves behind is
settled within 2 s, runs survive a daemon restart, and the training process never waits."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from agent.chronicle import contract
from agent.queue.schema import _V1, SCHEMA_VERSION
from agent.queue.store import JobKind, Queue
from tests.support.helpers_e2e import chronicle_for
from tests.support.helpers_server import add_principal
from tests.support.helpers_watch import (
    by_checkpoint,
    daemon_run,
    run_script,
    run_status,
    script,
    spawn_script,
    wait_jobs_terminal,
    wait_until,
    watch_daemon,
    writer_env,
)

MiB = 1024 * 1024

KILLED_WRITER = """
    import os, random, sys, time
    from agent.client import SocketClient
    out, run_id = sys.argv[1], sys.argv[2]
    SocketClient().request("POST", "/v1/runs", {"run_id": run_id, "watch": [
        {"path": out + "/step-*", "quiescence_s": 0.5}]})  # default seals, short quiescence
    for step in (1, 2):
        d = os.path.join(out, f"step-{step}")
        os.makedirs(d)
        with open(os.path.join(d, "a.bin"), "wb") as f:
            f.write(random.Random(step).randbytes(1_000_000))
        if step == 1:
            open(os.path.join(d, "_SUCCESS"), "w").close()
            time.sleep(0.3)
    print("halfway", flush=True)  # step-2 has its first shard, not its marker
    time.sleep(60)
"""


def test_writer_killed_halfway_through_a_checkpoint(tmp_path: Path) -> None:
    """kill -9 of the writer while step-2 is half written: step-2 never becomes an asset
    (an abandoned job within 2 s), step-1 (sealed) still uploads and is ready, and only
    then is the run ended on Chronicle as crashed."""
    out = tmp_path / "out"
    out.mkdir()
    writer = script(tmp_path, "killed.py", KILLED_WRITER)
    env = {"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(MiB // 2)}
    with watch_daemon(extra_env=env) as d:
        proc = spawn_script(writer, str(out), "run_k9", env=writer_env(d))
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "halfway"
            time.sleep(1.0)  # longer than quiescence_s: step-2 still must not seal
            assert daemon_run(d, "run_k9")["pid"] == proc.pid
            os.kill(proc.pid, signal.SIGKILL)
            killed = time.monotonic()
        finally:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()
        chron = chronicle_for(d)

        def step2_abandoned() -> dict[str, object] | None:
            js = by_checkpoint(d, "run_k9").get(str(out / "step-2"), [])
            return js[0] if js and js[0]["state"] == "abandoned" else None
        j2 = wait_until(step2_abandoned, 5, "step-2 abandoned")
        assert time.monotonic() - killed < 2.0
        assert j2["error"]["code"] == "not_sealed"  # type: ignore[index]
        assert j2["asset_id"] is None
        statuses = []

        def step1_done() -> bool:
            statuses.append(run_status(chron, "run_k9"))
            [j1] = by_checkpoint(d, "run_k9")[str(out / "step-1")]
            return bool(j1["state"] == "done")
        wait_until(step1_done, 30, "step-1 uploaded", every_s=0.1)
        assert "crashed" not in statuses[:-1], statuses  # never ended while it uploaded
        wait_until(lambda: run_status(chron, "run_k9") == "crashed", 10, "run ended crashed")
        assets = chron.assets.list(output_of="run_k9")
        assert [a.state for a in assets] == ["ready"]
        assert daemon_run(d, "run_k9")["state"] == "ended"
        assert "run run_k9 crashed" in d.log_text()


PRESIGNED_WRITER = """
    import os, sys
    from agent import Run
    src = sys.argv[1]
    run = Run("run_pres", heartbeat_interval_s=None)
    a = run.create_asset_presigned("checkpoint", ["x.bin", "y.bin"])  # never finalized
    run.upload_component(name="x.bin", asset_id=a.asset_id, local_path=src).wait(30)
    b = run.create_asset_presigned("report", ["z.bin"])
    run.upload_component(name="z.bin", asset_id=b.asset_id, local_path=src)
    run.finalize_asset(b.asset_id)  # the daemon finishes this one after the exit
    print(a.asset_id, b.asset_id, flush=True)
    os._exit(0)  # exits without finish: counts as crashed
"""


@pytest.mark.parametrize("token", ["daemon's", "caller's"])
def test_dead_run_abandons_unfinalized_presigned_assets(tmp_path: Path, token: str) -> None:
    """… also when the run and its assets were made with the caller's own token (private
    assets the daemon's principal may not even read): the daemon abandons them with it."""
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(6 * MiB))  # b's upload: 3 s at the limit, outlasting a's abandon
    writer = script(tmp_path, "pres.py", PRESIGNED_WRITER)
    env = {"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(2 * MiB)}
    with watch_daemon(extra_env=env) as d:
        w_env, caller = writer_env(d), None
        if token == "caller's":
            info = json.loads((d.state_dir / "server" / "endpoint.json").read_text())
            caller = add_principal(Path(info["tokens_file"]), "user_alice")
            w_env["CHRONICLE_AGENT_CHRONICLE__TOKEN"] = caller
        r = run_script(writer, str(src), env=w_env)
        exited = time.monotonic()
        assert r.returncode == 0, r.stderr
        a_id, b_id = r.stdout.split()
        chron = chronicle_for(d, caller)
        if caller is not None:
            assert chron.assets.get(a_id).created_by == "user_alice"
        a = wait_until(lambda: (x := chron.assets.get(a_id)).state == "abandoned" and x,
                       5, "a abandoned")
        assert time.monotonic() - exited < 2.0
        # the daemon's doing, not the server's at the run's end: b still uploads, the run
        # has not ended
        assert run_status(chron, "run_pres") == "running"
        assert chron.assets.get(b_id).state == "pending"
        assert a.abandoned_reason == "run run_pres ended (crashed) without finalizing it", a
        wait_until(lambda: chron.assets.get(b_id).state == "ready", 30, "b ready")
        wait_until(lambda: run_status(chron, "run_pres") == "crashed", 10, "run crashed")


FINALIZED_ELSEWHERE_WRITER = """
    import os, sys, time
    from agent import Run
    src, go = sys.argv[1], sys.argv[2]
    run = Run("run_raced", heartbeat_interval_s=None)
    a = run.create_asset_presigned("checkpoint", ["x.bin"])  # finalized by someone else
    run.upload_component(name="x.bin", asset_id=a.asset_id, local_path=src).wait(30)
    print(a.asset_id, flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
    os._exit(0)  # dies without finish and without finalizing: its end abandons the asset
"""


def test_an_asset_finalized_before_the_runs_end_abandons_it_stays_ready(
        tmp_path: Path) -> None:
    """The dead run's unfinalized asset was finalized on Chronicle meanwhile (another
    uploader of it, or a finalize that raced the abandon): Chronicle refuses the abandon,
    and the daemon's record of the asset stays what it was, not abandoned."""
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(200_000))
    go = tmp_path / "go"
    writer = script(tmp_path, "raced.py", FINALIZED_ELSEWHERE_WRITER)
    with watch_daemon() as d:
        with spawn_script(writer, str(src), str(go), env=writer_env(d)) as proc:
            assert proc.stdout is not None
            asset_id = proc.stdout.readline().strip()
            chron = chronicle_for(d)
            assert chron.send(contract.finalize(asset_id, {})).state == "ready"
            go.touch()
            assert proc.wait(30) == 0
        wait_until(lambda: "it was finalized first" in d.log_text(), 10, "the refused abandon")
        assert chron.assets.get(asset_id).state == "ready"
        with contextlib.closing(sqlite3.connect(f"file:{d.state_dir / 'queue.db'}?mode=ro",
                                                uri=True)) as db:
            states = [r[0] for r in db.execute("SELECT state FROM assets WHERE asset_id = ?",
                                               (asset_id,))]
        assert states and "abandoned" not in states, states


def test_lease_expiry_and_on_exit_abandon(tmp_path: Path) -> None:
    """A run registered with a lease (a caller in another pid namespace) dies when its
    heartbeats stop; with on_exit = abandon its sealed checkpoint is abandoned too."""
    out = tmp_path / "out"
    (out / "done-1").mkdir(parents=True)
    env = {"CHRONICLE_AGENT_RUNS__LEASE_S": "1",
           "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(MiB // 4)}
    with watch_daemon(extra_env=env) as d:
        c = d.client()
        run = c.request("POST", "/v1/runs", {
            "run_id": "run_lease", "lease": True, "on_exit": "abandon",
            "watch": [{"path": f"{out}/*", "seal": ["marker"]}]})
        assert run["liveness"] == "lease" and run["pid"] is None and run["lease_s"] == 1
        (out / "done-1" / "w.bin").write_bytes(os.urandom(2 * MiB))  # 8 s at this rate
        (out / "done-1" / "_SUCCESS").write_bytes(b"")
        (out / "half-2").mkdir()
        (out / "half-2" / "w.bin").write_bytes(b"partial")
        for _ in range(4):  # alive while heartbeats come
            time.sleep(0.5)
            c.request("POST", "/v1/runs/run_lease/heartbeat", {})
        assert daemon_run(d, "run_lease")["state"] == "running"
        stopped = time.monotonic()
        js = wait_until(lambda: (lambda p: p if len(p) == 2 and all(
            v[0]["state"] == "abandoned" for v in p.values()) else None)(
                by_checkpoint(d, "run_lease")), 5, "both settled")
        assert time.monotonic() - stopped < 1.0 + 2.0
        assert js[str(out / "half-2")][0]["error"]["code"] == "not_sealed"
        chron = chronicle_for(d)
        wait_until(lambda: run_status(chron, "run_lease") == "crashed", 10, "run crashed")
        assert [a.state for a in chron.assets.list(output_of="run_lease")] in ([], ["abandoned"])


SLEEPER = """
    import sys, time
    from agent.client import SocketClient
    SocketClient().request("POST", "/v1/runs", {"run_id": sys.argv[1], "watch": [
        {"path": sys.argv[2] + "/*", "seal": ["marker"]}]})
    print("registered", flush=True)
    time.sleep(120)
"""


def test_runs_survive_a_daemon_restart(tmp_path: Path) -> None:
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    out_a.mkdir()
    out_b.mkdir()
    sleeper = script(tmp_path, "sleeper.py", SLEEPER)
    with watch_daemon() as d:
        procs = [spawn_script(sleeper, rid, str(o), env=writer_env(d))
                 for rid, o in (("run_a", out_a), ("run_b", out_b))]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "registered"
            d.stop()
            os.kill(procs[1].pid, signal.SIGKILL)  # run_b dies while no daemon runs
            procs[1].wait()
            d.start()
            a = daemon_run(d, "run_a")
            assert a["state"] == "running" and a["pid"] == procs[0].pid
            assert a["watch"][0]["path"] == f"{out_a}/*"
            chron = chronicle_for(d)
            wait_until(lambda: daemon_run(d, "run_b")["state"] == "ended", 5, "run_b settled")
            assert run_status(chron, "run_b") == "crashed"
            (out_a / "s1").mkdir()  # the restored rule still watches
            (out_a / "s1" / "w").write_bytes(b"w")
            (out_a / "s1" / "_SUCCESS").write_bytes(b"")
            [j] = wait_jobs_terminal(d, 1, run_id="run_a")
            assert j["state"] == "done"
            os.kill(procs[0].pid, signal.SIGKILL)  # the pidfd re-opened after the restart
            killed = time.monotonic()
            wait_until(lambda: daemon_run(d, "run_a")["status"] == "crashed", 3, "run_a dead")
            assert time.monotonic() - killed < 2.0
            wait_until(lambda: run_status(chron, "run_a") == "crashed", 10, "run_a ended")
        finally:
            for p in procs:
                p.kill()
                p.wait()
                for f in (p.stdout, p.stderr):
                    if f is not None:
                        f.close()


QUICK_EXIT = """
    import os, sys, time
    from agent import Run
    t0 = time.monotonic()
    run = Run("run_quick")
    small = run.upload_directory_async(sys.argv[2], asset_type="checkpoint")
    huge = run.upload_directory_async(sys.argv[1], asset_type="checkpoint")
    took = time.monotonic() - t0
    print(huge.job_id, small.job_id, f"{took:.4f}", flush=True)
"""


def test_the_training_process_never_waits(tmp_path: Path) -> None:
    """Registering and queueing a 10 GiB checkpoint take milliseconds; the process exits
    at once and the daemon carries on: the 64 MiB one runs to ready, the 10 GiB one is seen
    streaming (its end is not waited for, to keep the test short)."""
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(10 * 1024 * MiB)  # sparse
    small = tmp_path / "small"
    small.mkdir()
    (small / "w.bin").write_bytes(os.urandom(64 * MiB))
    writer = script(tmp_path, "quick.py", QUICK_EXIT)
    with watch_daemon() as d:
        t0 = time.monotonic()
        r = run_script(writer, str(huge), str(small), env=writer_env(d))
        wall = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        huge_job, small_job, took = r.stdout.split()
        assert float(took) < 0.25, took  # Run() + two uploads queued
        assert wall < 3.0, wall  # interpreter start and import included
        c = d.client()
        wait_until(lambda: c.get_job(huge_job)["bytes_done"] > 0, 30, "10 GiB streaming")
        assert c.get_job(huge_job)["bytes_total"] == 10 * 1024 * MiB
        assert c.wait_job(small_job, 60)["state"] == "done"
        run = daemon_run(d, "run_quick")  # exited without finish, its upload goes on
        assert run["status"] == "crashed" and run["state"] == "ending"
        assert c.get_job(huge_job)["state"] == "running"
        # (cancelling it would wait ~20 s for the whole-file hash thread; kill the daemon)
        d.kill()


def test_schema_v1_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    conn = sqlite3.connect(db)
    for stmt in _V1.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute(f"PRAGMA application_id={0x43484147}")
    conn.execute("PRAGMA user_version=1")
    conn.execute(
        "INSERT INTO jobs (job_id, kind, state, uid, payload, created_at, updated_at) "
        "VALUES ('job_old', 'upload', 'queued', 0, ?, 1, 1)", (json.dumps({"path": "/x"}),))
    conn.execute(
        "INSERT INTO assets (asset_key, register_key, asset_id, asset_type, uid, state, "
        "created_at, updated_at) VALUES ('la_old', 'reg_old', 'ast_1', 'checkpoint', 0, "
        "'registered', 1, 1)")
    conn.execute("INSERT INTO components (asset_key, name, size) VALUES ('la_old', 'w.bin', 3)")
    conn.commit()
    conn.close()
    q = Queue(db)
    try:
        job = q.get("job_old")
        assert job is not None and job.kind == JobKind.UPLOAD and job.payload == {"path": "/x"}
        assert q._read("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 6
        # v6: the assets table rebuilt, its rows and their components kept; one Chronicle
        # asset may now have several local records (the shares of a shared checkpoint)
        old = q.asset("la_old")
        assert old is not None and old.asset_id == "ast_1"
        assert [c.name for c in q.components("la_old")] == ["w.bin"]
        rec = q.create_asset(asset_type="checkpoint", uid=0, run_id=None, visibility=None,
                             components=[{"name": "x.bin", "size": 1}])
        q.set_asset(rec.asset_key, asset_id="ast_1")
        assert q._read("PRAGMA foreign_keys")[0][0] == 1
        indexes = {r[0] for r in q._read("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"jobs_uid", "jobs_finished"} <= indexes  # v4: quotas and pruning
        assert job.cred_id is None and job.token is None
        assert q._read("SELECT count(*) FROM runs")[0][0] == 0
        assert q._read("SELECT count(*) FROM credentials")[0][0] == 0
        assert q._read("SELECT count(*) FROM watched")[0][0] == 0
    finally:
        q.close()
