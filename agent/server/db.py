"""The local server's metadata in SQLite: schema, row types and queries.

All SQLite work runs on one dedicated thread (:class:`Database`), never on the event loop.
A mutating API call runs its checks and writes in one ``BEGIN IMMEDIATE`` transaction that
also stores the idempotency record, so a crash can never leave an effect without its
recorded response (which would let a retry create a second asset).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from agent.statedir import private_sqlite

T = TypeVar("T")

SCHEMA_VERSION = 5
SEARCH_SCHEMA = """
-- API 1.1 search: one FTS5 document per asset, its rowid kept in search_docs
CREATE VIRTUAL TABLE IF NOT EXISTS asset_search USING fts5(
    asset_type, names, reasons, body, tokenize = 'unicode61 remove_diacritics 2');
CREATE TABLE IF NOT EXISTS search_docs (
    asset_id TEXT PRIMARY KEY,
    doc      INTEGER NOT NULL UNIQUE
);
"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    name        TEXT,
    status      TEXT NOT NULL,          -- running | finished | failed | crashed
    created_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    ended_at    TEXT
);
CREATE TABLE IF NOT EXISTS assets (
    asset_id            TEXT PRIMARY KEY,
    asset_type          TEXT NOT NULL,
    state               TEXT NOT NULL,  -- pending | ready | abandoned
    output_of           TEXT REFERENCES runs(run_id),
    created_by          TEXT NOT NULL,
    organization_id     TEXT,
    visibility          TEXT NOT NULL,
    content_type        TEXT,
    deprecated_reason   TEXT,
    deprecated_at       TEXT,
    invalidated_reason  TEXT,
    invalidated_at      TEXT,
    abandoned_reason    TEXT,
    created_at          TEXT NOT NULL,
    finalized_at        TEXT,
    asset_key           TEXT,           -- API 1.1 asset_keys: uploaders join by it
    active_at           TEXT            -- a pending asset's last upload activity
);
CREATE INDEX IF NOT EXISTS assets_pending ON assets(state, active_at);
CREATE INDEX IF NOT EXISTS assets_by_run ON assets(output_of, state);
CREATE UNIQUE INDEX IF NOT EXISTS assets_by_key ON assets(output_of, asset_type, asset_key)
    WHERE asset_key IS NOT NULL;
