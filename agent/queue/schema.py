"""The queue's SQLite schema, its migrations, and opening the database safely.

The database lives in the state directory on local disk (WAL does not work on network
filesystems). A database that is not ours, or is corrupt, is refused at open with a message
that says how to get out (:class:`QueueCorrupt`).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from agent.errors import AgentError
from agent.statedir import create_private, private_sqlite, sqlite_files

APP_ID = 0x43484147  # "CHAG", in SQLite's application_id header field
SCHEMA_VERSION = 6

_V1 = """
CREATE TABLE jobs (
    job_id           TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    state            TEXT NOT NULL,
    uid              INTEGER NOT NULL,
    run_id           TEXT,
    asset_key        TEXT,
    payload          TEXT NOT NULL,
    result           TEXT,
    warnings         TEXT,
    bytes_total      INTEGER NOT NULL DEFAULT 0,
    bytes_done       INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    next_attempt_at  REAL NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL
);
CREATE INDEX jobs_state ON jobs (state, next_attempt_at);
CREATE INDEX jobs_run ON jobs (run_id);
CREATE INDEX jobs_asset ON jobs (asset_key);

-- One row per Chronicle asset the agent uploads. register_key is the Idempotency-Key of the
-- registration: it is stored here before the request is sent, so a crash between sending
-- and storing the response repeats the same key and Chronicle creates nothing new.
CREATE TABLE assets (
    asset_key    TEXT PRIMARY KEY,
    register_key TEXT NOT NULL UNIQUE,
    asset_id     TEXT UNIQUE,
    asset_type   TEXT NOT NULL,
    run_id       TEXT,
    visibility   TEXT,
    uid          INTEGER NOT NULL,
    state        TEXT NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);

CREATE TABLE components (
    asset_key    TEXT NOT NULL REFERENCES assets (asset_key) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    path         TEXT,
    size         INTEGER,
    mtime_ns     INTEGER,
    ino          INTEGER,
    dev          INTEGER,
    content_type TEXT,
    part_size    INTEGER,
    sha256       TEXT,
    uploaded     INTEGER NOT NULL DEFAULT 0,
    url_hash     TEXT,
    PRIMARY KEY (asset_key, name)
);
CREATE INDEX components_url ON components (url_hash);

