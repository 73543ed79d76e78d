"""What a user sees of a run: the fate of each checkpoint (``GET /v1/runs/{id}`` counts,
``GET /v1/runs/{id}/checkpoints``, ``chronicle-agent runs``), from the real queue database
and against a real daemon whose watcher seals what a real writer process wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from agent.queue import runstore
from agent.queue.runstore import WatchedRow
from agent.queue.store import JobKind, JobState, Queue
from tests.e2e.test_exec import CHILD, exec_cli
from tests.support.helpers_watch import (
    daemon_run,
    jobs,
    script,
    wait_until,
    watch_daemon,
    writer_env,
)


def _sealed(q: Queue, run_id: str, path: str, state: str = "sealed") -> WatchedRow:
    row = WatchedRow(runstore.new_ckpt_id(), path, run_id, "rule", state, "marker")
    runstore.seal_checkpoint(q, row, 1000, {"path": path, "asset_type": "checkpoint",
                                            "checkpoint": path}, 10)
    return row


def _finish_next(q: Queue, state: JobState, error: dict[str, str] | None = None) -> None:
    job = q.claim("test")
    assert job is not None
    q.finish(job.job_id, "test", state, error)


def test_every_fate_from_the_rows_and_their_jobs(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue.db")
    try:
        # a done job pruned after queue.finished_retention_s: its row still says ready
        _sealed(q, "run_a", "/c/pruned")
        _finish_next(q, JobState.DONE)
        pruned = runstore.run_checkpoints(q, ["run_a"])["run_a"][0]
        runstore.set_watched(q, pruned.ckpt_id, state="done")
        assert q.prune_finished(0, now=time.time() + 1) == 1
        ready = _sealed(q, "run_a", "/c/ready")
        _finish_next(q, JobState.DONE)
        _sealed(q, "run_a", "/c/failed")
        _finish_next(q, JobState.FAILED, {"code": "storage_error", "message": "HTTP 500"})
        _sealed(q, "run_a", "/c/uploading")
        cancelled = _sealed(q, "run_a", "/c/cancelled")
        assert cancelled.job_id is not None
        q.request_cancel(cancelled.job_id)
        old = _sealed(q, "run_a", "/c/rewritten")
        runstore.set_watched(q, old.ckpt_id, state="superseded")
        runstore.record_watched(q, WatchedRow(runstore.new_ckpt_id(), "/c/shared", "run_a",
                                              "rule", "elsewhere", "marker"))
        for path, state, seal, code in (
                ("/c/deleted", JobState.LOST, "marker", "deleted_before_seal"),
                ("/c/half", JobState.ABANDONED, None, "not_sealed")):
            runstore.record_abandoned(
                q, WatchedRow(runstore.new_ckpt_id(), path, "run_a", "rule", "abandoned", seal),
                1000, {"path": path, "checkpoint": path}, {"code": code, "message": "why"},
                state=state)
        _sealed(q, "run_b", "/other/ready")  # another run's: counted for it alone
        q.enqueue(JobKind.UPLOAD, 1000, {"path": "/x"}, run_id="run_a")  # not a checkpoint

        got = {c.path: c.to_api() for c in runstore.run_checkpoints(q, ["run_a"])["run_a"]}
        assert {p: c["detail"] for p, c in got.items()} == {
            "/c/pruned": "ready", "/c/ready": "ready", "/c/failed": "failed",
            "/c/uploading": "uploading", "/c/cancelled": "abandoned",
            "/c/rewritten": "superseded", "/c/shared": "elsewhere", "/c/deleted": "lost",
            "/c/half": "abandoned"}
        # the fates of the interface: sealed (not, or not yet, ready here), ready, lost,
        # abandoned
        assert {p: c["fate"] for p, c in got.items()} == {
            "/c/pruned": "ready", "/c/ready": "ready", "/c/failed": "sealed",
            "/c/uploading": "sealed", "/c/cancelled": "abandoned",
            "/c/rewritten": "abandoned", "/c/shared": "sealed", "/c/deleted": "lost",
            "/c/half": "abandoned"}
        assert got["/c/pruned"]["job_state"] is None and got["/c/pruned"]["job_id"]
        assert got["/c/ready"]["job_id"] == ready.job_id and got["/c/ready"]["reason"] is None
        assert got["/c/failed"]["reason"] == {"code": "storage_error", "message": "HTTP 500"}
        assert got["/c/cancelled"]["reason"]["code"] == "cancelled"
        assert got["/c/deleted"]["reason"]["code"] == "deleted_before_seal"
        assert got["/c/half"]["seal"] is None and got["/c/half"]["job_state"] == "abandoned"
        assert got["/c/shared"]["reason"]["code"] == "claimed_elsewhere"
        assert got["/c/rewritten"]["reason"]["code"] == "superseded"
        assert got["/c/uploading"]["asset_type"] == "checkpoint"
        in_order = runstore.run_checkpoints(q, ["run_a"])["run_a"]
        assert list(got) == [c.path for c in sorted(in_order, key=lambda c: c.created_at)]
        assert set(runstore.run_checkpoints(q)) == {"run_a", "run_b"}

        counts = runstore.checkpoint_counts(q, ["run_a", "run_b", "run_none"])
        # sealed: everything this agent sealed but the superseded version and the claimed
        # one (pruned, ready, failed, uploading, cancelled, lost-with-a-seal)
        assert counts["run_a"] == {"sealed": 6, "ready": 2, "uploading": 1, "failed": 1,
                                   "lost": 1, "abandoned": 2, "elsewhere": 1}
        assert counts["run_b"] == {"sealed": 1, "ready": 0, "uploading": 1, "failed": 0,
                                   "lost": 0, "abandoned": 0, "elsewhere": 0}
        assert counts["run_none"] == dict.fromkeys(runstore.COUNTED, 0)
        assert runstore.checkpoint_counts(q) == {k: counts[k] for k in ("run_a", "run_b")}
    finally:
        q.close()


WAITER = """
    import os, sys
    out = sys.argv[1]
    for name in ("step-1", "step-\\x1b]0;pwned\\x07"):
        d = os.path.join(out, name)
        os.makedirs(d)
        with open(os.path.join(d, "w.bin"), "wb") as f:
            f.write(os.urandom(1000))
        open(os.path.join(d, "_SUCCESS"), "w").close()
    os.makedirs(os.path.join(out, "step-2"))  # never sealed
