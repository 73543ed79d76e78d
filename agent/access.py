"""What a caller may make the daemon touch: the confused-deputy guard.

The daemon usually runs with more rights than its callers (as root, to read every user's
checkpoints). A caller identified by SO_PEERCRED may have it upload only files the caller
could read itself, download only into directories the caller could write, and only under
``agent.roots`` when roots are configured. Paths are resolved first, so a symlink that
leaves a root is judged by where it leads. Permission bits are checked for the caller's uid
and groups along the whole path (search on every directory); POSIX ACLs are not consulted,
so an ACL-only grant is refused (documented in docs/security.md).
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, field

from agent.errors import UsageError


class Refused(UsageError):
    """The caller may not have the daemon touch this path."""

    code = "forbidden"


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int = 0
    groups: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of(cls, pid: int, uid: int, gid: int) -> Caller:
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = frozenset(os.getgrouplist(name, gid))
        except KeyError:
            groups = frozenset({gid})
        return cls(uid, gid, pid, groups | {gid})


def _allowed(st: os.stat_result, caller: Caller, want: int) -> bool:
    """``want`` is a mask of 4 (read), 2 (write), 1 (search/execute)."""
    if caller.uid == 0:
        return True
    if st.st_uid == caller.uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in caller.groups:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def _walk_to(real: str, caller: Caller) -> None:
    """The caller must be able to search every directory above ``real``."""
    parts = real.strip("/").split("/")
    cur = "/"
    for part in parts[:-1]:
        cur = os.path.join(cur, part)
        if not _allowed(os.stat(cur), caller, 1):
            raise Refused(f"{real}: you (uid {caller.uid}) cannot search {cur}")


def _within_roots(real: str, roots: list[str], what: str) -> None:
    if not roots:
        return
    for root in roots:
        r = os.path.realpath(root)
        if os.path.commonpath([r, real]) == r:
            return
    raise Refused(f"{what} {real} is outside the directories this daemon serves "
                  f"(agent.roots: {', '.join(roots)})")


def check_readable(path: str, caller: Caller, roots: list[str]) -> str:
    """The resolved path, if the caller may have it uploaded; raises Refused otherwise.
    Runs in a thread (it stats every directory on the way)."""
    real = os.path.realpath(path)
    _within_roots(real, roots, "path")
    if real != os.path.abspath(path) and roots:
        _within_roots(real, roots, "symlink target")
    try:
        st = os.stat(real)
        _walk_to(real, caller)
    except FileNotFoundError:
        raise UsageError(f"no such file or directory: {path}") from None
    want = 4 | 1 if stat.S_ISDIR(st.st_mode) else 4
    if not _allowed(st, caller, want):
        raise Refused(f"{path}: you (uid {caller.uid}) cannot read it, so the daemon will "
                      "not upload it for you")
    return real


def check_file_readable(path: str, caller: Caller) -> None:
    """For each file of a directory upload (the directory itself was checked)."""
    if caller.uid == 0:
        return
    st = os.stat(path)
    if not _allowed(st, caller, 4):
        raise Refused(f"{path}: you (uid {caller.uid}) cannot read it, so the daemon will "
                      "not upload it for you")


def check_writable_dest(dest: str, caller: Caller, roots: list[str]) -> None:
    """A download destination: the caller must be able to create it (write and search its
    parent), or write into it when it exists."""
    real_parent = os.path.realpath(os.path.dirname(dest.rstrip("/")) or "/")
    _within_roots(real_parent, roots, "destination")
    target = dest if os.path.isdir(dest) else real_parent
    try:
        _walk_to(os.path.realpath(target) + "/x", caller)
        st = os.stat(target)
    except FileNotFoundError:
        raise UsageError(f"destination's parent directory does not exist: {real_parent}") \
            from None
    if not _allowed(st, caller, 2 | 1):
        raise Refused(f"{target}: you (uid {caller.uid}) cannot write there, so the daemon "
                      "will not download into it for you")
