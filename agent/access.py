"""What a caller may make the daemon touch: the confused-deputy guard.

The daemon usually runs with more rights than its callers (as root, to read every user's
checkpoints). It never resolves a caller's path with those rights: every open, stat,
listing, creation and rename of a caller's path happens in a worker thread switched to the
caller's filesystem identity (:mod:`agent.fsid`), at request time and at every later
moment (the worker's scan and reads, the watcher's scans and snapshots, a download's
staging and hand-over). The kernel checks each step as the caller. The functions here run
in such a thread; they add what the kernel does not know: ``agent.roots``, checked on the
path of what was actually opened (``/proc/self/fd``), not on a name that may be swapped.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from agent.errors import UsageError
from agent.fsid import Identity, Refused, call_as, thread_uid

__all__ = ["Refused", "check_readable", "check_writable_dest", "make_dest_parents",
           "open_source", "within_roots"]

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
"""O_NONBLOCK: a FIFO named as a file must not hang a worker thread in open(2)."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
PARENT_MODE = 0o700
"""Missing parents of a download destination are made private, like the destination
itself (its staging directory is made 0700 and renamed onto it)."""


def within_roots(real: str, roots: list[str], what: str) -> None:
    if not roots:
        return
    for root in roots:
        r = os.path.realpath(root)
        if os.path.commonpath([r, real]) == r:
            return
    raise Refused(f"{what} {real} is outside the directories this daemon serves "
                  f"(agent.roots: {', '.join(str(r) for r in roots)})")


def fd_path(fd: int) -> str:
    """Where an open descriptor's file is now (as the kernel resolved it)."""
    return os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")


def open_source(path: str, roots: list[str], *, directory_ok: bool = False) -> int:
    """Open a caller's file for reading, in the calling thread's identity: a regular file
    (or a directory with ``directory_ok``), under ``roots`` as opened. Raises
    FileNotFoundError, or UsageError / Refused naming what was wrong."""
    uid = thread_uid()
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise  # the caller says what that means: a bad request, or a source that changed
    except PermissionError:
        raise Refused(f"{path}: you (uid {uid}) cannot read it, so the daemon will not "
                      "upload it for you") from None
    except OSError as e:
        raise UsageError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or (directory_ok and stat.S_ISDIR(st.st_mode))):
            raise UsageError(f"not a regular file{' or directory' if directory_ok else ''}: "
                             f"{path}")
        if roots:
            within_roots(fd_path(fd), roots, "path")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_given(path: str, roots: list[str], directory_ok: bool = False) -> int:
    if not os.path.isabs(path):
        raise UsageError(f"path must be absolute: {path!r}")
    try:
        return open_source(path, roots, directory_ok=directory_ok)
    except FileNotFoundError:
        raise UsageError(f"no such file or directory: {path}") from None


def check_readable(path: str, caller: Identity, roots: list[str]) -> None:
    """At request time (in a worker thread): the caller can open ``path`` for reading
    (a file, or a directory it can list and enter), under ``roots``."""
    def probe() -> None:
        fd = _open_given(path, roots, directory_ok=True)
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                try:
                    os.listdir(fd)
                    os.stat(".", dir_fd=fd)
                except PermissionError:
                    raise Refused(f"{path}: you (uid {caller.uid}) cannot list or enter "
                                  "it, so the daemon will not upload it for you") from None
        finally:
            os.close(fd)

    call_as(caller, probe)


def check_writable_dest(dest: str, caller: Identity, roots: list[str]) -> None:
    """A download destination (in a worker thread): an absolute path that is absent or an
    empty directory, under ``roots``, whose parent the caller can create entries in; its
    missing parents are created, as the caller (:func:`make_dest_parents`)."""
    def probe() -> None:
        if not os.path.isabs(dest):
            raise UsageError(f"destination must be an absolute path: {dest!r}")
        make_dest_parents(dest, roots)
        parent = os.path.dirname(dest.rstrip("/")) or "/"
        try:
            fd = os.open(parent, _DIR_FLAGS)
        except FileNotFoundError:
            raise UsageError(f"destination's parent directory does not exist: {parent}") \
                from None
        except PermissionError:
            raise Refused(f"{parent}: you (uid {caller.uid}) cannot open it, so the daemon "
                          "will not download into it for you") from None
        except NotADirectoryError:
            raise UsageError(f"destination's parent is not a directory: {parent}") from None
        try:
            if roots:
                within_roots(fd_path(fd), roots, "destination")
            _can_create_in(fd, parent, caller)
        finally:
            os.close(fd)
        check_dest(dest)

    call_as(caller, probe)


