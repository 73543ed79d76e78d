"""Rows of the run registry and of the watcher (schema v2): runs the daemon tracks, and
what was decided about each watched checkpoint.

Functions over a :class:`~agent.queue.store.Queue` (its connection and lock), called
through :class:`~agent.queue.aqueue.AsyncQueue` like the Queue's own methods. A sealed
checkpoint's upload job and its ``watched`` row are written in one transaction: a crash
can never leave a job without the row that says its checkpoint was sealed (which would
seal it again after a restart) nor the reverse.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field, fields
from typing import Any

from agent.queue.states import WATCHED_MOVES, RunState, WatchedState, check_move, sources
from agent.queue.store import (
    JOB_MOVES,
    AssetRecord,
    Job,
    JobKind,
    JobState,
    Queue,
    _rfc3339,
    new_id,
)

# ---- runs -----------------------------------------------------------------------------------


@dataclass
class RunRow:
    run_id: str
    uid: int
    pid: int | None
    pid_start: int | None
    wrapper_pid: int | None
    liveness: str  # pid | lease
    lease_s: float
    on_exit: str  # drain | abandon
    watch: list[dict[str, Any]]
    state: RunState  # running | ending | ended (dying is never stored)
    status: str | None = None
    exit_code: int | None = None
    last_seen: float = field(default_factory=time.time)
    created_at: float = field(default_factory=time.time)
    cred_id: str | None = None
    """The caller's own Chronicle credential (schema v3): the run and what the watcher
    uploads for it are made with it."""
    updated_at: float | None = None
    """When the row last changed (read, never written from here): for an ended run, when
    it ended."""


_RUN_COLS = tuple(f.name for f in fields(RunRow))
"""The columns of ``runs`` a run row is read from and saved to, by name."""


def _run(row: dict[str, Any]) -> RunRow:
    """A run row from its row, by column name."""
    return RunRow(**{**row, "watch": json.loads(row["watch"]), "state": RunState(row["state"])})


def save_run(q: Queue, r: RunRow) -> None:
    values = {c: getattr(r, c) for c in _RUN_COLS} | {
        "watch": json.dumps(r.watch), "state": str(r.state), "updated_at": time.time()}
    with q._txn(durable=True) as db:
        db.execute(
            f"INSERT OR REPLACE INTO runs ({', '.join(values)}) "
            f"VALUES ({','.join('?' * len(values))})", tuple(values.values()))


def run_state(q: Queue, run_id: str) -> RunState | None:
    """The run's state here, or None for a run this daemon does not know."""
    rows = q._read("SELECT state FROM runs WHERE run_id = ?", (run_id,))
    return RunState(rows[0][0]) if rows else None


def update_run(q: Queue, run_id: str, **cols: Any) -> None:
    allowed = {"state", "status", "exit_code", "last_seen", "watch"}
    assert set(cols) <= allowed, cols
    if "watch" in cols:
        cols["watch"] = json.dumps(cols["watch"])
    sets = ", ".join(f"{k} = ?" for k in cols)
    with q._txn() as db:
        db.execute(f"UPDATE runs SET {sets}, updated_at = ? WHERE run_id = ?",
                   (*cols.values(), time.time(), run_id))


def load_runs(q: Queue, states: tuple[RunState, ...] = (RunState.RUNNING, RunState.ENDING,
                                                        RunState.ENDED)) -> list[RunRow]:
    marks = ",".join("?" * len(states))
    rows = q._read(f"SELECT {', '.join(_RUN_COLS)} FROM runs WHERE state IN ({marks}) "
                   "ORDER BY created_at", tuple(map(str, states)))
    return [_run(dict(zip(_RUN_COLS, r, strict=True))) for r in rows]


# ---- watched checkpoints --------------------------------------------------------------------


@dataclass
class WatchedRow:
    ckpt_id: str
    path: str
    run_id: str | None
    rule: str
    state: WatchedState
    seal: str | None = None
    fingerprint: str | None = None
    register_key: str | None = None
    job_id: str | None = None
    snapshot: str | None = None
    staged: dict[str, Any] | None = None
    """What the snapshot holds: {"path": …, "files": {rel: [size, mtime_ns, ino, how]}}
    (each file a :class:`~agent.watch.staging.StagedFile`, stored as a JSON list)."""
    created_at: float = field(default_factory=time.time)
    ident: str | None = None
    """Which file or directory was decided (``Scan.ident``); None on rows of schema < 5."""
    top_mtime_ns: int | None = None
    """Its own mtime then (a directory's changes when entries come or go)."""


