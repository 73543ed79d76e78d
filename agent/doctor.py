"""``chronicle-agent doctor``: one line per check of what an upload depends on, and a
non-zero exit when any check fails.

Checks: the configuration loads; the daemon answers on its socket; Chronicle answers and
accepts our credentials; the storage behind its presigned URLs is reachable (when Chronicle
says where it is); the clocks agree (presigned URLs and SigV4 depend on it); free space
where the daemon writes; the queue database (it opens, passes ``PRAGMA quick_check``, has a
schema this agent knows, is private, and its size); inotify limits (watching). A warning
does not fail the run.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

Status = Literal["ok", "warn", "FAIL", "skip"]
GiB = 1 << 30


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    facts: dict[str, Any] | None = None
    """Measured values, for --json (the queue check's path, sizes, schema, modes)."""

    def line(self) -> str:
        return f"{self.status:<5} {self.name:<10} {self.detail}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.facts is not None:
            out.update(self.facts)
        return out


def add_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = command("doctor", "check config, socket, Chronicle, storage, clocks, queue, disk, "
                          "inotify")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(ctx: Any) -> int:
    checks = run_checks(ctx)
    if ctx.args.json:
        ctx.print_json({"ok": all(c.status != "FAIL" for c in checks),
                        "checks": [c.to_json() for c in checks]})
    else:
        for c in checks:
            ctx.print(c.line())
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def run_checks(ctx: Any) -> list[Check]:
    from agent.errors import AgentError

    out: list[Check] = []
    try:
        settings = ctx.settings()
    except AgentError as e:
        return [Check("config", "FAIL", e.message)]
    out.append(Check("config", "ok", "settings load"))

    from agent.paths import SOCKET_ENV

    health: dict[str, Any] | None = None
    sock = settings.socket_path()
    named = f" (named by {SOCKET_ENV})" if os.environ.get(SOCKET_ENV) else ""
    try:
        health = ctx.client().health()
        out.append(Check("socket", "ok",
                         f"daemon {health.get('version')} answers on {sock}{named}"))
        settings = _as_daemon(settings, health)
    except AgentError as e:
        out.append(Check("socket", "FAIL", e.message + named))

    out += _chronicle_checks(settings, health)
    out.append(queue_check(settings.state_dir()))
    out.append(_disk_check(settings.state_dir(), "state dir"))
    out.append(_inotify_check())
    return out


def _as_daemon(settings: Any, health: dict[str, Any]) -> Any:
    """The settings of the daemon that answered: the socket may name another daemon than
    the configured one (``CHRONICLE_AGENT_SOCKET``, ``--socket``), and then its state dir
    (its queue, its disk, its embedded Chronicle's endpoint) is the one to check."""
    raw = health.get("state_dir")
    if not isinstance(raw, str) or not raw or Path(raw) == settings.state_dir():
        return settings
    agent = settings.agent.model_copy(update={"state_dir": Path(raw)})
    return settings.model_copy(update={"agent": agent})


def _chronicle_checks(settings: Any, health: dict[str, Any] | None) -> list[Check]:
    from agent.chronicle import contract
    from agent.chronicle.sdk import discover
    from agent.chronicle.sync import SyncChronicle
    from agent.errors import AgentError

    try:
        url, token = discover(settings)
    except AgentError as e:
        if health and health.get("chronicle_url"):
            url, token = str(health["chronicle_url"]), None
        else:
            return [Check("chronicle", "FAIL", e.message)]
    out: list[Check] = []
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/health", timeout=5) as resp:
            body = json.loads(resp.read() or b"{}")
            date = resp.headers.get("Date")
    except (urllib.error.URLError, OSError, ValueError) as e:
        return [Check("chronicle", "FAIL", f"{url} does not answer: {getattr(e, 'reason', e)}")]
    ms = (time.monotonic() - t0) * 1000
    try:
        me = SyncChronicle(url, token, timeout_s=5, attempts=1).send(contract.me_scopes())
        try:
            own = settings.token() is not None
        except AgentError:
            own = False
        whose = (f"uploads through the daemon are made as {me.principal_id}" if own else
                 "uploads through the daemon use the daemon's own token (set "
                 "CHRONICLE_AGENT_CHRONICLE__TOKEN or chronicle.token_file to upload as "
                 "yourself)")
        out.append(Check("chronicle", "ok", f"{url} answers in {ms:.0f} ms; "
                                            f"credentials are {me.principal_id}; {whose}"))
    except AgentError as e:
        out.append(Check("chronicle", "FAIL", f"{url} answers but refuses our credentials: "
                                              f"{e.message}"))
    out.append(_clock_check(date))
    out.append(_storage_check(body.get("storage")))
    return out


def _clock_check(date: str | None) -> Check:
    if not date:
        return Check("clock", "skip", "Chronicle sent no Date header")
    skew = time.time() - email.utils.parsedate_to_datetime(date).timestamp()
    detail = f"this node is {abs(skew):.1f}s {'ahead of' if skew > 0 else 'behind'} Chronicle"
    if abs(skew) > 300:
        return Check("clock", "FAIL", detail + " (presigned URLs will be refused: fix NTP)")
    if abs(skew) > 30:
        return Check("clock", "warn", detail)
    return Check("clock", "ok", detail)


def _storage_check(storage: Any) -> Check:
    """Chronicle's health may say where its bytes live; try a TCP connection there."""
    endpoint = None
    if isinstance(storage, str) and storage.startswith("file:"):
        return Check("storage", "ok", "the local server's own disk store")
    if isinstance(storage, str) and " at " in storage:  # "s3://bucket at http://host:port"
        endpoint = storage.split(" at ", 1)[1].strip()
    elif isinstance(storage, str) and "endpoint=" in storage:
        endpoint = storage.split("endpoint=", 1)[1].split("&", 1)[0]
    if not endpoint:
        return Check("storage", "skip", "Chronicle does not say where its storage is")
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as e:
        return Check("storage", "FAIL", f"cannot connect to {host}:{port}: {e}")
    return Check("storage", "ok", f"{host}:{port} accepts connections")


QUEUE_BIG_BYTES = 1 << 30
"""A queue.db past this is worth a look (see queue.finished_retention_s and quotas)."""


def queue_check(state_dir: Path) -> Check:
    """``queue.db`` in ``state_dir``: it exists, opens read-only, is ours, passes
    ``PRAGMA quick_check``, has a known schema, it and its -wal/-shm and the state dir are
    private, and how big it is."""
    import sqlite3
    import stat

    from agent.queue.schema import APP_ID, SCHEMA_VERSION
    from agent.statedir import sqlite_files

    db = state_dir / "queue.db"
    facts: dict[str, Any] = {"path": str(db)}
    if not db.exists():
        return Check("queue", "FAIL", f"{db} does not exist (the daemon creates it at its "
                                      "first start; is agent.state_dir the daemon's?)", facts)
    if not os.access(db, os.R_OK):
        return Check("queue", "skip", f"{db} is not readable by uid {os.geteuid()}: run "
                                      "doctor as the daemon's user to check it", facts)
    files = [p for p in sqlite_files(db) if p.exists()]
    size = sum(p.stat().st_size for p in files)
    facts["size_bytes"] = size
    loose = [f"{p.name} {stat.S_IMODE(p.stat().st_mode):04o}" for p in files
             if stat.S_IMODE(p.stat().st_mode) & 0o077]
    dir_mode = stat.S_IMODE(state_dir.stat().st_mode)
    if dir_mode & 0o077:
        loose.insert(0, f"{state_dir} {dir_mode:04o}")
    facts["private"] = not loose
    if db.stat().st_size == 0:
        return Check("queue", "FAIL", f"{db} is empty (0 bytes): the daemon refuses it; move "
                                      "it aside (docs/operations.md)", facts)
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as e:
        return Check("queue", "FAIL", f"{db} does not open: {e}", facts)
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0] if app_id == APP_ID \
            else 0
    except sqlite3.Error as e:
        return Check("queue", "FAIL", f"{db} is not a readable SQLite database ({e}); "
                                      "docs/operations.md, 'A broken queue database'", facts)
    finally:
        conn.close()
    facts.update({"schema": version, "quick_check": ok, "jobs": jobs})
    where = f"{db}: "
    if app_id != APP_ID:
        return Check("queue", "FAIL", where + f"not a chronicle-agent queue (application_id "
                                              f"{app_id:#x})", facts)
    if ok != "ok":
        return Check("queue", "FAIL", where + f"quick_check says {ok}; docs/operations.md, "
                                              "'A broken queue database'", facts)
    if not 1 <= version <= SCHEMA_VERSION:
        return Check("queue", "FAIL", where + f"schema {version}, this agent knows 1 to "
                                              f"{SCHEMA_VERSION}: upgrade chronicle-agent", facts)
    if loose:
        return Check("queue", "FAIL", where + "readable by others: " + ", ".join(loose) +
                     " (callers' tokens are in it: chmod 0700 the state dir and 0600 the "
                     "files, or restart the daemon, which does)", facts)
    detail = (where + f"schema {version}, quick_check ok, private, {_size(size)}, "
              f"{jobs} job(s)")
    if size > QUEUE_BIG_BYTES:
        return Check("queue", "warn", detail + " (large: see queue.finished_retention_s and "
                                               "the quotas)", facts)
    return Check("queue", "ok", detail, facts)


def _size(n: float) -> str:
    from agent.progress import format_bytes

    return format_bytes(n)


def _disk_check(path: Path, what: str) -> Check:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    usage = shutil.disk_usage(p)
    detail = f"{usage.free / GiB:.1f} GiB free of {usage.total / GiB:.1f} GiB at {path}"
    if usage.free < 256 << 20:
        return Check("disk", "FAIL", f"{what}: {detail}")
    if usage.free < GiB or usage.free < usage.total * 0.05:
        return Check("disk", "warn", f"{what}: {detail}")
    return Check("disk", "ok", f"{what}: {detail}")


def _inotify_check() -> Check:
    try:
        instances = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
        watches = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    except (OSError, ValueError):
        return Check("inotify", "skip", "no inotify limits here (polling is used)")
    detail = f"max_user_instances {instances}, max_user_watches {watches}"
    if instances < 8 or watches < 8192:
        return Check("inotify", "warn", detail + " (low: watching falls back to polling)")
    return Check("inotify", "ok", detail)
