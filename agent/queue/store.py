"""The persistent job queue: jobs, their guarded state moves, and the upload records
(assets, components, parts) whose every durable step lets a restart resume.

This is synchronous SQLite behind one lock; the daemon calls it through
:class:`agent.queue.aqueue.AsyncQueue`, which runs every method in a worker thread. Every
state change is guarded by the state it expects (``UPDATE … WHERE state = ?``), and a
claim is a transaction (``BEGIN IMMEDIATE``): decide in a transaction, act outside it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.errors import AgentError, QuotaExceeded, StateDiskFull
from agent.queue.schema import open_db
from agent.queue.states import ASSET_MOVES, AssetState, check_move, sources


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABANDONED = "abandoned"
    LOST = "lost"
    """A checkpoint the writer completed that could not be captured (deleted before its
    seal, changed during its snapshot, ...): nothing to send, kept as a visible record."""


class JobKind(StrEnum):
    UPLOAD = "upload"
    INLINE = "inline"
    COMPONENT = "component"
    FINALIZE = "finalize"
    DOWNLOAD = "download"


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.ABANDONED,
                      JobState.LOST})

JOB_MOVES: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.ABANDONED}),
    JobState.RUNNING: frozenset({JobState.QUEUED}) | TERMINAL,
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.ABANDONED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.ABANDONED}),
    JobState.DONE: frozenset(),
    JobState.ABANDONED: frozenset(),
    JobState.LOST: frozenset(),
}
"""The moves of a job (checked by :meth:`Queue._move`; the claim and the recovery at start
move queued → running → queued in SQL of their own): queued → running (claim), cancelled
(cancel), abandoned; running → queued (released, or recovered after a crash) or any end;
failed or cancelled → queued (retry), or abandoned (a superseded checkpoint's job, relabelled).
A job may also be born abandoned or lost (a checkpoint that never becomes an asset)."""


def job_state(value: str) -> JobState:
    """``value`` as a job state; ValueError naming the valid ones (for ``--state`` and
    ``?state=``)."""
    try:
        return JobState(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a job state (choose from "
                         f"{', '.join(s.value for s in JobState)})") from None


class StateConflict(AgentError):
    """A guarded move found the job in another state than it expected."""

    code = "conflict"


def new_id(prefix: str) -> str:
    return f"{prefix}_{int(time.time() * 1000):x}{secrets.token_hex(6)}"


@dataclass
class Job:
    job_id: str
    kind: JobKind
    state: JobState
    uid: int
    run_id: str | None
    asset_key: str | None
    payload: dict[str, Any]
    bytes_total: int
    bytes_done: int
    attempts: int
    error: dict[str, str] | None
    next_attempt_at: float
    lease_owner: str | None
    cancel_requested: bool
    created_at: float
    updated_at: float
    result: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    asset_id: str | None = None
    cred_id: str | None = None
    """The caller's own Chronicle credential this job runs with (None: the daemon's)."""
    token: str | None = field(default=None, repr=False)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_api(self) -> dict[str, Any]:
        """The job object of the socket API."""
        out: dict[str, Any] = {
            "job_id": self.job_id,
            "kind": str(self.kind),
            "state": str(self.state),
            "asset_id": self.asset_id or self.payload.get("asset_id"),  # downloads: theirs
            "run_id": self.run_id,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "attempts": self.attempts,
            "error": self.error,
            "created_at": _rfc3339(self.created_at),
            "updated_at": _rfc3339(self.updated_at),
        }
        for key in ("asset_type", "path", "dest", "name", "checkpoint", "latest", "selected",
                    "include", "exclude"):
            if key in self.payload:
                out[key] = self.payload[key]
        if self.result is not None:
            out["result"] = self.result
        if self.warnings:
            out["warnings"] = self.warnings
        return out


def credential_id(uid: int, token: str) -> str:
    """The name of a caller's token: the same uid and token always get the same one, and
    it says nothing of the token."""
    return "cred_" + hashlib.sha256(f"{uid}\0{token}".encode()).hexdigest()[:24]


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


@dataclass
class AssetRecord:
    asset_key: str
    register_key: str
    asset_id: str | None
    asset_type: str
    run_id: str | None
    visibility: str | None
    uid: int
    state: AssetState
    cred_id: str | None = None
    token: str | None = field(default=None, repr=False)
    """The caller's own Chronicle token the asset is registered with (None: the daemon's)."""


@dataclass
class ComponentRecord:
    asset_key: str
    name: str
    path: str | None
    size: int | None
    mtime_ns: int | None
    ino: int | None
    dev: int | None
    content_type: str | None
    part_size: int | None
    sha256: str | None
    uploaded: bool
    url_hash: str | None


_COMPONENT_COLS = tuple(f.name for f in fields(ComponentRecord))


def _component(row: dict[str, Any]) -> ComponentRecord:
    """A component record from its row, by column name."""
    return ComponentRecord(**{**row, "uploaded": bool(row["uploaded"])})


_ASSET_SELECT = {f.name: f.name for f in fields(AssetRecord)} | {
    "token": "(SELECT token FROM credentials WHERE credentials.cred_id = assets.cred_id)"}
"""Each field of an asset record, by the SQL that reads it from ``assets``."""
_ASSET_COLS = tuple(_ASSET_SELECT)


def _asset_record(row: dict[str, Any]) -> AssetRecord:
    """An asset record from its row, by column name."""
    return AssetRecord(**{**row, "state": AssetState(row["state"])})


@dataclass
class PartRecord:
    part_number: int
    part_size: int
    size: int
    etag: str


_PART_COLS = tuple(f.name for f in fields(PartRecord))

_JOB_SELECT = {
    "job_id": "job_id", "kind": "kind", "state": "jobs.state", "uid": "jobs.uid",
    "run_id": "jobs.run_id", "asset_key": "jobs.asset_key", "payload": "payload",
    "bytes_total": "bytes_total", "bytes_done": "bytes_done", "attempts": "attempts",
    "error_code": "error_code", "error_message": "error_message",
    "next_attempt_at": "next_attempt_at", "lease_owner": "lease_owner",
    "cancel_requested": "cancel_requested", "created_at": "jobs.created_at",
    "updated_at": "jobs.updated_at", "result": "result", "warnings": "warnings",
    "asset_id": "assets.asset_id", "cred_id": "jobs.cred_id",
    "token": "(SELECT token FROM credentials WHERE credentials.cred_id = jobs.cred_id)",
}
"""The columns a job is read from (by name, :func:`_job`), each by the SQL that reads it
from :data:`_JOB_FROM`."""
_JOB_NAMES = tuple(_JOB_SELECT)
_JOB_COLS = ", ".join(_JOB_SELECT.values())
_JOB_FROM = "jobs LEFT JOIN assets ON assets.asset_key = jobs.asset_key"
_JOB_COLS_LISTED = ", ".join((_JOB_SELECT | {
    "payload": "CASE WHEN kind = 'inline' THEN json_remove(payload, '$.content') ELSE payload END",
}).values())
"""A listing leaves inline contents (up to server.inline_max_bytes each) in the database:
listing a thousand queued inline jobs must not load them all (only the worker needs one)."""
_HOLDING = "'queued', 'running', 'failed', 'cancelled'"
"""States whose job keeps its payload: it may run (again); done and abandoned ones drop an
inline content."""


@dataclass(frozen=True)
class Quota:
    """What one uid may hold in the queue (``[queue]`` quota_jobs, quota_payload_bytes)."""

    jobs: int
    payload_bytes: int

    def check(self, uid: int, live: int, held: int, adding: int) -> None:
        if live + 1 > self.jobs:
            raise QuotaExceeded(
                f"uid {uid} has {live} queued or running jobs, the most one uid may have "
                f"(queue.quota_jobs = {self.jobs}): wait for some to finish, cancel some, "
                "or raise queue.quota_jobs")
        if held + adding > self.payload_bytes:
            raise QuotaExceeded(
                f"uid {uid}'s jobs hold {held} bytes of payload in the queue and this one "
                f"adds {adding}: over queue.quota_payload_bytes = {self.payload_bytes}; wait "
                "for queued jobs to be sent, or raise queue.quota_payload_bytes (failed and "
                "cancelled jobs count until queue.finished_retention_s prunes them)")


def _job(values: tuple[Any, ...]) -> Job:
    """A job from the values of :data:`_JOB_SELECT`, by name."""
    row = dict(zip(_JOB_NAMES, values, strict=True))
    return Job(
        job_id=row["job_id"],
        kind=JobKind(row["kind"]),
        state=JobState(row["state"]),
        uid=row["uid"],
        run_id=row["run_id"],
        asset_key=row["asset_key"],
        payload=json.loads(row["payload"]),
        bytes_total=row["bytes_total"],
        bytes_done=row["bytes_done"],
        attempts=row["attempts"],
        error=({"code": row["error_code"], "message": row["error_message"]}
               if row["error_code"] else None),
        next_attempt_at=row["next_attempt_at"],
        lease_owner=row["lease_owner"],
        cancel_requested=bool(row["cancel_requested"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        result=json.loads(row["result"]) if row["result"] else None,
        warnings=json.loads(row["warnings"]) if row["warnings"] else [],
        asset_id=row["asset_id"],
        cred_id=row["cred_id"],
        token=row["token"],
    )


class Queue:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_db(path)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _txn(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                else:
                    self._db.execute("COMMIT")
                finally:
                    if durable:
                        self._db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError as e:
                if "full" not in str(e):
                    raise
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StateDiskFull(
                    f"the disk holding the queue ({self.path.parent}) is full: new work is "
                    "refused until space is freed there; queued work is kept"
                ) from None

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- jobs --------------------------------------------------------------------------------

    def enqueue(
        self,
        kind: JobKind,
        uid: int,
        payload: dict[str, Any],
        *,
        run_id: str | None = None,
        asset_key: str | None = None,
        bytes_total: int = 0,
        job_id: str | None = None,
        cred_id: str | None = None,
        quota: Quota | None = None,
    ) -> Job:
        """Add a job; durable (fsynced) before it returns, since the caller is told it is
        queued. With ``quota``, the uid's usage is checked in the same transaction
        (:class:`~agent.errors.QuotaExceeded`)."""
        now = time.time()
        jid = job_id or new_id("job")
        body = json.dumps(payload)
        with self._txn(durable=True) as db:
            if quota is not None:
                quota.check(uid, *self._usage(db, uid), len(body))
            db.execute(
                "INSERT INTO jobs (job_id, kind, state, uid, run_id, asset_key, payload, "
                "bytes_total, created_at, updated_at, cred_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    jid,
                    str(kind),
                    str(JobState.QUEUED),
                    uid,
                    run_id,
                    asset_key,
                    body,
                    bytes_total,
                    now,
                    now,
                    cred_id,
                ),
            )
        job = self.get(jid)
        assert job is not None
        return job

    @staticmethod
    def _usage(db: sqlite3.Connection, uid: int) -> tuple[int, int]:
        live, held = db.execute(
            "SELECT count(*) FILTER (WHERE state IN ('queued', 'running')), "
            "coalesce(sum(length(payload)), 0) FROM jobs "
            f"WHERE uid = ? AND state IN ({_HOLDING})", (uid,)).fetchone()
        return int(live), int(held)

    def usage(self, uid: int) -> tuple[int, int]:
        """(queued and running jobs, payload bytes held) of ``uid`` — what quotas count."""
        with self._lock:
            return self._usage(self._db, uid)

    def prune_finished(self, retention_s: float, now: float | None = None) -> int:
        """Delete jobs that ended (done, failed, cancelled, abandoned, lost) more than
        ``retention_s`` ago, and the local records of finished assets no job names any
        more. A job whose checkpoint snapshot the watcher still holds is kept (the watcher
        settles it first). Returns the number of jobs deleted."""
        cutoff = (time.time() if now is None else now) - retention_s
        with self._txn() as db:
            cur = db.execute(
                "DELETE FROM jobs WHERE state IN ('done', 'failed', 'cancelled', 'abandoned', "
                "'lost') AND updated_at < ? AND NOT EXISTS (SELECT 1 FROM watched w WHERE "
                "w.job_id = jobs.job_id AND w.snapshot IS NOT NULL)", (cutoff,))
            pruned = cur.rowcount
            if pruned:
                db.execute(
                    "DELETE FROM assets WHERE state IN ('finalized', 'abandoned') AND "
                    "updated_at < ? AND NOT EXISTS (SELECT 1 FROM jobs j WHERE "
                    "j.asset_key = assets.asset_key)", (cutoff,))
        return pruned

    def get(self, job_id: str) -> Job | None:
        rows = self._read(f"SELECT {_JOB_COLS} FROM {_JOB_FROM} WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list_jobs(
        self,
        *,
        run_id: str | None = None,
        state: str | None = None,
        uid: int | None = None,
        asset_key: str | None = None,
        kind: str | None = None,
        limit: int = 1000,
    ) -> list[Job]:
        where: list[str] = []
        args: list[Any] = []
        for col, val in (
            ("jobs.run_id", run_id),
            ("jobs.state", state),
            ("jobs.uid", uid),
            ("jobs.asset_key", asset_key),
            ("kind", kind),
        ):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {_JOB_COLS_LISTED} FROM {_JOB_FROM}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY jobs.created_at, job_id LIMIT ?"
        return [_job(r) for r in self._read(sql, (*args, limit))]

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT state, count(*) FROM jobs GROUP BY state")
        out = {str(s): 0 for s in JobState}
        out.update({r[0]: r[1] for r in rows})
        return out

    def claim(self, owner: str, now: float | None = None) -> Job | None:
        """Take the oldest runnable job. A finalize job is runnable only once no component
        job of its asset is still queued or running."""
        now = time.time() if now is None else now
        with self._txn() as db:
            row = db.execute(
                "SELECT job_id FROM jobs j WHERE state = 'queued' AND next_attempt_at <= ? "
                "AND NOT (kind = 'finalize' AND EXISTS (SELECT 1 FROM jobs c WHERE "
                "c.asset_key = j.asset_key AND c.kind = 'component' "
                "AND c.state IN ('queued', 'running'))) "
                "ORDER BY next_attempt_at, created_at LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, "
                "updated_at = ? WHERE job_id = ? AND state = 'queued'",
                (owner, now, row[0]),
            )
        return self.get(row[0])

    def next_wakeup(self) -> float | None:
        rows = self._read("SELECT min(next_attempt_at) FROM jobs WHERE state = 'queued'")
        return rows[0][0] if rows and rows[0][0] is not None else None

    def _move(
        self,
        job_id: str,
        expect: tuple[JobState, ...],
        to: JobState,
        owner: str | None = None,
        **cols: Any,
    ) -> Job:
        """Move a job in one of the states ``expect`` (and leased by ``owner``, if given) to
        ``to`` (with ``cols``): StateConflict if it is in another state; IllegalMove, a bug,
        if :data:`JOB_MOVES` allows no move from one of ``expect`` to ``to``."""
        for state in expect:
            check_move(JOB_MOVES, state, to, f"job {job_id}")
        now = time.time()
        sets = ["state = ?", "updated_at = ?"]
        args: list[Any] = [str(to), now]
        for k, v in cols.items():
            sets.append(f"{k} = ?")
            args.append(v)
        where = f"job_id = ? AND state IN ({','.join('?' * len(expect))})"
        args += [job_id, *map(str, expect)]
        if owner is not None:
            where += " AND lease_owner = ?"
            args.append(owner)
        with self._txn() as db:
            cur = db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE {where}", args)
            changed = cur.rowcount
        job = self.get(job_id)
        if job is None:
            raise StateConflict(f"no job {job_id}", code="not_found")
        if not changed:
            raise StateConflict(
                f"job {job_id} is {job.state}, expected one of {', '.join(map(str, expect))}"
            )
        return job

    def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        error: dict[str, str] | None = None,
        result: dict[str, Any] | None = None,
    ) -> Job:
        assert state in TERMINAL
        job = self._move(
            job_id,
            (JobState.RUNNING,),
            state,
            owner,
            error_code=error["code"] if error else None,
            error_message=error["message"] if error else None,
            result=json.dumps(result) if result is not None else None,
            lease_owner=None,
        )
        if state in (JobState.DONE, JobState.ABANDONED) and "content" in job.payload:
            self.drop_content(job_id)  # sent (or never to be): only the job row stays
            job.payload.pop("content", None)
        return job

    def drop_content(self, job_id: str) -> None:
        """Forget an inline job's content (up to server.inline_max_bytes): it is on
        Chronicle now, or will never be sent."""
        with self._txn() as db:
            db.execute(
                "UPDATE jobs SET payload = json_remove(payload, '$.content') "
                "WHERE job_id = ? AND state IN ('done', 'abandoned')", (job_id,))

    def release(
        self, job_id: str, owner: str, delay_s: float, error: dict[str, str] | None = None
    ) -> Job:
        """Put a running job back in the queue, to run again after ``delay_s``."""
        return self._move(
            job_id,
            (JobState.RUNNING,),
            JobState.QUEUED,
            owner,
            next_attempt_at=time.time() + delay_s,
            error_code=error["code"] if error else None,
            error_message=error["message"] if error else None,
            lease_owner=None,
        )

    def recover(self) -> int:
        """At start: every job left running by a dead daemon goes back to the queue."""
        with self._txn(durable=True) as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, "
                "next_attempt_at = 0, updated_at = ? WHERE state = 'running'",
                (time.time(),),
            )
            return cur.rowcount

    def request_cancel(self, job_id: str) -> Job:
        """Queued → cancelled at once; running → flagged (the worker stops it)."""
        job = self.get(job_id)
        if job is None:
            raise StateConflict(f"no job {job_id}", code="not_found")
        if job.state == JobState.QUEUED:
            try:
                return self._move(
                    job_id,
                    (JobState.QUEUED,),
                    JobState.CANCELLED,
                    error_code="cancelled",
                    error_message="cancelled by request",
                )
            except StateConflict:
                job = self.get(job_id)
                assert job is not None
        if job.state == JobState.RUNNING:
            with self._txn() as db:
                db.execute(
                    "UPDATE jobs SET cancel_requested = 1, updated_at = ? "
                    "WHERE job_id = ? AND state = 'running'",
                    (time.time(), job_id),
                )
            job = self.get(job_id)
            assert job is not None
            return job
        raise StateConflict(f"job {job_id} is already {job.state}")

    def retry(self, job_id: str, cred_id: str | None = None) -> Job:
        """A failed or cancelled job goes back to the queue with its attempts kept; with
        ``cred_id`` (the caller sent its token again), it and its asset run with that."""
        job = self._move(
            job_id,
            (JobState.FAILED, JobState.CANCELLED),
            JobState.QUEUED,
            error_code=None,
            error_message=None,
            next_attempt_at=0,
            cancel_requested=0,
            **({"cred_id": cred_id} if cred_id is not None else {}),
        )
        if cred_id is not None and job.asset_key is not None:
            with self._txn() as db:
                db.execute("UPDATE assets SET cred_id = ? WHERE asset_key = ?",
                           (cred_id, job.asset_key))
        return job

    # ---- callers' own credentials ------------------------------------------------------------

    def put_credential(self, uid: int, token: str, principal_id: str | None = None) -> str:
        """Keep a caller's token (in this 0600 file only) and name it (:func:`credential_id`)."""
        cred_id = credential_id(uid, token)
        with self._txn(durable=True) as db:
            db.execute(
                "INSERT INTO credentials (cred_id, uid, token, principal_id, created_at) "
                "VALUES (?,?,?,?,?) ON CONFLICT (cred_id) DO UPDATE SET "
                "principal_id = excluded.principal_id, created_at = excluded.created_at",
                (cred_id, uid, token, principal_id, time.time()),
            )
        return cred_id

    def token(self, cred_id: str | None) -> str | None:
        if cred_id is None:
            return None
        rows = self._read("SELECT token FROM credentials WHERE cred_id = ?", (cred_id,))
        return rows[0][0] if rows else None

    def prune_credentials(self, grace_s: float = 300.0) -> int:
        """Delete every token no live work needs: none of its jobs can run again (done or
        abandoned; failed and cancelled ones can be retried), none of its assets is still
        being uploaded, none of its runs is still running, and it was not sent in the last
        ``grace_s`` (a request may be about to use it)."""
        with self._txn() as db:
            cur = db.execute(
                "DELETE FROM credentials WHERE created_at < ? AND "
                "NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.cred_id = credentials.cred_id "
                "AND jobs.state NOT IN ('done', 'abandoned')) AND "
                "NOT EXISTS (SELECT 1 FROM assets WHERE assets.cred_id = credentials.cred_id "
                "AND assets.state NOT IN ('finalized', 'abandoned')) AND "
                "NOT EXISTS (SELECT 1 FROM runs WHERE runs.cred_id = credentials.cred_id "
                "AND runs.state != 'ended')", (time.time() - grace_s,))
            return cur.rowcount

    def abandon_job(self, job_id: str, reason: str) -> Job:
        return self._move(
            job_id,
            (JobState.QUEUED, JobState.RUNNING),
            JobState.ABANDONED,
            error_code="abandoned",
            error_message=reason,
            lease_owner=None,
        )

    def set_progress(
        self,
        job_id: str,
        *,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
        asset_key: str | None = None,
        warnings: list[str] | None = None,
    ) -> None:
        sets: list[str] = ["updated_at = ?"]
        args: list[Any] = [time.time()]
        for col, val in (
            ("bytes_done", bytes_done),
            ("bytes_total", bytes_total),
            ("asset_key", asset_key),
        ):
            if val is not None:
                sets.append(f"{col} = ?")
                args.append(val)
        if warnings is not None:
            sets.append("warnings = ?")
            args.append(json.dumps(warnings))
        with self._txn() as db:
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?", (*args, job_id))

    def update_payload(self, job_id: str, values: dict[str, Any]) -> None:
        """Merge ``values`` into a job's payload, durably: what a job decided once (the
        asset a ``latest`` download chose) stays decided across a daemon restart."""
        with self._txn(durable=True) as db:
            row = db.execute("SELECT payload FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise StateConflict(f"no job {job_id}", code="not_found")
            payload = json.loads(row[0]) | values
            db.execute("UPDATE jobs SET payload = ?, updated_at = ? WHERE job_id = ?",
                       (json.dumps(payload), time.time(), job_id))

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._read("SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,))
        return bool(rows and rows[0][0])

    # ---- upload records ----------------------------------------------------------------------

    def create_asset(
        self,
        *,
        asset_type: str,
        uid: int,
        run_id: str | None,
        visibility: str | None,
        components: list[dict[str, Any]],
        register_key: str | None = None,
        job_id: str | None = None,
        cred_id: str | None = None,
    ) -> AssetRecord:
        """Create the local record of an asset (not yet registered) with its components,
        and bind it to ``job_id``, in one transaction. A given ``register_key`` (derived,
        so that another agent seeing the same checkpoint gets the same asset) that an
        earlier, abandoned record already used gets a ``#N`` suffix: a fresh asset."""
        now = time.time()
        key = new_id("la")
        reg = register_key or f"register:{key}"
        with self._txn(durable=True) as db:
            if register_key is not None:
                used = db.execute(
                    "SELECT count(*) FROM assets WHERE register_key = ? OR register_key LIKE ?",
                    (register_key, register_key + "#%"),
                ).fetchone()[0]
                if used:
                    reg = f"{register_key}#{used + 1}"
            db.execute(
                "INSERT INTO assets (asset_key, register_key, asset_type, run_id, visibility, "
                "uid, state, created_at, updated_at, cred_id) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (key, reg, asset_type, run_id, visibility, uid, str(AssetState.NEW), now, now,
                 cred_id),
            )
            db.executemany(
                "INSERT INTO components (asset_key, name, path, size, mtime_ns, ino, dev, "
                "content_type) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        key,
                        c["name"],
                        c.get("path"),
                        c.get("size"),
                        c.get("mtime_ns"),
                        c.get("ino"),
                        c.get("dev"),
                        c.get("content_type"),
                    )
                    for c in components
                ],
            )
            if job_id is not None:
                total = sum(c.get("size") or 0 for c in components)
                db.execute(
                    "UPDATE jobs SET asset_key = ?, bytes_total = ?, updated_at = ? "
                    "WHERE job_id = ?",
                    (key, total, now, job_id),
                )
        rec = self.asset(key)
        assert rec is not None
        return rec

    def asset(self, asset_key: str) -> AssetRecord | None:
        rows = self._read(f"SELECT {', '.join(_ASSET_SELECT.values())} FROM assets "
                          "WHERE asset_key = ?", (asset_key,))
        return _asset_record(dict(zip(_ASSET_COLS, rows[0], strict=True))) if rows else None

    def asset_by_id(self, asset_id: str) -> AssetRecord | None:
        rows = self._read("SELECT asset_key FROM assets WHERE asset_id = ?", (asset_id,))
        return self.asset(rows[0][0]) if rows else None

    def set_asset(
        self, asset_key: str, *, asset_id: str | None = None, state: AssetState | None = None
    ) -> None:
        """Record an asset's id and/or move its record to ``state`` (guarded by
        :data:`~agent.queue.states.ASSET_MOVES`: IllegalMove if the record is in a state
        that may not become ``state``). A record that is gone is left so."""
        sets: list[str] = ["updated_at = ?"]
        args: list[Any] = [time.time()]
        where, wargs = "asset_key = ?", [asset_key]
        if asset_id is not None:
            sets.append("asset_id = ?")
            args.append(asset_id)
        if state is not None:
            state = AssetState(state)
            sets.append("state = ?")
            args.append(str(state))
            where += self._asset_guard(state, wargs)
        with self._txn() as db:
            cur = db.execute(f"UPDATE assets SET {', '.join(sets)} WHERE {where}",
                             (*args, *wargs))
            if not cur.rowcount and state is not None:
                self._illegal_asset_move(db, asset_key, state)

    @staticmethod
    def _asset_guard(to: AssetState, args: list[Any]) -> str:
        """The ``AND state IN (…)`` of an update moving an asset record to ``to`` (its
        arguments appended to ``args``)."""
        start = sources(ASSET_MOVES, to)
        args += map(str, start)
        return f" AND state IN ({','.join('?' * len(start))})"

    @staticmethod
    def _illegal_asset_move(db: sqlite3.Connection, asset_key: str, to: AssetState) -> None:
        """After a guarded update changed nothing: IllegalMove unless the record is gone."""
        row = db.execute("SELECT state FROM assets WHERE asset_key = ?", (asset_key,)).fetchone()
        if row is not None:
            check_move(ASSET_MOVES, AssetState(row[0]), to, f"asset record {asset_key}")

    def components(self, asset_key: str) -> list[ComponentRecord]:
        rows = self._read(f"SELECT {', '.join(_COMPONENT_COLS)} FROM components "
                          "WHERE asset_key = ? ORDER BY name", (asset_key,))
        return [_component(dict(zip(_COMPONENT_COLS, r, strict=True))) for r in rows]

    def component_by_url_hash(self, url_hash: str) -> ComponentRecord | None:
        rows = self._read("SELECT asset_key, name FROM components WHERE url_hash = ?", (url_hash,))
        if not rows:
            return None
        return next(c for c in self.components(rows[0][0]) if c.name == rows[0][1])

    def update_component(self, asset_key: str, name: str, **cols: Any) -> None:
        allowed = {
            "path",
            "size",
            "mtime_ns",
            "ino",
            "dev",
            "content_type",
            "part_size",
            "sha256",
            "uploaded",
            "url_hash",
        }
        assert set(cols) <= allowed, cols
        sets = ", ".join(f"{k} = ?" for k in cols)
        with self._txn() as db:
            db.execute(
                f"UPDATE components SET {sets} WHERE asset_key = ? AND name = ?",
                (*cols.values(), asset_key, name),
            )

    def mark_uploaded(self, items: list[tuple[str, str, str]]) -> None:
        """Components whose bytes storage has, ``(asset_key, name, sha256)``: one
        transaction for them all (see :class:`agent.queue.aqueue.Batched`)."""
        with self._txn() as db:
            db.executemany(
                "UPDATE components SET sha256 = ?, uploaded = 1 WHERE asset_key = ? AND name = ?",
                [(sha, key, name) for key, name, sha in items],
            )

    def _set_each(self, asset_key: str, column: str, values: dict[str, str]) -> None:
        """One column of many components (by name), in one transaction."""
        assert column in ("sha256", "url_hash"), column
        with self._txn() as db:
            db.executemany(
                f"UPDATE components SET {column} = ? WHERE asset_key = ? AND name = ?",
                [(v, asset_key, n) for n, v in values.items()],
            )

    def set_digests(self, asset_key: str, digests: dict[str, str]) -> None:
        """The SHA-256 of each named component's registered version."""
        self._set_each(asset_key, "sha256", digests)

    def set_url_hashes(self, asset_key: str, hashes: dict[str, str]) -> None:
        self._set_each(asset_key, "url_hash", hashes)

    def parts(self, asset_key: str, name: str) -> list[PartRecord]:
        rows = self._read(
            f"SELECT {', '.join(_PART_COLS)} FROM parts WHERE asset_key = ? AND name = ? "
            "ORDER BY part_number",
            (asset_key, name),
        )
        return [PartRecord(**dict(zip(_PART_COLS, r, strict=True))) for r in rows]

    def record_part(self, asset_key: str, name: str, part: PartRecord) -> None:
        with self._txn() as db:
            db.execute(
                "INSERT OR REPLACE INTO parts (asset_key, name, part_number, part_size, size, etag)"
                " VALUES (?,?,?,?,?,?)",
                (asset_key, name, part.part_number, part.part_size, part.size, part.etag),
            )

    def clear_parts(self, asset_key: str, name: str) -> None:
        with self._txn() as db:
            db.execute("DELETE FROM parts WHERE asset_key = ? AND name = ?", (asset_key, name))

    def reset_asset(self, asset_key: str) -> None:
        """Forget everything sent for this asset (it was abandoned): a fresh registration
        key, no id, nothing uploaded."""
        args: list[Any] = [f"register:{new_id('la')}", str(AssetState.NEW), time.time(),
                           asset_key]
        where = "asset_key = ?" + self._asset_guard(AssetState.NEW, args)
        with self._txn() as db:
            cur = db.execute(
                "UPDATE assets SET register_key = ?, asset_id = NULL, state = ?, "
                f"updated_at = ? WHERE {where}", args)
            if not cur.rowcount:
                self._illegal_asset_move(db, asset_key, AssetState.NEW)
            db.execute(
                "UPDATE components SET uploaded = 0, sha256 = NULL, part_size = NULL, "
                "url_hash = NULL WHERE asset_key = ?",
                (asset_key,),
            )
            db.execute("DELETE FROM parts WHERE asset_key = ?", (asset_key,))