""" + SEARCH_SCHEMA + """
CREATE TABLE IF NOT EXISTS components (
    asset_id        TEXT NOT NULL REFERENCES assets(asset_id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,
    name            TEXT NOT NULL,
    object_key      TEXT NOT NULL,
    size            INTEGER,            -- declared until finalize, then stored
    sha256          TEXT,
    sha256_verified INTEGER NOT NULL DEFAULT 0,
    content_type    TEXT,
    upload_id       TEXT,               -- set while planned as multipart
    part_size       INTEGER,
    uploaded        INTEGER NOT NULL DEFAULT 0,
    bound_sha256    TEXT,               -- declared at register and signed into its URL
    PRIMARY KEY (asset_id, name)
);
CREATE TABLE IF NOT EXISTS grants (
    asset_id     TEXT NOT NULL REFERENCES assets(asset_id) ON DELETE CASCADE,
    principal_id TEXT NOT NULL,
    action       TEXT NOT NULL,
    PRIMARY KEY (asset_id, principal_id, action)
);
CREATE TABLE IF NOT EXISTS experiments (
    experiment_id    TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    created_by       TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    retracted_reason TEXT,
    retracted_at     TEXT
);
CREATE TABLE IF NOT EXISTS variations (
    variation_id  TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL REFERENCES experiments(experiment_id),
    name          TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS variation_assets (
    variation_id TEXT NOT NULL REFERENCES variations(variation_id),
    asset_id     TEXT NOT NULL,
    role         TEXT NOT NULL,         -- input | output
    PRIMARY KEY (variation_id, asset_id, role)
);
CREATE INDEX IF NOT EXISTS variation_assets_by_asset ON variation_assets(asset_id);
CREATE TABLE IF NOT EXISTS idempotency (
    principal_id TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status       INTEGER NOT NULL,
    body         TEXT,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (principal_id, key)
);
""" + """
CREATE TABLE IF NOT EXISTS counters (   -- totals /metrics shows (the storage sweep's)
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
COUNTERS = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS counters"):]


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- rows -------------------------------------------------------------------------------------


@dataclass
class RunRow:
    run_id: str
    name: str | None
    status: str
    created_by: str
    created_at: str
    ended_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "ended_at": self.ended_at,
        }


@dataclass
class ComponentRow:
    name: str
    object_key: str
    position: int
    size: int | None = None
    sha256: str | None = None
    sha256_verified: bool = False
    content_type: str | None = None
    upload_id: str | None = None
    part_size: int | None = None
    uploaded: bool = False
    bound_sha256: str | None = None
    """The SHA-256 declared at register and signed into the upload URL (``checksum_urls``):
    the store refuses other bytes at this key."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "content_type": self.content_type or "application/octet-stream",
            "uploaded": self.uploaded,
        }


@dataclass
class AssetRow:
    asset_id: str
    asset_type: str
    state: str
    created_by: str
    visibility: str
    created_at: str
    output_of: str | None = None
    organization_id: str | None = None
    content_type: str | None = None
    deprecated_reason: str | None = None
    deprecated_at: str | None = None
    invalidated_reason: str | None = None
    invalidated_at: str | None = None
    abandoned_reason: str | None = None
    finalized_at: str | None = None
    asset_key: str | None = None
    """API 1.1 ``asset_keys``: the key further uploaders join this asset by."""
    components: list[ComponentRow] = field(default_factory=list)
    grants: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def flag(reason: str | None, at: str | None) -> dict[str, str] | None:
            return None if at is None else {"reason": reason or "", "at": at}

        return {
            "asset_id": self.asset_id,
            "asset_type": self.asset_type,
            "state": self.state,
            "deprecated": flag(self.deprecated_reason, self.deprecated_at),
            "invalidated": flag(self.invalidated_reason, self.invalidated_at),
            "output_of": self.output_of,
            "created_by": self.created_by,
            "organization_id": self.organization_id,
            "visibility": self.visibility,
            "content_type": self.content_type,
            "components": [c.to_json() for c in self.components],
            "created_at": self.created_at,
            "finalized_at": self.finalized_at,
            **({"key": self.asset_key} if self.asset_key is not None else {}),
            **({"abandoned_reason": self.abandoned_reason or ""}
               if self.state == "abandoned" else {}),
        }


def _columns(cls: type[Any], *not_columns: str) -> tuple[str, ...]:
    """The columns a row type is read from and written to: its fields, by name, but
    ``not_columns`` (what is read from other tables)."""
    return tuple(f.name for f in fields(cls) if f.name not in not_columns)


def _row(cols: tuple[str, ...], row: sqlite3.Row) -> dict[str, Any]:
    """A row's values by column name (``cols``: what it was selected with)."""
    return dict(zip(cols, row, strict=True))


_RUN_COLS = _columns(RunRow)
_ASSET_COLS = _columns(AssetRow, "components", "grants")
_COMP_COLS = _columns(ComponentRow)


def _asset(row: sqlite3.Row) -> AssetRow:
    return AssetRow(**_row(_ASSET_COLS, row))


def _component(row: sqlite3.Row) -> ComponentRow:
    c = _row(_COMP_COLS, row)
    return ComponentRow(**{**c, "sha256_verified": bool(c["sha256_verified"]),
                           "uploaded": bool(c["uploaded"])})


def _component_values(c: ComponentRow) -> dict[str, Any]:
    """A component's columns (:data:`_COMP_COLS`) by name, its flags stored as 0 or 1."""
    return {n: getattr(c, n) for n in _COMP_COLS} | {
        "sha256_verified": int(c.sha256_verified), "uploaded": int(c.uploaded)}


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """From ``version`` to :data:`SCHEMA_VERSION` in one transaction: 2 adds
    ``components.bound_sha256``, 3 ``assets.asset_key``, 4 the search index (every asset
    indexed; an inline asset's text is in storage, read at start by
    :func:`agent.server.assets.index_inline_texts`), 5 ``assets.active_at``."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version < 2:
            conn.execute("ALTER TABLE components ADD COLUMN bound_sha256 TEXT")
        if version < 3:
            conn.execute("ALTER TABLE assets ADD COLUMN asset_key TEXT")
            conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS assets_by_key ON "
                         "assets(output_of, asset_type, asset_key) WHERE asset_key IS NOT NULL")
        if version < 5:
            conn.execute("ALTER TABLE assets ADD COLUMN active_at TEXT")
            conn.execute("CREATE INDEX IF NOT EXISTS assets_pending ON assets(state, active_at)")
        if version < 4:
            for statement in SEARCH_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            for (asset_id,) in conn.execute("SELECT asset_id FROM assets").fetchall():
                index_asset(conn, asset_id)
            conn.execute(
                "UPDATE asset_search SET body = NULL WHERE rowid IN (SELECT d.doc FROM "
                "search_docs d JOIN components c ON c.asset_id = d.asset_id WHERE "
                "c.name = 'content' AND c.object_key = 'assets/' || d.asset_id || '/content')")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# ---- the database thread ------------------------------------------------------------------------


class Database:
    """One SQLite connection on one worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="server-db")
        self._conn: sqlite3.Connection | None = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        private_sqlite(self.path)  # signed URLs: 0600, and so its -wal/-shm
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            conn.executescript(
                f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )
        elif 1 <= version < SCHEMA_VERSION:
            _migrate(conn, version)
        elif version != SCHEMA_VERSION:
            conn.close()
            raise RuntimeError(
                f"{self.path}: schema version {version}, this server knows {SCHEMA_VERSION}"
            )
        # every presigned PUT to the disk store looks its key up (planned_key)
        conn.execute("CREATE INDEX IF NOT EXISTS components_by_key ON components(object_key)")
        conn.execute(COUNTERS)
        self._conn = conn

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._call(close)
        self._pool.shutdown(wait=True)

    def _conn_or_fail(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("database is closed")
        return self._conn

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one read transaction."""

        def run() -> T:
            conn = self._conn_or_fail()
            conn.execute("BEGIN")
            try:
                return fn(conn, *args)
            finally:
                conn.execute("COMMIT")

        return await self._call(run)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one ``BEGIN IMMEDIATE`` transaction; an exception rolls
        it back."""

        def run() -> T:
            conn = self._conn_or_fail()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._call(run)


# ---- idempotency -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IdemKey:
    principal_id: str
    key: str
    request_hash: str


def get_idempotent(conn: sqlite3.Connection, k: IdemKey) -> tuple[str, int, Any] | None:
    row = conn.execute(
        "SELECT request_hash, status, body FROM idempotency WHERE principal_id=? AND key=?",
        (k.principal_id, k.key),
    ).fetchone()
    if row is None:
        return None
    return row[0], row[1], None if row[2] is None else json.loads(row[2])


def put_idempotent(conn: sqlite3.Connection, k: IdemKey, status: int, body: Any) -> None:
    conn.execute(
        "INSERT INTO idempotency (principal_id, key, request_hash, status, body, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            k.principal_id,
            k.key,
            k.request_hash,
            status,
            None if body is None else json.dumps(body),
            utcnow(),
        ),
    )


# ---- runs --------------------------------------------------------------------------------------


def get_run(conn: sqlite3.Connection, run_id: str) -> RunRow | None:
    row = conn.execute(
        f"SELECT {', '.join(_RUN_COLS)} FROM runs WHERE run_id=?", (run_id,)
    ).fetchone()
    return None if row is None else RunRow(**_row(_RUN_COLS, row))


def insert_run(conn: sqlite3.Connection, run: RunRow) -> None:
    conn.execute(
        "INSERT INTO runs (run_id, name, status, created_by, created_at) VALUES (?, ?, ?, ?, ?)",
        (run.run_id, run.name, run.status, run.created_by, run.created_at),
    )


def end_run(conn: sqlite3.Connection, run_id: str, status: str, reason: str) -> list[str]:
    """Mark the run ended and abandon its pending assets; the abandoned asset ids."""
    at = utcnow()
    conn.execute(
        "UPDATE runs SET status=?, ended_at=? WHERE run_id=? AND ended_at IS NULL",
        (status, at, run_id),
    )
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT asset_id FROM assets WHERE output_of=? AND state='pending'", (run_id,)
        )
    ]
    conn.executemany(
        "UPDATE assets SET state='abandoned', abandoned_reason=? WHERE asset_id=?",
        [(reason, i) for i in ids],
    )
    for i in ids:
        index_asset(conn, i)
    return ids