def make_dest_parents(dest: str, roots: list[str]) -> None:
    """Create the missing parent directories of the download destination ``dest``, with
    the calling thread's identity (the caller's: run it through :func:`agent.fsid.call_as`),
    mode :data:`PARENT_MODE`. What exists is resolved by the kernel as the caller; the
    deepest existing ancestor is opened and checked against ``roots`` as opened, before
    anything is made. Each missing directory is then made relative to the descriptor of
    the one above it and opened with O_NOFOLLOW: a symlink found or swapped in where a
    directory is being made is refused, never followed, so nothing is created outside
    that ancestor. Nothing to do when the parent exists."""
    if not os.path.isabs(dest):
        raise UsageError(f"destination must be an absolute path: {dest!r}")
    parent = os.path.dirname(dest.rstrip("/")) or "/"
    missing: list[str] = []
    at = parent
    while True:
        try:
            fd = os.open(at, _DIR_FLAGS)
            break
        except FileNotFoundError:
            head, name = os.path.split(at)
            if not name or head == at:
                raise UsageError(f"cannot create the destination's parent {parent}") from None
            if name in (".", ".."):
                raise UsageError(f"cannot create the destination's parent {parent}: its "
                                 f"missing part goes through {name!r}") from None
            missing.append(name)
            at = head
        except NotADirectoryError:
            raise UsageError(f"destination's parent is not a directory: {at}") from None
        except PermissionError:
            raise Refused(f"{at}: you (uid {thread_uid()}) cannot open it, so nothing is "
                          "downloaded into it for you") from None
    try:
        if missing and roots:
            within_roots(fd_path(fd), roots, "destination")
        for name in reversed(missing):
            try:
                os.mkdir(name, PARENT_MODE, dir_fd=fd)
            except FileExistsError:
                pass  # made meanwhile (another download): opened below, never followed
            except PermissionError:
                raise Refused(f"{at}: you (uid {thread_uid()}) cannot create {name!r} there, "
                              "so nothing is downloaded into it for you") from None
            except OSError as e:
                raise UsageError(f"cannot create {os.path.join(at, name)}: {e.strerror}"
                                 ) from None
            at = os.path.join(at, name)
            try:
                sub = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                raise UsageError(f"destination's parent {at} is not a directory made for "
                                 f"it ({e.strerror}): a symlink or a file is in the way"
                                 ) from None
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


def _can_create_in(dir_fd: int, parent: str, caller: Identity) -> None:
    """Try it (access(2) would answer for the real uid, not this thread's): a directory
    made and removed at once, with a name no one else uses."""
    probe = f".chronicle-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        os.mkdir(probe, 0o700, dir_fd=dir_fd)
    except PermissionError:
        raise Refused(f"{parent}: you (uid {caller.uid}) cannot write there, so the daemon "
                      "will not download into it for you") from None
    except OSError as e:
        raise UsageError(f"cannot create anything in {parent}: {e.strerror}") from None
    os.rmdir(probe, dir_fd=dir_fd)


def check_dest(dest: str) -> None:
    """The destination is absent or an empty directory (in the caller's identity)."""
    if not os.path.isabs(dest):
        raise UsageError(f"destination must be an absolute path: {dest!r}")
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise Refused(f"{dest}: you cannot look at it ({e.strerror})") from None
        raise UsageError(f"destination {dest}: {e.strerror}") from None
    if st is not None and (not stat.S_ISDIR(st.st_mode) or os.listdir(dest)):
        raise UsageError(f"destination exists and is not an empty directory: {dest}")
    parent = os.path.dirname(dest.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        raise UsageError(f"destination's parent directory does not exist: {parent}")


def file_size(path: str, caller: Identity, roots: list[str]) -> int:
    """A component of the three-step flow (in a worker thread): the caller can read this
    regular file, under ``roots``; its size."""
    def probe() -> int:
        fd = _open_given(path, roots)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    return call_as(caller, probe)
