"""The job queue on a real SQLite file: guarded moves, claims, recovery, and refusing a
database that is not ours."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

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
    claimed = q.claim("w1")
    assert claimed is not None and claimed.job_id == job.job_id
    assert claimed.state == JobState.RUNNING and claimed.attempts == 1
    assert q.claim("w1") is None  # nothing else to run
    done = q.finish(job.job_id, "w1", JobState.DONE)
    assert done.state == JobState.DONE and done.to_api()["run_id"] == "run_1"
    with pytest.raises(StateConflict):  # guarded: a done job cannot finish again
        q.finish(job.job_id, "w1", JobState.FAILED)


def test_finish_by_another_owner_is_refused(q: Queue) -> None:
    job = q.enqueue(JobKind.INLINE, 1, {})
    q.claim("w1")
    with pytest.raises(StateConflict):
        q.finish(job.job_id, "intruder", JobState.DONE)


def test_running_jobs_survive_a_crash_and_are_recovered(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    q1 = Queue(path)
    a = q1.enqueue(JobKind.UPLOAD, 1, {"n": 1})
    b = q1.enqueue(JobKind.UPLOAD, 1, {"n": 2})
    q1.claim("dead-daemon")
    q1.close()  # the process dies with job a running
    q2 = Queue(path)
    assert q2.recover() == 1
    states = {j.job_id: j.state for j in q2.list_jobs()}
    assert states == {a.job_id: JobState.QUEUED, b.job_id: JobState.QUEUED}
    q2.close()


def test_release_delays_the_next_attempt(q: Queue) -> None:
    job = q.enqueue(JobKind.UPLOAD, 1, {})
    q.claim("w")
    q.release(job.job_id, "w", 3600, {"code": "timeout", "message": "timed out"})
    assert q.claim("w") is None
    again = q.get(job.job_id)
    assert again is not None and again.error == {"code": "timeout", "message": "timed out"}


def test_cancel_and_retry(q: Queue) -> None:
    job = q.enqueue(JobKind.UPLOAD, 1, {})
    assert q.request_cancel(job.job_id).state == JobState.CANCELLED
    assert q.retry(job.job_id).state == JobState.QUEUED
    q.claim("w")
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
    first = q.claim("w")
    assert first is not None and first.job_id == comp.job_id
    assert q.claim("w") is None  # the finalize is held while the component runs
    q.finish(comp.job_id, "w", JobState.DONE)
    nxt = q.claim("w")
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
    q.claim("w1")
    assert q.prune_credentials(grace_s=0) == 1  # uid 1001's, which nothing uses
    q.finish(job.job_id, "w1", JobState.FAILED, {"code": "x", "message": "y"})
    assert q.prune_credentials(grace_s=0) == 0  # a failed job can be retried: kept
    assert q.token(cred) == "tok-alice"
    q.retry(job.job_id)
    q.claim("w1")
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


# ---- retention and quotas ---------------------------------------------------------------------


def _end(q: Queue, state: JobState, payload: dict[str, Any] | None = None,
         uid: int = 1000) -> str:
    job = q.enqueue(JobKind.INLINE, uid, payload or {"asset_type": "t", "content": "x" * 100})
    q.claim("w")
    if state == JobState.CANCELLED:
        q.request_cancel(job.job_id)  # a running job is flagged; the worker ends it
    q.finish(job.job_id, "w", state)
    return job.job_id


def _age(path: Path, job_id: str, seconds: float) -> None:
    """Make a job look as if it ended ``seconds`` ago (another connection, the same file)."""
    db = sqlite3.connect(path)
    db.execute("UPDATE jobs SET updated_at = updated_at - ? WHERE job_id = ?", (seconds, job_id))
    db.commit()
    db.close()


def test_finished_jobs_are_pruned_after_the_retention_and_live_ones_never(
    q: Queue, tmp_path: Path
) -> None:
    day = 86400.0
    old = {s: _end(q, s) for s in (JobState.DONE, JobState.FAILED, JobState.CANCELLED,
                                   JobState.ABANDONED)}
    recent = _end(q, JobState.DONE)
    queued = q.enqueue(JobKind.UPLOAD, 1000, {"path": "/x"}).job_id
    for jid in [*old.values(), queued]:
        _age(tmp_path / "queue.db", jid, 8 * day)
    assert q.prune_finished(7 * day) == 4
    left = {j.job_id for j in q.list_jobs()}
    assert left == {recent, queued}  # a queued job is never pruned, however old
    assert q.prune_finished(7 * day) == 0


def test_pruning_takes_the_finished_assets_records_with_it(q: Queue, tmp_path: Path) -> None:
    job = q.enqueue(JobKind.UPLOAD, 1, {"path": "/x"})
    rec = q.create_asset(asset_type="t", uid=1, run_id=None, visibility=None,
                         components=[{"name": "a", "size": 1}], job_id=job.job_id)
    q.record_part(rec.asset_key, "a", PartRecord(1, 5 << 20, 1, "etag"))
    q.set_asset(rec.asset_key, state="finalized")
    q.claim("w")
    q.finish(job.job_id, "w", JobState.DONE)
    db = sqlite3.connect(tmp_path / "queue.db")
    db.execute("UPDATE assets SET updated_at = updated_at - 1e6")
    db.commit()
    db.close()
    _age(tmp_path / "queue.db", job.job_id, 1e6)
    assert q.prune_finished(3600) == 1
    assert q.asset(rec.asset_key) is None and q.parts(rec.asset_key, "a") == []


def test_an_inline_jobs_content_is_dropped_once_sent_and_the_row_kept(
    q: Queue, tmp_path: Path
) -> None:
    big = {"asset_type": "metrics", "content": "y" * 1_000_000}
    done = _end(q, JobState.DONE, big)
    failed = _end(q, JobState.FAILED, big)
    db = sqlite3.connect(tmp_path / "queue.db")
    sizes = dict(db.execute("SELECT job_id, length(payload) FROM jobs").fetchall())
    db.close()
    assert sizes[done] < 100 and sizes[failed] > 1_000_000  # a failed one may be retried
    job = q.get(done)
    assert job is not None and job.state == JobState.DONE
    assert job.payload == {"asset_type": "metrics"} and "content" not in job.to_api()
    assert q.usage(1000) == (0, sizes[failed])


def test_quotas_count_a_uids_live_jobs_and_payload_bytes(q: Queue) -> None:
    from agent.errors import QuotaExceeded
    from agent.queue.store import Quota

    quota = Quota(jobs=3, payload_bytes=10_000)
    for _ in range(3):
        q.enqueue(JobKind.UPLOAD, 1000, {"path": "/x"}, quota=quota)
    with pytest.raises(QuotaExceeded) as e:
        q.enqueue(JobKind.UPLOAD, 1000, {"path": "/x"}, quota=quota)
    assert e.value.code == "quota_exceeded"
    assert "uid 1000 has 3 queued or running jobs" in e.value.message
    assert "queue.quota_jobs = 3" in e.value.message
    q.enqueue(JobKind.UPLOAD, 1001, {"path": "/x"}, quota=quota)  # another uid: its own
    # finished jobs free the slot
    job = q.claim("w")
    assert job is not None
    q.finish(job.job_id, "w", JobState.DONE)
    q.enqueue(JobKind.INLINE, 1000, {"content": "z" * 5000}, quota=quota)
    with pytest.raises(QuotaExceeded) as e:
        q.enqueue(JobKind.INLINE, 1001, {"content": "z" * 20_000}, quota=quota)
    assert "queue.quota_payload_bytes = 10000" in e.value.message
    assert len(q.list_jobs(uid=1001)) == 1  # nothing was added by the refused call


def test_a_listing_leaves_inline_contents_in_the_database(q: Queue) -> None:
    job = q.enqueue(JobKind.INLINE, 1000, {"asset_type": "m", "content": "c" * 100_000})
    listed = q.list_jobs(uid=1000)
    assert [j.job_id for j in listed] == [job.job_id]
    assert listed[0].payload == {"asset_type": "m"}  # the socket API's listing shows no more
    one = q.get(job.job_id)
    assert one is not None and len(one.payload["content"]) == 100_000  # the worker's read