# ---- assets ------------------------------------------------------------------------------------


def get_asset(conn: sqlite3.Connection, asset_id: str) -> AssetRow | None:
    row = conn.execute(f"SELECT {', '.join(_ASSET_COLS)} FROM assets WHERE asset_id=?",
                       (asset_id,)).fetchone()
    if row is None:
        return None
    asset = _asset(row)
    asset.components = [
        _component(r)
        for r in conn.execute(
            f"SELECT {', '.join(_COMP_COLS)} FROM components WHERE asset_id=? ORDER BY position",
            (asset_id,),
        )
    ]
    asset.grants = list_grants(conn, asset_id)
    return asset


def list_assets(
    conn: sqlite3.Connection,
    *,
    output_of: str | None = None,
    state: str | None = None,
    asset_type: str | None = None,
) -> list[AssetRow]:
    where, args = [], []
    for col, value in (("output_of", output_of), ("state", state), ("asset_type", asset_type)):
        if value is not None:
            where.append(f"{col}=?")
            args.append(value)
    sql = f"SELECT asset_id FROM assets {'WHERE ' + ' AND '.join(where) if where else ''}"
    ids = [r[0] for r in conn.execute(sql + " ORDER BY created_at, asset_id", args)]
    return [a for a in (get_asset(conn, i) for i in ids) if a is not None]


