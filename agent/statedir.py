"""The daemon's and the local server's state directories: private, owned, writable.

A state dir holds callers' Chronicle tokens (``queue.db``), signed URLs (``server.db``) and
signing keys. It must be ours and reachable by no one else:

- created 0700; an existing one that is group/other accessible is tightened to 0700 (when
  we own it); one owned by another uid, not a directory, or not writable is refused at
  start with one line naming the directory and the reason (:class:`StateDirError`, a
  configuration error: exit code 2);
- every file in it is created private: the daemon and ``chronicle-agent server`` run with
  ``umask 077`` (:func:`private_umask`), and SQLite databases are created 0600 before
  SQLite opens them, so that their ``-wal`` and ``-shm`` files (SQLite gives them the
  database's permission bits) are 0600 too (:func:`private_sqlite`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from agent.errors import ConfigError

PRIVATE_UMASK = 0o077


class StateDirError(ConfigError):
    """A state directory that cannot be used (exit code 2)."""

    code = "state_dir_unusable"


def private_umask() -> int:
    """Set the process umask to 077 (the daemon, the standalone server); returns the old
    one. Files that must be shared (the socket and its directory) get explicit modes."""
    return os.umask(PRIVATE_UMASK)


def _reason(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "it is on a read-only filesystem"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"it is not writable by uid {os.geteuid()} ({e.strerror})"
    if e.errno == errno.ENOSPC:
        return "its filesystem is full"
    return e.strerror or str(e)


def prepare_state_dir(path: Path, what: str = "state dir") -> None:
    """Create ``path`` 0700 (with its parents) or check and tighten an existing one, and
    check that files can be created in it. Raises :class:`StateDirError`, one line."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise StateDirError(f"{what} {path} cannot be used: it is not a directory") from None
    except OSError as e:
        raise StateDirError(f"{what} {path} cannot be created: {_reason(e)}") from None
    try:
        st = os.stat(path)
    except OSError as e:
        raise StateDirError(f"{what} {path} cannot be used: {_reason(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"{what} {path} cannot be used: it is not a directory")
    me = os.geteuid()
    if st.st_uid != me:
        raise StateDirError(
            f"{what} {path} cannot be used: it is owned by uid {st.st_uid}, not by this "
            f"process's uid {me} (it holds tokens: it must be ours, mode 0700)")
    if stat.S_IMODE(st.st_mode) != 0o700:
        try:
            os.chmod(path, 0o700)
        except OSError as e:
            raise StateDirError(
                f"{what} {path} is mode {stat.S_IMODE(st.st_mode):04o} and cannot be made "
                f"0700: {_reason(e)}") from None
    probe = path / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StateDirError(f"{what} {path} cannot be written: {_reason(e)}") from None


def sqlite_files(db: Path) -> list[Path]:
    """The database and its WAL-mode companions."""
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
            db.with_name(db.name + "-journal")]


def private_sqlite(db: Path) -> None:
    """Tighten an SQLite database and its ``-wal``/``-shm`` files to 0600 before it is
    opened (files left 0644 by an older version). SQLite creates the companions with the
    database's bits, so a database created 0600 keeps them private."""
    for p in sqlite_files(db):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(p).st_mode) & 0o077:
                os.chmod(p, 0o600)


def create_private(path: Path) -> None:
    """Create an empty file 0600 (it must not exist)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def shared_makedirs(path: str, mode: int) -> None:
    """``os.makedirs(path, mode, exist_ok=True)`` that gives ``mode`` to every directory it
    creates whatever the umask (the daemon's is 077): for the few directories other users or
    agents must reach (staging claims under watched roots)."""
    missing: list[str] = []
    p = os.path.abspath(path)
    while not os.path.lexists(p) and p != os.path.dirname(p):
        missing.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, mode=mode, exist_ok=True)
    for d in missing:
        with contextlib.suppress(OSError):
            os.chmod(d, mode)