_W_COLS = tuple(f.name for f in fields(WatchedRow))
"""The columns of ``watched`` a row is read from and inserted with, by name."""
_W_N = len(_W_COLS)


def _watched(values: tuple[Any, ...]) -> WatchedRow:
    """A watched row from the values of :data:`_W_COLS`, by name."""
    row = dict(zip(_W_COLS, values, strict=True))
    return WatchedRow(**{**row, "state": WatchedState(row["state"]),
                         "staged": json.loads(row["staged"]) if row["staged"] else None})


def _insert_watched(db: sqlite3.Connection, w: WatchedRow) -> None:
    values = {c: getattr(w, c) for c in _W_COLS} | {
        "state": str(w.state),
        "staged": json.dumps(w.staged) if w.staged is not None else None,
        "updated_at": time.time()}
    db.execute(f"INSERT INTO watched ({', '.join(values)}) "
               f"VALUES ({','.join('?' * len(values))})", tuple(values.values()))


def _insert_job(db: sqlite3.Connection, kind: JobKind, state: JobState, uid: int,
                run_id: str | None, payload: dict[str, Any], bytes_total: int,
                error: dict[str, str] | None = None) -> str:
    now = time.time()
    jid = new_id("job")
    db.execute(  # a checkpoint of a run is uploaded with the run's credential, if any
        "INSERT INTO jobs (job_id, kind, state, uid, run_id, payload, bytes_total, "
        "error_code, error_message, created_at, updated_at, cred_id) VALUES "
        "(?,?,?,?,?,?,?,?,?,?,?,(SELECT cred_id FROM runs WHERE run_id = ? AND uid = ?))",
        (jid, str(kind), str(state), uid, run_id, json.dumps(payload), bytes_total,
         error["code"] if error else None, error["message"] if error else None, now, now,
         run_id, uid),
    )
    return jid


def new_ckpt_id() -> str:
    return new_id("ck")


def seal_checkpoint(q: Queue, w: WatchedRow, uid: int, payload: dict[str, Any],
                    bytes_total: int) -> Job:
    """Queue the upload of a sealed checkpoint's snapshot and record the seal, atomically."""
    with q._txn(durable=True) as db:
        w.job_id = _insert_job(db, JobKind.UPLOAD, JobState.QUEUED, uid, w.run_id, payload,
                               bytes_total)
        _insert_watched(db, w)
    job = q.get(w.job_id)
    assert job is not None
    return job


def record_abandoned(q: Queue, w: WatchedRow, uid: int, payload: dict[str, Any],
                     error: dict[str, str], state: JobState = JobState.ABANDONED) -> Job:
    """A checkpoint that never becomes an asset: a job born ``abandoned`` (or ``lost``: a
    checkpoint its writer completed that could not be captured), so that ``jobs`` shows
    it, and its row."""
    with q._txn(durable=True) as db:
        w.job_id = _insert_job(db, JobKind.UPLOAD, state, uid, w.run_id, payload, 0, error)
        _insert_watched(db, w)
    job = q.get(w.job_id)
    assert job is not None
    return job


def record_watched(q: Queue, w: WatchedRow) -> None:
    with q._txn() as db:
        _insert_watched(db, w)


def set_watched(q: Queue, ckpt_id: str, *, state: WatchedState,
                snapshot: str | None = None) -> None:
    """Move a watched row to ``state`` (guarded by :data:`~agent.queue.states.WATCHED_MOVES`:
    IllegalMove if its state may not become ``state``; a row that is gone is left so)."""
    state = WatchedState(state)
    start = sources(WATCHED_MOVES, state)
    with q._txn() as db:
        cur = db.execute(
            "UPDATE watched SET state = ?, snapshot = ?, updated_at = ? WHERE ckpt_id = ? "
            f"AND state IN ({','.join('?' * len(start))})",
            (str(state), snapshot, time.time(), ckpt_id, *map(str, start)))
        if not cur.rowcount:
            row = db.execute("SELECT state FROM watched WHERE ckpt_id = ?",
                             (ckpt_id,)).fetchone()
            if row is not None:
                check_move(WATCHED_MOVES, WatchedState(row[0]), state, f"checkpoint {ckpt_id}")