def insert_asset(conn: sqlite3.Connection, asset: AssetRow, text: str = "") -> None:
    """``text``: what search finds an inline asset by (its content as text)."""
    conn.execute(
        f"INSERT INTO assets ({', '.join(_ASSET_COLS)}) "
        f"VALUES ({', '.join('?' * len(_ASSET_COLS))})",
        tuple(getattr(asset, c) for c in _ASSET_COLS),
    )
    insert_components(conn, asset.asset_id, asset.components, text=text)


def insert_components(conn: sqlite3.Connection, asset_id: str,
                      comps: Iterable[ComponentRow], text: str | None = None) -> None:
    conn.executemany(
        f"INSERT INTO components (asset_id, {', '.join(_COMP_COLS)}) "
        f"VALUES ({', '.join('?' * (1 + len(_COMP_COLS)))})",
        [(asset_id, *_component_values(c).values()) for c in comps],
    )
    index_asset(conn, asset_id, text)


def find_keyed(conn: sqlite3.Connection, output_of: str, asset_type: str,
               key: str) -> str | None:
    """The asset that uploaders of (``output_of``, ``asset_type``, ``key``) join."""
    row = conn.execute("SELECT asset_id FROM assets WHERE output_of=? AND asset_type=? AND "
                       "asset_key=?", (output_of, asset_type, key)).fetchone()
    return None if row is None else str(row[0])


def save_components(conn: sqlite3.Connection, asset_id: str, comps: Iterable[ComponentRow]) -> None:
    conn.executemany(
        "UPDATE components SET object_key=?, size=?, sha256=?, sha256_verified=?, "
        "content_type=?, upload_id=?, part_size=?, uploaded=?, bound_sha256=? "
        "WHERE asset_id=? AND name=?",
        [
            (
                c.object_key,
                c.size,
                c.sha256,
                int(c.sha256_verified),
                c.content_type,
                c.upload_id,
                c.part_size,
                int(c.uploaded),
                c.bound_sha256,
                asset_id,
                c.name,
            )
            for c in comps
        ],
    )


def set_state(
    conn: sqlite3.Connection, asset_id: str, state: str, *, reason: str | None = None
) -> None:
    if state == "ready":
        conn.execute(
            "UPDATE assets SET state='ready', finalized_at=? WHERE asset_id=?",
            (utcnow(), asset_id),
        )
    else:
        conn.execute(
            "UPDATE assets SET state=?, abandoned_reason=? WHERE asset_id=?",
            (state, reason, asset_id),
        )
        index_asset(conn, asset_id)


def set_flag(conn: sqlite3.Connection, asset_id: str, flag: str, reason: str) -> None:
    if flag not in ("deprecated", "invalidated"):
        raise ValueError(flag)
    conn.execute(
        f"UPDATE assets SET {flag}_reason=?, {flag}_at=? WHERE asset_id=?",
        (reason, utcnow(), asset_id),
    )
    index_asset(conn, asset_id)


def set_placement(
    conn: sqlite3.Connection, asset_id: str, *, visibility: str, organization_id: str | None
) -> None:
    conn.execute(
        "UPDATE assets SET visibility=?, organization_id=? WHERE asset_id=?",
        (visibility, organization_id, asset_id),
    )