-- A part's ETag is stored the moment storage acknowledges it.
CREATE TABLE parts (
    asset_key   TEXT NOT NULL,
    name        TEXT NOT NULL,
    part_number INTEGER NOT NULL,
    part_size   INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    etag        TEXT NOT NULL,
    PRIMARY KEY (asset_key, name, part_number),
    FOREIGN KEY (asset_key, name) REFERENCES components (asset_key, name) ON DELETE CASCADE
);
"""


# v2: runs the daemon tracks, and what the watcher decided about each checkpoint,
# so that a restart keeps watching and tracking them and never seals a checkpoint twice.
_V2 = """
CREATE TABLE runs (
    run_id       TEXT PRIMARY KEY,
    uid          INTEGER NOT NULL,
    pid          INTEGER,
    pid_start    INTEGER,
    wrapper_pid  INTEGER,
    liveness     TEXT NOT NULL,
    lease_s      REAL NOT NULL,
    on_exit      TEXT NOT NULL,
    watch        TEXT NOT NULL,
    state        TEXT NOT NULL,
    status       TEXT,
    exit_code    INTEGER,
    last_seen    REAL NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX runs_state ON runs (state);

CREATE TABLE watched (
    ckpt_id      TEXT PRIMARY KEY,
    path         TEXT NOT NULL,
    run_id       TEXT,
    rule         TEXT NOT NULL,
    state        TEXT NOT NULL,
    seal         TEXT,
    fingerprint  TEXT,
    register_key TEXT,
    job_id       TEXT,
    snapshot     TEXT,
    staged       TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX watched_path ON watched (path);
CREATE INDEX watched_state ON watched (state);
CREATE INDEX watched_job ON watched (job_id);
"""

# v3: a caller's own Chronicle token, sent with its requests, so that what the
# daemon does for it is done as the caller (``created_by`` is the researcher). Tokens live
# only here, in the state directory (0700) and this file (0600); jobs, assets and runs name
# one by ``cred_id``, and a token no live work needs is deleted (Queue.prune_credentials).
_V3 = """
CREATE TABLE credentials (
    cred_id      TEXT PRIMARY KEY,
    uid          INTEGER NOT NULL,
    token        TEXT NOT NULL,
    principal_id TEXT,
    created_at   REAL NOT NULL
);
ALTER TABLE jobs ADD COLUMN cred_id TEXT;
ALTER TABLE assets ADD COLUMN cred_id TEXT;
ALTER TABLE runs ADD COLUMN cred_id TEXT;
"""

# v4: per-uid quotas (the uid's live jobs and payload bytes) and the pruning of finished jobs
# after queue.finished_retention_s read these.
_V4 = """
CREATE INDEX jobs_uid ON jobs (uid, state);
CREATE INDEX jobs_finished ON jobs (state, updated_at);
"""

# v5: a watcher decision is about a file or directory as it was, not about its
# path forever: its identity (device, inode, birth time) and, for a directory, its own mtime
# (which changes when entries come or go), so a rescan looks again at a path whose entry is
# another one now (a second run writing checkpoint-N again).
_V5 = """
ALTER TABLE watched ADD COLUMN ident TEXT;
ALTER TABLE watched ADD COLUMN top_mtime_ns INTEGER;
"""

# v6: several local records may name one Chronicle asset: the shares of a checkpoint that
# several nodes' agents split (agent.transfer.shares), this agent's own and one it took over
# from a silent agent, join one asset. asset_id is no longer unique, only indexed. SQLite
# cannot drop a constraint: the table is rebuilt (foreign keys off meanwhile, so that
# dropping the old table removes no component; checked before the commit).
_V6 = """
CREATE TABLE assets_v6 (
    asset_key    TEXT PRIMARY KEY,
    register_key TEXT NOT NULL UNIQUE,
    asset_id     TEXT,
    asset_type   TEXT NOT NULL,
    run_id       TEXT,
    visibility   TEXT,
    uid          INTEGER NOT NULL,
    state        TEXT NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    cred_id      TEXT
);
INSERT INTO assets_v6 (asset_key, register_key, asset_id, asset_type, run_id, visibility, uid,
                       state, created_at, updated_at, cred_id)
    SELECT asset_key, register_key, asset_id, asset_type, run_id, visibility, uid, state,
           created_at, updated_at, cred_id FROM assets;
DROP TABLE assets;
ALTER TABLE assets_v6 RENAME TO assets;
CREATE INDEX assets_id ON assets (asset_id);
"""

_MIGRATIONS = {1: _V1, 2: _V2, 3: _V3, 4: _V4, 5: _V5, 6: _V6}
"""Schema version → the script that brings the previous version to it."""


class QueueCorrupt(AgentError):
    code = "queue_corrupt"


def _way_out(path: Path) -> str:
    return (
        f"stop the daemon, move {path} (and its -wal/-shm files) aside, and start again: "
        "queued work in it is lost; see docs/operations.md, 'A broken queue database'"
    )


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    conn.execute("PRAGMA foreign_keys=OFF")  # a rebuilt table: no cascade (v6); not in a txn
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for v in range(version + 1, SCHEMA_VERSION + 1):  # each step keeps every row
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise sqlite3.IntegrityError(f"foreign keys broken by the migration: {broken[:3]}")
            conn.execute(f"PRAGMA application_id={APP_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.execute("PRAGMA foreign_keys=ON")


def _create(path: Path) -> None:
    """A new queue database, built under a temporary name (0600 from its creation, so its
    -wal/-shm are 0600 too) and renamed into place complete: a crash leaves either no
    ``queue.db`` or a whole one, never an empty file."""
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
    for p in sqlite_files(tmp):
        p.unlink(missing_ok=True)
    create_private(tmp)
    conn = sqlite3.connect(tmp, timeout=30, isolation_level=None)
    try:
        _configure(conn)
        _migrate(conn, 0)
        conn.execute("PRAGMA journal_mode=DELETE")  # everything into the main file
    finally:
        conn.close()
    os.replace(tmp, path)
    for p in sqlite_files(tmp):
        p.unlink(missing_ok=True)


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) and check the queue database; migrate it to the current
    schema. Raises QueueCorrupt for a foreign, empty or damaged file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        try:
            _create(path)
        except sqlite3.Error as e:
            raise QueueCorrupt(f"cannot create queue database {path}: {e}") from None
        size = path.stat().st_size
    if size == 0:
        # Never ours (a new database is renamed into place whole): a truncated copy, or a
        # file emptied by a full disk. Starting an empty queue over it would hide the loss.
        raise QueueCorrupt(f"queue database {path} is empty (0 bytes): its jobs are lost; "
                           f"{_way_out(path)}")
    private_sqlite(path)
    try:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise QueueCorrupt(f"cannot open queue database {path}: {e}; {_way_out(path)}") from None
    try:
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError:
            raise QueueCorrupt(f"{path} is not an SQLite database; {_way_out(path)}") from None
        if app_id != APP_ID:
            raise QueueCorrupt(
                f"{path} is not a chronicle-agent queue database (application_id "
                f"{app_id:#x}); {_way_out(path)}"
            )
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise QueueCorrupt(f"queue database {path} is damaged ({ok}); {_way_out(path)}")
        _configure(conn)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            _migrate(conn, version)
        elif version > SCHEMA_VERSION:
            raise QueueCorrupt(
                f"queue database {path} has schema {version}, newer than this agent "
                f"({SCHEMA_VERSION}); upgrade chronicle-agent or {_way_out(path)}"
            )
    except sqlite3.DatabaseError as e:
        conn.close()
        raise QueueCorrupt(f"queue database {path} is unreadable ({e}); {_way_out(path)}") from None
    except QueueCorrupt:
        conn.close()
        raise
    private_sqlite(path)
    return conn