def latest_watched(q: Queue) -> list[WatchedRow]:
    """The latest decision about every path."""
    rows = q._read(
        f"SELECT {', '.join(_W_COLS)} FROM watched w WHERE created_at = "
        "(SELECT max(created_at) FROM watched v WHERE v.path = w.path) ORDER BY created_at")
    return [_watched(r) for r in rows]


def staged_rows(q: Queue) -> list[tuple[WatchedRow, str, str | None]]:
    """Rows whose snapshot is still in the staging area, with their job's state and error
    code."""
    rows = q._read(
        f"SELECT {', '.join('w.' + c for c in _W_COLS)}, j.state, "
        "j.error_code FROM watched w JOIN jobs j ON j.job_id = w.job_id "
        "WHERE w.snapshot IS NOT NULL")
    return [(_watched(r[:_W_N]), r[_W_N], r[_W_N + 1]) for r in rows]


def relabel_abandoned(q: Queue, job_id: str, expect: tuple[JobState, ...], code: str,
                      message: str) -> bool:
    """A job that ended because its snapshot was superseded is shown as ``abandoned``."""
    for state in expect:
        check_move(JOB_MOVES, state, JobState.ABANDONED, f"job {job_id}")
    marks = ",".join("?" * len(expect))
    with q._txn() as db:
        cur = db.execute(
            f"UPDATE jobs SET state = ?, error_code = ?, error_message = ?, "
            f"lease_owner = NULL, updated_at = ? WHERE job_id = ? AND state IN ({marks})",
            (str(JobState.ABANDONED), code, message, time.time(), job_id, *map(str, expect)))
        return bool(cur.rowcount)


# ---- what a dead run left unfinished -----------------------------------------------------------


def unfinalized_presigned(q: Queue, run_id: str) -> list[AssetRecord]:
    """Assets of the run registered through the three-step flow that nothing will ever
    finalize: no finalize job (and no upload/inline job that owns them)."""
    rows = q._read(
        "SELECT asset_key FROM assets a WHERE a.run_id = ? AND a.state IN ('new', 'registered') "
        "AND a.asset_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM jobs j WHERE "
        "j.asset_key = a.asset_key AND j.kind IN ('upload', 'inline', 'finalize'))",
        (run_id,))
    out = [q.asset(r[0]) for r in rows]
    return [a for a in out if a is not None]


# ---- what became of a run's checkpoints ------------------------------------------------------

DETAILS = ("ready", "uploading", "failed", "lost", "abandoned", "superseded", "elsewhere")
"""What became of a checkpoint, in detail, from its ``watched`` row and its job: ``ready``
(its job is done), ``uploading`` (queued or running), ``failed`` (``retry`` can still send
it), ``lost`` (its writer completed it but it could not be captured), ``abandoned`` (not
sealed when its run ended, cancelled, invalid...), ``superseded`` (a later version of the
same path replaced this one), ``elsewhere`` (another agent sharing the filesystem claimed
it)."""

FATE_OF = {"ready": "ready", "uploading": "sealed", "failed": "sealed", "elsewhere": "sealed",
           "lost": "lost", "abandoned": "abandoned", "superseded": "abandoned"}
"""A checkpoint's fate (``sealed|ready|lost|abandoned``) by its detail: sealed and not (yet)
ready — uploading, failed, or uploaded by another agent — is ``sealed``."""

_FATE_SQL = """CASE
    WHEN w.state = 'elsewhere' THEN 'elsewhere'
    WHEN w.state = 'superseded' THEN 'superseded'
    WHEN j.state = 'done' THEN 'ready'
    WHEN j.state IN ('queued', 'running') THEN 'uploading'
    WHEN j.state = 'failed' THEN 'failed'
    WHEN j.state = 'lost' OR (j.state IS NULL AND w.state = 'lost') THEN 'lost'
    WHEN j.state IS NULL AND w.state = 'done' THEN 'ready'
    ELSE 'abandoned' END"""
"""The fate of a ``watched w`` row LEFT JOINed to its ``jobs j``. A job may be gone (pruned
after queue.finished_retention_s): its row's own state says what became of it."""