def planned_key(conn: sqlite3.Connection, asset_id: str, key: str) -> str | None:
    """The state of ``asset_id`` if one of its components is planned at ``key``, else None
    (one indexed lookup: the disk store asks it for every PUT)."""
    row = conn.execute("SELECT a.state FROM components c JOIN assets a ON a.asset_id = "
                       "c.asset_id WHERE c.object_key = ? AND c.asset_id = ?",
                       (key, asset_id)).fetchone()
    return None if row is None else str(row[0])


def touch(conn: sqlite3.Connection, asset_id: str, at: str | None = None) -> None:
    """Upload activity on a pending asset (URLs asked for, components added, its uploads
    listed, a PUT arriving): what ``server.pending_ttl_s`` counts from."""
    conn.execute("UPDATE assets SET active_at=? WHERE asset_id=? AND state='pending'",
                  (at or utcnow(), asset_id))


def idle_pending(conn: sqlite3.Connection, before: str,
                 asset_id: str | None = None) -> list[str]:
    """Pending assets with no upload activity since ``before`` (nor created since); with
    ``asset_id``, that one if it is."""
    one = " AND asset_id = ?" if asset_id is not None else ""
    return [r[0] for r in conn.execute(
        "SELECT asset_id FROM assets WHERE state='pending' AND "
        f"COALESCE(active_at, created_at) < ?{one} ORDER BY created_at",
        (before, asset_id) if asset_id is not None else (before,))]


@dataclass(frozen=True)
class Holding:
    """What the storage sweep needs to know of one asset."""

    state: str
    object_keys: frozenset[str]
    upload_ids: frozenset[str]


def holdings(conn: sqlite3.Connection, asset_ids: Iterable[str],
             keys: Iterable[str]) -> dict[str, Holding]:
    """The state of those of ``asset_ids`` that have a row, and which of ``keys`` are their
    components' object keys (with the multipart upload ids planned there): indexed lookups
    of these keys only, however many components the assets have."""
    states: dict[str, str] = {}
    ids = list(asset_ids)
    for at in range(0, len(ids), 500):
        chunk = ids[at:at + 500]
        states.update(conn.execute(
            f"SELECT asset_id, state FROM assets WHERE asset_id IN ({','.join('?' * len(chunk))})",
            chunk).fetchall())
    found: dict[str, tuple[set[str], set[str]]] = {i: (set(), set()) for i in states}
    wanted = list(keys)
    for at in range(0, len(wanted), 500):
        chunk = wanted[at:at + 500]
        for asset_id, key, upload_id in conn.execute(
                "SELECT asset_id, object_key, upload_id FROM components WHERE object_key IN "
                f"({','.join('?' * len(chunk))})", chunk):
            if asset_id in found:
                found[asset_id][0].add(key)
                if upload_id is not None:
                    found[asset_id][1].add(upload_id)
    return {i: Holding(states[i], frozenset(k), frozenset(u)) for i, (k, u) in found.items()}


def component_keys(conn: sqlite3.Connection) -> list[str]:
    """Every component's object key (to name files the disk store lost the record of)."""
    return [r[0] for r in conn.execute("SELECT object_key FROM components")]


def add_counters(conn: sqlite3.Connection, counts: dict[str, int],
                 gauges: dict[str, int] | None = None) -> None:
    """Add ``counts`` to the totals /metrics shows; set ``gauges``."""
    conn.executemany(
        "INSERT INTO counters(name, value) VALUES (?, ?) "
        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
        [(k, v) for k, v in counts.items() if v])
    conn.executemany("INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)",
                     list((gauges or {}).items()))


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    return {str(k): int(v) for k, v in conn.execute("SELECT name, value FROM counters")}


def delete_asset(conn: sqlite3.Connection, asset_id: str) -> None:
    """The row, its components and grants, and its search document, in the caller's
    transaction: a deleted asset is never found again."""
    conn.execute("DELETE FROM assets WHERE asset_id=?", (asset_id,))
    index_asset(conn, asset_id)


# ---- search (API 1.1) --------------------------------------------------------------------------