"""


def test_runs_show_each_checkpoint_fate_over_the_socket_and_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = script(tmp_path, "train.py", CHILD)
    with watch_daemon() as d:
        env = writer_env(d)
        r = exec_cli(env, "--run", "run_view", "--watch", str(out), "--type", "checkpoint",
                     "--seal", "marker", "--", sys.executable, str(child), str(out),
                     str(tmp_path / "seen.json"), "3")
        assert r.returncode == 3, r.stderr
        # exec's own account: the run id first, and once the daemon's final scan is done
        # (the half-written step-3 already counted as abandoned), the summary
        lines = r.stderr.splitlines()
        assert lines[0] == "chronicle-agent: run run_view"
        assert lines[-1].startswith("chronicle-agent: run run_view failed: 2 checkpoints "
                                    "sealed ("), r.stderr
        assert lines[-1].endswith("), 0 lost, 1 abandoned"), r.stderr

        def drained() -> dict[str, object] | None:
            run = daemon_run(d, "run_view")
            return run if run["state"] == "ended" else None
        run = wait_until(drained, 30, "run_view ended")
        assert run["status"] == "failed" and run["settled"] is True
        assert run["started_at"] <= run["ended_at"]
        assert run["checkpoint_counts"] == {"sealed": 2, "ready": 2, "uploading": 0, "failed": 0,
                                            "lost": 0, "abandoned": 1, "elsewhere": 0,
                                            "unsealed": 0}
        listed = d.client().request("GET", "/v1/runs/run_view/checkpoints")
        assert listed["run_id"] == "run_view"
        cks = {c["path"]: c for c in listed["checkpoints"]}
        assert [cks[str(out / f"step-{i}")]["fate"] for i in (1, 2, 3)] == [
            "ready", "ready", "abandoned"]
        by_job = {j["job_id"]: j for j in jobs(d, "run_view")}
        for i in (1, 2):
            ck = cks[str(out / f"step-{i}")]
            assert ck["seal"] == "marker" and ck["job_state"] == "done"
            assert ck["asset_id"] == by_job[ck["job_id"]]["asset_id"] is not None
        half = cks[str(out / "step-3")]
        assert half["reason"]["code"] == "not_sealed" and "run_view" in half["reason"]["message"]
        assert half["seal"] is None and half["asset_id"] is None

        listing = d.run_cli("runs")
        assert listing.returncode == 0, listing.stderr
        line = next(ln for ln in listing.stdout.splitlines() if ln.startswith("run_view"))
        assert line.split()[1:6] == ["ended", "(failed,", "exit", "3)", str(run["pid"])]
        assert "2 checkpoints sealed (2 ready, 0 uploading), 0 lost, 1 abandoned" in line
        one = d.run_cli("runs", "run_view")
        assert one.returncode == 0, one.stderr
        rows = {ln.split()[0]: ln.split() for ln in one.stdout.splitlines()
                if ln.startswith(str(out))}
        assert rows[str(out / "step-1")][1:3] == ["marker", "ready"]
        assert rows[str(out / "step-3")][1:3] == ["-", "abandoned"]
        assert "not_sealed: run run_view ended (failed)" in one.stdout
        as_json = json.loads(d.run_cli("runs", "run_view", "--json").stdout)
        assert as_json["checkpoint_counts"] == run["checkpoint_counts"]
        assert as_json["checkpoints"] == listed["checkpoints"] == run["checkpoints"]
        all_json = json.loads(d.run_cli("runs", "--json").stdout)
        assert [x["run_id"] for x in all_json["runs"]] == ["run_view"]

        unknown = d.run_cli("runs", "run_nobody")
        assert unknown.returncode == 1 and unknown.stdout == ""
        assert "run run_nobody is not registered with this daemon" in unknown.stderr


def test_a_live_run_counts_what_is_not_sealed_yet_and_paths_are_shown_escaped(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    writer = script(tmp_path, "writer.py", WAITER)
    with watch_daemon() as d:
        c = d.client()
        c.request("POST", "/v1/runs", {"run_id": "run_live", "lease": True, "watch": [
            {"path": f"{out}/*", "asset_type": "checkpoint", "seal": ["marker"]}]})
        assert c.request("GET", "/v1/runs/run_live")["checkpoint_counts"]["unsealed"] == 0
        subprocess.run([sys.executable, str(writer), str(out)], env=writer_env(), timeout=60,
                       check=True)

        def counted() -> dict[str, int] | None:
            n = c.request("GET", "/v1/runs/run_live")["checkpoint_counts"]
            return n if n["sealed"] == 2 and n["unsealed"] == 1 else None
        counts = wait_until(counted, 30, "two sealed and one unsealed checkpoint")
        assert counts["lost"] == counts["abandoned"] == 0
        assert c.request("GET", "/v1/runs")["runs"][0]["checkpoint_counts"]["unsealed"] == 1
        shown = d.run_cli("runs", "run_live")
        assert shown.returncode == 0, shown.stderr
        assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
        assert "step-\\x1b]0;pwned\\x07" in shown.stdout
        assert "not sealed yet" in shown.stdout  # 1 unsealed, in the summary line
        assert "heartbeats within a lease" in shown.stdout
        listing = d.run_cli("runs").stdout.splitlines()
        assert listing[1].split()[:3] == ["run_live", "running", "lease"]
        raw = json.loads(d.run_cli("runs", "run_live", "--json").stdout)
        assert str(out / "step-\x1b]0;pwned\x07") in [x["path"] for x in raw["checkpoints"]]

        shutil.rmtree(out / "step-2")  # rotated away before any seal held: lost, visibly

        def lost() -> dict[str, int] | None:
            n = c.request("GET", "/v1/runs/run_live")["checkpoint_counts"]
            return n if n["lost"] == 1 else None
        counts = wait_until(lost, 30, "the unsealed checkpoint counted lost")
        assert (counts["sealed"], counts["unsealed"], counts["abandoned"]) == (2, 0, 0)
        gone = [x for x in c.request("GET", "/v1/runs/run_live/checkpoints")["checkpoints"]
                if x["path"] == str(out / "step-2")]
        assert [(x["fate"], x["job_state"], x["seal"], x["reason"]["code"]) for x in gone] == [
            ("lost", "lost", None, "deleted_before_seal")]
        assert "lost  " in d.run_cli("runs", "run_live").stdout  # the table's FATE column