COUNTED = ("sealed", "ready", "uploading", "failed", "lost", "abandoned", "elsewhere")
"""The counts of a run's summary; ``sealed`` counts the checkpoints this agent sealed
(whatever their fate since: ready, uploading, failed, or abandoned after their seal);
``superseded`` versions are not counted (the version that replaced them is)."""


@dataclass
class CheckpointFate:
    ckpt_id: str
    path: str
    seal: str | None
    detail: str
    job_id: str | None
    job_state: str | None
    error_code: str | None
    error_message: str | None
    asset_id: str | None
    asset_type: str | None
    bytes_total: int | None
    created_at: float

    def to_api(self) -> dict[str, Any]:
        reason = None
        if self.error_code:
            reason = {"code": self.error_code, "message": self.error_message or ""}
        elif self.detail in _REASONS:
            reason = _REASONS[self.detail]
        return {"ckpt_id": self.ckpt_id, "path": self.path, "seal": self.seal,
                "fate": FATE_OF[self.detail], "detail": self.detail,
                "job_id": self.job_id, "job_state": self.job_state,
                "reason": reason, "asset_id": self.asset_id, "asset_type": self.asset_type,
                "bytes_total": self.bytes_total, "created_at": _rfc3339(self.created_at)}


_FATE_SELECT = {
    "ckpt_id": "w.ckpt_id", "path": "w.path", "seal": "w.seal", "detail": _FATE_SQL,
    "job_id": "w.job_id", "job_state": "j.state", "error_code": "j.error_code",
    "error_message": "j.error_message", "asset_id": "a.asset_id",
    "asset_type": "json_extract(j.payload, '$.asset_type')", "bytes_total": "j.bytes_total",
    "created_at": "w.created_at",
}
"""Each field of a checkpoint's fate, by the SQL that reads it (``watched w``, its ``jobs j``,
their ``assets a``)."""

_REASONS = {
    "elsewhere": {"code": "claimed_elsewhere", "message": "another agent sharing this "
                  "filesystem claimed it at its seal and uploads it"},
    "superseded": {"code": "superseded", "message": "a later version of this path "
                   "replaced it"},
}
"""The reason of a fate its job (if any) does not explain."""


def run_checkpoints(q: Queue, run_ids: list[str] | None = None
                    ) -> dict[str, list[CheckpointFate]]:
    """Per run (of ``run_ids``, None: every run): every decision about its checkpoints (one
    row per sealed version, oldest first), with its fate, its job and the asset it became."""
    where = "w.run_id IS NOT NULL"
    if run_ids is not None:
        where = f"w.run_id IN ({','.join('?' * len(run_ids))})"
    rows = q._read(
        f"SELECT w.run_id, {', '.join(_FATE_SELECT.values())} FROM watched w "
        "LEFT JOIN jobs j ON j.job_id = w.job_id "
        f"LEFT JOIN assets a ON a.asset_key = j.asset_key WHERE {where} "
        "ORDER BY w.created_at, w.ckpt_id", tuple(run_ids or ()))
    out: dict[str, list[CheckpointFate]] = {rid: [] for rid in run_ids or ()}
    for run_id, *values in rows:
        out.setdefault(run_id, []).append(
            CheckpointFate(**dict(zip(_FATE_SELECT, values, strict=True))))
    return out


def checkpoint_counts(q: Queue, run_ids: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Per run (of ``run_ids``, None: every run): how many of its checkpoints met each fate
    (:data:`COUNTED`; every key present, 0 when none)."""
    where = "w.run_id IS NOT NULL"
    if run_ids is not None:
        where = f"w.run_id IN ({','.join('?' * len(run_ids))})"
    rows = q._read(
        f"SELECT w.run_id, {_FATE_SQL} AS fate, w.seal IS NOT NULL, count(*) FROM watched w "
        f"LEFT JOIN jobs j ON j.job_id = w.job_id WHERE {where} GROUP BY 1, 2, 3",
        tuple(run_ids or ()))
    out = {rid: dict.fromkeys(COUNTED, 0) for rid in run_ids or ()}
    for rid, fate, sealed, n in rows:
        counts = out.setdefault(rid, dict.fromkeys(COUNTED, 0))
        if fate == "superseded":
            continue
        if fate in counts:
            counts[fate] += n
        if sealed and fate != "elsewhere":
            counts["sealed"] += n
    return out