def index_asset(conn: sqlite3.Connection, asset_id: str, text: str | None = None) -> None:
    """Write the asset's search document from its row: its type, component names and
    validity reasons, and ``text`` (an inline asset's content; None keeps what the document
    has). An asset that is gone loses its document."""
    row = conn.execute("SELECT asset_type, deprecated_reason, invalidated_reason, "
                       "abandoned_reason FROM assets WHERE asset_id=?", (asset_id,)).fetchone()
    found = conn.execute("SELECT doc FROM search_docs WHERE asset_id=?", (asset_id,)).fetchone()
    if row is None:
        if found is not None:
            conn.execute("DELETE FROM asset_search WHERE rowid=?", (found[0],))
            conn.execute("DELETE FROM search_docs WHERE asset_id=?", (asset_id,))
        return
    names = " ".join(r[0] for r in conn.execute(
        "SELECT name FROM components WHERE asset_id=? ORDER BY position", (asset_id,)))
    reasons = " ".join(r for r in tuple(row)[1:] if r)
    if found is None:
        cur = conn.execute("INSERT INTO asset_search (asset_type, names, reasons, body) "
                           "VALUES (?, ?, ?, ?)", (row[0], names, reasons, text or ""))
        conn.execute("INSERT INTO search_docs (asset_id, doc) VALUES (?, ?)",
                     (asset_id, cur.lastrowid))
    else:
        conn.execute("UPDATE asset_search SET asset_type=?, names=?, reasons=?, "
                     "body=COALESCE(?, body) WHERE rowid=?",
                     (row[0], names, reasons, text, found[0]))


def fts_query(q: str) -> str:
    """The caller's words as an FTS5 query: each one quoted (no operator or column filter
    reaches FTS5 from outside), all of them required, the last one also as a prefix; ""
    when there is no word. Control characters separate words, as they do in the index
    (and a NUL would end the query string inside SQLite)."""
    words = [w for w in re.split(r"[\s\x00-\x1f\x7f]+", q) if w]
    quoted = ['"' + w.replace('"', '""') + '"' for w in words]
    if quoted:
        quoted[-1] += "*"
    return " ".join(quoted)


def search_assets(
    conn: sqlite3.Connection, principal_id: str, identities: Iterable[str],
    scopes: Iterable[str], q: str, *, asset_type: str | None = None,
    state: str | None = None, output_of: str | None = None, limit: int = 50, offset: int = 0,
) -> list[tuple[str, str]]:
    """(asset id, snippet) of the assets ``principal_id`` may read that match ``q``, best
    match first. Access is decided in the same query, from the rows as they are now
    (agent.server.auth.allows, in SQL): created by the caller, a grant of any action to one
    of its ``identities``, or a visibility that lets it read (``public``; ``organization`` /
    ``team`` and one of its ``scopes``)."""
    ids, scope_ids = sorted(set(identities)), sorted(set(scopes))
    where = ["asset_search MATCH ?",
             "(a.created_by = ? OR a.visibility = 'public'"
             f" OR (a.visibility IN ('organization', 'team') AND a.organization_id IN "
             f"({', '.join('?' * len(scope_ids)) or 'NULL'}))"
             f" OR EXISTS (SELECT 1 FROM grants g WHERE g.asset_id = a.asset_id AND "
             f"g.principal_id IN ({', '.join('?' * len(ids)) or 'NULL'})))"]
    args: list[Any] = [fts_query(q), principal_id, *scope_ids, *ids]
    for col, value in (("asset_type", asset_type), ("state", state), ("output_of", output_of)):
        if value is not None:
            where.append(f"a.{col} = ?")
            args.append(value)
    sql = ("SELECT a.asset_id, snippet(asset_search, -1, '[', ']', '…', 12) "
           "FROM asset_search JOIN search_docs d ON d.doc = asset_search.rowid "
           "JOIN assets a ON a.asset_id = d.asset_id "
           f"WHERE {' AND '.join(where)} "
           "ORDER BY bm25(asset_search, 2.0, 3.0, 2.0, 1.0), a.asset_id LIMIT ? OFFSET ?")
    return [(r[0], r[1]) for r in conn.execute(sql, [*args, limit, offset])]


def unread_texts(conn: sqlite3.Connection) -> list[tuple[str, str, str | None]]:
    """Inline assets indexed without their text (by a migration): (asset id, the key of
    its content, its content type)."""
    return [(r[0], r[1], r[2]) for r in conn.execute(
        "SELECT d.asset_id, c.object_key, c.content_type FROM asset_search s JOIN search_docs "
        "d ON d.doc = s.rowid JOIN components c ON c.asset_id = d.asset_id AND c.name = "
        "'content' WHERE s.body IS NULL")]


def search_text(conn: sqlite3.Connection, asset_id: str) -> str:
    row = conn.execute("SELECT body FROM asset_search JOIN search_docs d ON d.doc = "
                       "asset_search.rowid WHERE d.asset_id=?", (asset_id,)).fetchone()
    return str(row[0]) if row and row[0] else ""


