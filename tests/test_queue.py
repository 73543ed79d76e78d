"""The job queue on a real SQLite file: guarded moves, claims, recovery, and refusing a
database that is not ours."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.queue.schema import QueueCorrupt
from agent.queue.store import JobKind, JobState, PartRecord, Queue, StateConflict


@pytest.fixture
def q(tmp_path: Path) -> Queue:
    queue = Queue(tmp_path / "queue.db")
    yield queue  # type: ignore[misc]
    queue.close()


def test_enqueue_claim_finish(q: Queue) -> None:
    job = q.enqueue(JobKind.UPLOAD, 1000, {"path": "/x", "asset_type": "checkpoint"},
                    run_id="run_1")
    assert job.state == JobState.QUEUED and job.attempts == 0
    claimed = q.claim("w1", 60)
    assert claimed is not None and claimed.job_id == job.job_id
    assert claimed.state == JobState.RUNNING and claimed.attempts == 1
    assert q.claim("w1", 60) is None  # nothing else to run
    done = q.finish(job.job_id, "w1", JobState.DONE)
    assert done.state == JobState.DONE and done.to_api()["run_id"] == "run_1"
    with pytest.raises(StateConflict):  # guarded: a done job cannot finish again
        q.finish(job.job_id, "w1", JobState.FAILED)


def test_finish_by_another_owner_is_refused(q: Queue) -> None:
    job = q.enqueue(JobKind.INLINE, 1, {})
    q.claim("w1", 60)
    with pytest.raises(StateConflict):
        q.finish(job.job_id, "intruder", JobState.DONE)


def test_running_jobs_survive_a_crash_and_are_recovered(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    q1 = Queue(path)
    a = q1.enqueue(JobKind.UPLOAD, 1, {"n": 1})
    b = q1.enqueue(JobKind.UPLOAD, 1, {"n": 2})
    q1.claim("dead-daemon", 60)
    q1.close()  # the process dies with job a running
    q2 = Queue(path)
    assert q2.recover() == 1
    states = {j.job_id: j.state for j in q2.list_jobs()}
    assert states == {a.job_id: JobState.QUEUED, b.job_id: JobState.QUEUED}
    q2.close()


def test_release_delays_the_next_attempt(q: Queue) -> None:
    job = q.enqueue(JobKind.UPLOAD, 1, {})
    q.claim("w", 60)
    q.release(job.job_id, "w", 3600, {"code": "timeout", "message": "timed out"})
    assert q.claim("w", 60) is None
    again = q.get(job.job_id)
    assert again is not None and again.error == {"code": "timeout", "message": "timed out"}


def test_cancel_and_retry(q: Queue) -> None:
    job = q.enqueue(JobKind.UPLOAD, 1, {})
    assert q.request_cancel(job.job_id).state == JobState.CANCELLED
    assert q.retry(job.job_id).state == JobState.QUEUED
    q.claim("w", 60)
    flagged = q.request_cancel(job.job_id)
    assert flagged.state == JobState.RUNNING and flagged.cancel_requested
    q.finish(job.job_id, "w", JobState.DONE)
    with pytest.raises(StateConflict):
        q.request_cancel(job.job_id)
    with pytest.raises(StateConflict):
        q.retry(job.job_id)


def test_finalize_waits_for_its_component_jobs(q: Queue) -> None:
    rec = q.create_asset(asset_type="checkpoint", uid=1, run_id=None, visibility=None,
                         components=[{"name": "a"}, {"name": "b"}])
    comp = q.enqueue(JobKind.COMPONENT, 1, {"name": "a"}, asset_key=rec.asset_key)
    fin = q.enqueue(JobKind.FINALIZE, 1, {}, asset_key=rec.asset_key)
    first = q.claim("w", 60)
    assert first is not None and first.job_id == comp.job_id
    assert q.claim("w", 60) is None  # the finalize is held while the component runs
    q.finish(comp.job_id, "w", JobState.DONE)
    nxt = q.claim("w", 60)
    assert nxt is not None and nxt.job_id == fin.job_id


def test_parts_are_recorded_and_listed(q: Queue) -> None:
    rec = q.create_asset(asset_type="checkpoint", uid=1, run_id=None, visibility=None,
                         components=[{"name": "big", "size": 30}])
    q.record_part(rec.asset_key, "big", PartRecord(2, 16, 14, '"e2"'))
    q.record_part(rec.asset_key, "big", PartRecord(1, 16, 16, '"e1"'))
    assert [(p.part_number, p.etag) for p in q.parts(rec.asset_key, "big")] == [
        (1, '"e1"'), (2, '"e2"')]
    q.reset_asset(rec.asset_key)
    assert q.parts(rec.asset_key, "big") == []


def test_a_foreign_database_is_refused_with_a_way_out(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    with pytest.raises(QueueCorrupt) as e:
        Queue(path)
    assert "not a chronicle-agent queue database" in e.value.message
    assert "move" in e.value.message


def test_a_corrupt_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    Queue(path).close()
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"garbage" * 20)
    with pytest.raises(QueueCorrupt):
        Queue(path)


def test_a_callers_token_is_kept_while_work_needs_it_and_no_longer(q: Queue) -> None:
    cred = q.put_credential(1000, "tok-alice", "user_alice")
    assert q.put_credential(1000, "tok-alice") == cred  # same uid and token: same name
    assert q.put_credential(1001, "tok-alice") != cred  # another uid: another credential
    job = q.enqueue(JobKind.DOWNLOAD, 1000, {"asset_id": "a", "dest": "/d"}, cred_id=cred)
    assert job.token == "tok-alice" and "tok-alice" not in repr(job)
    assert "tok-alice" not in str(job.to_api())
    q.claim("w1", 60)
    assert q.prune_credentials(grace_s=0) == 1  # uid 1001's, which nothing uses
    q.finish(job.job_id, "w1", JobState.FAILED, {"code": "x", "message": "y"})
    assert q.prune_credentials(grace_s=0) == 0  # a failed job can be retried: kept
    assert q.token(cred) == "tok-alice"
    q.retry(job.job_id)
    q.claim("w1", 60)
    q.finish(job.job_id, "w1", JobState.DONE)
    assert q.prune_credentials(grace_s=300) == 0  # sent a moment ago: a request may need it
    assert q.prune_credentials(grace_s=0) == 1
    assert q.token(cred) is None and q.get(job.job_id).token is None  # type: ignore[union-attr]
    # an asset still uploading keeps its token, whatever its jobs
    cred = q.put_credential(1000, "tok-alice")
    rec = q.create_asset(asset_type="checkpoint", uid=1000, run_id=None, visibility=None,
                         components=[], cred_id=cred)
    assert rec.token == "tok-alice" and "tok-alice" not in repr(rec)
    assert q.prune_credentials(grace_s=0) == 0
    q.set_asset(rec.asset_key, state="finalized")
    assert q.prune_credentials(grace_s=0) == 1
