"""Is a run's process alive? pidfds for processes the daemon can see, leases for the rest.

A pid alone is never trusted (pids are reused): a run records its process's start time
(``/proc/<pid>/stat`` field 22) with the pid, and a pidfd is opened only if the process
with that pid still has that start time. Once open, a pidfd names that one process: it
becomes readable when the process exits (Linux ≥ 5.3), which the daemon waits for on its
event loop (``anyio.wait_readable``), so a death is seen at once, without polling.

A caller in another pid namespace (SO_PEERCRED reports pid 0 for it) cannot be watched so:
its run lives while heartbeats arrive within the lease (``runs.lease_s``).
"""

from __future__ import annotations

import os

import anyio


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'
    return raw[raw.rfind(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such
    process."""
    f = _stat_fields(pid)
    return int(f[19]) if f and len(f) > 19 else None


def parent_pid(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[1]) if f and len(f) > 1 else None


def owner_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def open_pidfd(pid: int, expected_start: int | None) -> int | None:
    """A pidfd for ``pid`` if it is still the process that started at
    ``expected_start``; None if that process is gone."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    if expected_start is not None and start_time(pid) != expected_start:
        os.close(fd)  # the pid was reused by another process
        return None
    return fd


async def wait_exit(fd: int) -> None:
    """Return when the process behind the pidfd has exited."""
    await anyio.wait_readable(fd)

