"""Acting on a caller's paths as the caller: a per-thread filesystem identity.

The daemon usually runs with more rights than its callers. Every time it opens, stats,
lists, creates, renames or removes a path that a caller named (an upload's file or
directory, a component of the three-step flow, a watched run directory, a download's
destination and staging), it does so in a worker thread whose filesystem uid, gid and
supplementary groups are the caller's (``setfsuid``/``setfsgid``/``setgroups``, which the
kernel keeps per thread). The kernel then checks every step of every path resolution as
the caller, at the moment it happens: a symlink swapped in after the request, a directory
renamed away, a planted staging name, all meet the caller's own permissions, never the
daemon's. A thread whose filesystem uid is not 0 also loses CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH, CAP_CHOWN and CAP_FOWNER for as long as it is switched.

What the daemon opens as the caller it may then read through the descriptor with its own
rights (sendfile, hashing, copying into its private cache or staging area): a descriptor
carries the permission it was opened with. docs/security.md has the reasoning.

glibc's ``setgroups`` changes every thread of the process, so the supplementary groups
are set with the raw system call; ``setfsuid``/``setfsgid`` act on the calling thread only.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import pwd
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from agent.errors import UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")

_SYS_SETGROUPS = {"x86_64": 116, "amd64": 116, "aarch64": 159, "arm64": 159}.get(
    platform.machine().lower())
NOBODY_GID = 65534
"""The group of a uid with no passwd entry: no group's rights."""


class Refused(UsageError):
    """The caller may not have the daemon touch this path."""

    code = "forbidden"


@dataclass(frozen=True)
class Identity:
    """Whose rights a piece of file work runs with."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def of(cls, uid: int, gid: int | None = None) -> Identity:
        """A user as a fresh login would be: its primary group (or ``gid``, the one its
        process had) and the groups the group database gives it."""
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            g = gid if gid is not None and gid >= 0 else NOBODY_GID
            return cls(uid, g, (g,))
        g = gid if gid is not None and gid >= 0 else pw.pw_gid
        groups = set(os.getgrouplist(pw.pw_name, g)) | {g}
        return cls(uid, g, tuple(sorted(groups)))

    @classmethod
    def current(cls) -> Identity:
        return cls(os.geteuid(), os.getegid(), tuple(sorted(set(os.getgroups()))))

    @property
    def is_daemon(self) -> bool:
        """The daemon's own user: nothing to switch."""
        return self.uid == os.geteuid()


# ``None`` as an identity means the daemon's own: for paths the daemon owns (its state
# directory, its cache, its private staging area).

_libc = ctypes.CDLL(None, use_errno=True)
_local = threading.local()


def _setgroups(groups: tuple[int, ...]) -> None:
    if _SYS_SETGROUPS is None:
        raise OSError(errno.ENOSYS, f"per-thread setgroups is not known on {platform.machine()}")
    arr = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
    if _libc.syscall(_SYS_SETGROUPS, len(groups), arr) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _setfs(fn: Any, value: int) -> None:
    fn(value)
    if fn(value) != value:  # it returns the id in force: the only way to see a refusal
        raise PermissionError(errno.EPERM, "not permitted")


def _to_self() -> None:
    me = _self()  # fs uid first, so that the capabilities come back before the rest
    _setfs(_libc.setfsuid, me.uid)
    _setfs(_libc.setfsgid, me.gid)
    _setgroups(me.groups)


def _to(ident: Identity) -> None:
    _setgroups(ident.groups)
    _setfs(_libc.setfsgid, ident.gid)
    _setfs(_libc.setfsuid, ident.uid)


_SELF: Identity | None = None


def _self() -> Identity:
    global _SELF
    if _SELF is None:
        _SELF = Identity.current()
    return _SELF


def call_as(ident: Identity | None, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run ``fn`` in this (worker) thread with ``ident``'s filesystem rights, then return
    the thread to the identity it had. Nests. Never on the event loop's thread."""
    target = _self() if ident is None or ident.is_daemon else ident
    before: Identity = getattr(_local, "ident", None) or _self()
    if target == before:
        return fn(*args, **kw)
    if threading.current_thread() is threading.main_thread():
        raise RuntimeError("filesystem identity switches happen in worker threads only")
    try:
        if before != _self():
            _to_self()
        if target != _self():
            _to(target)
    except OSError as e:
        _restore(before)
        raise Refused(
            f"this daemon (uid {_self().uid}) cannot act as uid {target.uid} "
            f"({e.strerror}): it needs CAP_SETUID and CAP_SETGID to serve other users, "
            "and without them serves only its own") from None
    _local.ident = target
    try:
        return fn(*args, **kw)
    finally:
        _restore(before)


def _restore(before: Identity) -> None:
    try:
        _to_self()
        if before != _self():
            _to(before)
    except OSError:  # cannot happen (our own ids); a thread left switched must not live on
        log.critical("could not return a worker thread to the daemon's identity; exiting")
        os._exit(70)
    _local.ident = before


def thread_uid() -> int:
    """The filesystem uid this thread acts with now."""
    ident = getattr(_local, "ident", None)
    return ident.uid if ident is not None else _self().uid


async def run_as(ident: Identity | None, fn: Callable[..., T], *args: Any,
                 abandon_on_cancel: bool = False) -> T:
    """:func:`call_as` in a worker thread."""
    import anyio.to_thread  # here: the client side imports this module without an event loop

    return await anyio.to_thread.run_sync(partial(call_as, ident, fn, *args),
                                          abandon_on_cancel=abandon_on_cancel)