def is_linked(conn: sqlite3.Connection, asset_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM variation_assets WHERE asset_id=? LIMIT 1", (asset_id,))
    return row.fetchone() is not None


# ---- grants ------------------------------------------------------------------------------------


def list_grants(conn: sqlite3.Connection, asset_id: str) -> list[tuple[str, str]]:
    return [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT principal_id, action FROM grants WHERE asset_id=? "
            "ORDER BY principal_id, action",
            (asset_id,),
        )
    ]


def add_grant(conn: sqlite3.Connection, asset_id: str, principal_id: str, action: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO grants (asset_id, principal_id, action) VALUES (?, ?, ?)",
        (asset_id, principal_id, action),
    )


def remove_grant(conn: sqlite3.Connection, asset_id: str, principal_id: str, action: str) -> None:
    conn.execute(
        "DELETE FROM grants WHERE asset_id=? AND principal_id=? AND action=?",
        (asset_id, principal_id, action),
    )


# ---- experiments and variations ----------------------------------------------------------------


@dataclass
class ExperimentRow:
    experiment_id: str
    name: str
    created_by: str
    created_at: str
    retracted_reason: str | None = None
    retracted_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment_id": self.experiment_id,
            "name": self.name,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "retracted": None
            if self.retracted_at is None
            else {"reason": self.retracted_reason or "", "at": self.retracted_at},
        }


@dataclass
class VariationRow:
    variation_id: str
    experiment_id: str
    name: str
    created_by: str
    created_at: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "variation_id": self.variation_id,
            "experiment_id": self.experiment_id,
            "name": self.name,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "inputs": self.inputs,
            "outputs": self.outputs,
        }


_EXPERIMENT_COLS = _columns(ExperimentRow)
_VARIATION_COLS = _columns(VariationRow, "inputs", "outputs")


def insert_experiment(conn: sqlite3.Connection, e: ExperimentRow) -> None:
    conn.execute(
        "INSERT INTO experiments (experiment_id, name, created_by, created_at) VALUES (?,?,?,?)",
        (e.experiment_id, e.name, e.created_by, e.created_at),
    )


def get_experiment(conn: sqlite3.Connection, experiment_id: str) -> ExperimentRow | None:
    row = conn.execute(
        f"SELECT {', '.join(_EXPERIMENT_COLS)} FROM experiments WHERE experiment_id=?",
        (experiment_id,),
    ).fetchone()
    return None if row is None else ExperimentRow(**_row(_EXPERIMENT_COLS, row))


def retract_experiment(conn: sqlite3.Connection, experiment_id: str, reason: str) -> None:
    conn.execute(
        "UPDATE experiments SET retracted_reason=?, retracted_at=? WHERE experiment_id=?",
        (reason, utcnow(), experiment_id),
    )


def insert_variation(conn: sqlite3.Connection, v: VariationRow) -> None:
    conn.execute(
        "INSERT INTO variations (variation_id, experiment_id, name, created_by, created_at) "
        "VALUES (?,?,?,?,?)",
        (v.variation_id, v.experiment_id, v.name, v.created_by, v.created_at),
    )
    link_assets(conn, v.variation_id, v.inputs, "input")


def link_assets(
    conn: sqlite3.Connection, variation_id: str, asset_ids: Sequence[str], role: str
) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO variation_assets (variation_id, asset_id, role) VALUES (?,?,?)",
        [(variation_id, a, role) for a in asset_ids],
    )


def get_variation(conn: sqlite3.Connection, variation_id: str) -> VariationRow | None:
    row = conn.execute(
        f"SELECT {', '.join(_VARIATION_COLS)} FROM variations WHERE variation_id=?",
        (variation_id,),
    ).fetchone()
    if row is None:
        return None
    v = VariationRow(**_row(_VARIATION_COLS, row))
    for asset_id, role in conn.execute(
        "SELECT asset_id, role FROM variation_assets WHERE variation_id=? ORDER BY rowid",
        (variation_id,),
    ):
        (v.inputs if role == "input" else v.outputs).append(asset_id)
    return v


def experiment_outputs(conn: sqlite3.Connection, experiment_id: str) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT va.asset_id FROM variation_assets va "
            "JOIN variations v ON v.variation_id = va.variation_id "
            "WHERE v.experiment_id=? AND va.role='output'",
            (experiment_id,),
        )
    ]
