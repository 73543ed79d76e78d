"""The staging area: a snapshot of each sealed checkpoint, taken before anything else, so
that the writer deleting or rotating its checkpoints (keep-last-N) cannot lose or mix the
bytes being uploaded.

Where: ``<watched root>/.chronicle-staging/<agent id>/<snapshot id>/`` when that directory
can be made and is on the checkpoint's filesystem (a hardlink cannot cross filesystems),
else ``<state_dir>/staging/…`` (then the files are copied when linking fails).

How, per file: a reflink (``ioctl FICLONE``: a copy-on-write clone, immune to rewrites in
place) where the filesystem offers one; else a hardlink (free, survives delete and rename,
but not a rewrite in place: ``torch.save`` onto the same name reuses the inode); files
matching the rule's ``copy_files`` globs are reflinked or copied, never linked; a link
that fails (another filesystem, a hardlink limit) falls back to a copy. Every placed file
is checked against what the seal saw (size, mtime, inode): a file that changed while it
was being placed makes the whole snapshot :class:`SnapshotChanged` (the checkpoint waits
for its next seal).

Space: :meth:`Staging.account` counts the bytes the staging area holds on its own (files
with no other link: copies, and snapshots whose original the writer deleted); the cap
(``watcher.staging_max_bytes``) makes new seals wait, never fills the disk.

Whose rights: every look at and every change to a checkpoint or a staging directory in a
watched tree is made with the rights of the user the checkpoint is uploaded for (a run's
uid, or for a rule of the config file the checkpoint's owner; agent.fsid), so that nothing
planted in a user's tree sends the daemon anywhere that user could not go. Such a user's
snapshots live in ``.chronicle-staging/<agent id>.u<uid>/`` (the daemon's own:
``<agent id>/``). In the daemon's private area under ``<state_dir>/staging`` the daemon
places the files itself, from descriptors opened with the user's rights.

Claims: on a filesystem shared by several nodes, each agent that sees a sealed checkpoint
tries to create ``<staging base>/claims/<hash of its registration key>`` exclusively; only
the agent that made it snapshots and uploads. (The registration's idempotency key is the
second line of defence: an agent that uploads anyway gets the same asset.)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agent.fsid import Identity, call_as
from agent.statedir import shared_makedirs
from agent.transfer.shares import claim_name
from agent.watch.seal import STAGING_DIR_NAME, FileInfo, Scan

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS,
               errno.EBADF, errno.EPERM}


class SnapshotChanged(Exception):
    """A file changed (or vanished) while the snapshot was taken."""


class StagedFile(NamedTuple):
    """A file placed in a snapshot, as it was placed (a JSON list in the ``watched`` row's
    ``staged``: ``[size, mtime_ns, ino, how]``)."""

    size: int
    mtime_ns: int
    ino: int
    how: str
    """reflink, link or copy."""


@dataclass
class Snapshot:
    dir: str
    """The snapshot's own directory (removed at cleanup)."""
    path: str
    """What is uploaded: ``dir/<checkpoint base name>``."""
    files: dict[str, StagedFile]
    """rel → the staged file."""

    def linked(self) -> dict[str, StagedFile]:
        return {k: f for k, f in self.files.items() if f.how == "link"}


def load_agent_id(state_dir: Path) -> str:
    """A stable id for this agent (its state dir), used to name its staging directories and
    its claims."""
    p = state_dir / "agent_id"
    try:
        value = p.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    value = f"{host or 'host'}-{secrets.token_hex(6)}"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, p)
    return value


def _matches(rel: str, globs: list[str]) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, g) or fnmatch.fnmatchcase(base, g) for g in globs)


class Staging:
    def __init__(self, state_dir: Path, max_bytes: int) -> None:
        self.state_dir = state_dir
        self.max_bytes = max_bytes
        self.agent_id = load_agent_id(state_dir)
        self._bases: dict[tuple[str, int, int | None], str] = {}
        self._no_reflink: set[str] = set()
        self.held_bytes = 0
        self.total_bytes = 0
        self.files = 0

    # ---- where -------------------------------------------------------------------------

    def fallback_base(self) -> str:
        base = self.state_dir / "staging"
        (base / self.agent_id).mkdir(parents=True, exist_ok=True, mode=0o700)
        return str(base)

    def owner_dir(self, ident: Identity | None) -> str:
        """The name of this agent's directory in a staging base, for snapshots taken for
        ``ident`` (None: the daemon's own)."""
        if ident is None or ident.is_daemon:
            return self.agent_id
        return f"{self.agent_id}.u{ident.uid}"

    def placer(self, base: str, ident: Identity | None) -> Identity | None:
        """Whose rights make the files of a snapshot in ``base``: the daemon's in its
        private area, the user's in the user's tree."""
        return None if base == self.fallback_base() else ident

    def ident_of(self, snap_dir: str) -> Identity | None:
        """Whose rights a snapshot directory (one of ours, by the name we gave it) is
        handled with."""
        if snap_dir.startswith(self.fallback_base() + os.sep):
            return None
        name = os.path.basename(os.path.dirname(snap_dir.rstrip("/")))
        prefix = self.agent_id + ".u"
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return Identity.of(int(name[len(prefix):]))
        return None

    def base_for(self, root: str, dev: int, ident: Identity | None = None) -> str:
        """The staging base for a checkpoint on device ``dev`` under watched ``root``,
        uploaded for ``ident`` (runs in a worker thread)."""
        key = (root, dev, ident.uid if ident is not None else None)
        found = self._bases.get(key)
        if found is not None:
            return found
        base = os.path.join(root, STAGING_DIR_NAME)

        def make() -> None:
            shared_makedirs(base, 0o755)  # modes kept under the daemon's umask 077
            os.makedirs(os.path.join(base, self.owner_dir(ident)), mode=0o700, exist_ok=True)
            if os.stat(base).st_dev != dev:
                raise OSError(errno.EXDEV, "another filesystem")

        try:
            call_as(ident, make)
        except OSError as e:
            log.info("staging under %s is not possible (%s); using %s", root,
                     e.strerror or e, self.state_dir / "staging")
            base = self.fallback_base()
        self._bases[key] = base
        return base

    def bases(self) -> list[tuple[str, Identity | None]]:
        """Every (base, identity) used so far, and the private area."""
        out = {(b, Identity.of(k[2]) if k[2] is not None else None)
               for k, b in self._bases.items() if b != self.fallback_base()}
        return sorted(out, key=lambda x: (x[0], x[1].uid if x[1] else -1)) + [
            (self.fallback_base(), None)]

    # ---- claims ------------------------------------------------------------------------

    def claims_dir(self, base: str, ident: Identity | None) -> str:
        return os.path.join(base, "claims" if ident is None or ident.is_daemon
                            else f"claims.u{ident.uid}")

    def claim(self, base: str, key: str, path: str, ident: Identity | None = None) -> str | None:
        """Claim a sealed checkpoint for this agent. None: it is ours (new, or claimed by us
        before a restart); else the id of the agent that claimed it (in a worker thread)."""
        placer = self.placer(base, ident)
        return call_as(placer, self._claim, self.claims_dir(base, placer), key, path)

    def _claim(self, d: str, key: str, path: str) -> str | None:
        p = os.path.join(d, claim_name(key))
        body = json.dumps({"agent": self.agent_id, "key": key, "path": path,
                           "host": socket.gethostname(), "at": time.time()})
        try:
            shared_makedirs(d, 0o755)
            if not os.path.isdir(d):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", d)
        except OSError as e:
            log.warning("cannot claim %s in %s (%s): uploading without a claim (the "
                        "registration key still gives one asset)", path, d, e.strerror or e)
            return None
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o644)
        except FileExistsError:
            try:
                owner = json.loads(Path(p).read_text()).get("agent")
            except (OSError, ValueError):
                return "unknown"  # being written by the other agent right now
            return None if owner == self.agent_id else str(owner)
        except OSError as e:
            log.warning("cannot claim %s in %s (%s): uploading without a claim", path, d,
                        e.strerror or e)
            return None
        try:
            os.fchmod(fd, 0o644)  # readable by other agents, whatever the umask
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return None

    def prune_claims(self, max_age_s: float = 86400.0) -> int:
        """Forget claims older than ``max_age_s`` whose checkpoint is gone."""
        removed = 0
        for base, ident in self.bases():
            removed += call_as(ident, self._prune, self.claims_dir(base, ident), max_age_s)
        return removed

    @staticmethod
    def _prune(d: str, max_age_s: float) -> int:
        removed = 0
        now = time.time()
        try:
            names = os.listdir(d)
        except OSError:
            return 0
        for n in names:
            p = os.path.join(d, n)
            try:
                if now - os.stat(p).st_mtime < max_age_s:
                    continue
                info = json.loads(Path(p).read_text())
                if not os.path.lexists(str(info.get("path", ""))):
                    os.unlink(p)
                    removed += 1
            except (OSError, ValueError):
                continue
        return removed

    # ---- snapshots ---------------------------------------------------------------------

    def snapshot(self, sc: Scan, base: str, copy_globs: list[str],
                 ident: Identity | None = None) -> Snapshot:
        """Snapshot a sealed checkpoint for ``ident`` (in a worker thread): each file opened
        with ``ident``'s rights and checked against the seal, then placed (reflink,
        hardlink, copy) from that descriptor by whoever owns the base."""
        placer = self.placer(base, ident)
        snap_dir = os.path.join(base, self.owner_dir(placer),
                                f"snap_{int(time.time() * 1000):x}{secrets.token_hex(4)}")
        call_as(placer, os.makedirs, snap_dir, 0o700)
        top = os.path.join(snap_dir, os.path.basename(sc.path.rstrip("/")))
        placed: dict[str, StagedFile] = {}
        try:
            if sc.is_dir:
                call_as(placer, os.mkdir, top, 0o700)
            for f in sc.files:
                dst = os.path.join(top, *f.rel.split("/")) if sc.is_dir else top
                src = call_as(ident, self._open_checked, f)
                try:
                    placed[f.rel] = call_as(placer, self._place, src, f, dst, base,
                                            _matches(f.rel, copy_globs), placer is not None)
                finally:
                    os.close(src)
        except BaseException:
            call_as(placer, shutil.rmtree, snap_dir, True)
            raise
        return Snapshot(snap_dir, top, placed)

    def _place(self, src: int, f: FileInfo, dst: str, base: str, copy: bool,
               placer_is_user: bool) -> StagedFile:
        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
        if base not in self._no_reflink:
            how = self._clone(src, f, dst, base)
            if how is not None:
                return how
        if not copy:
            try:
                _link_fd(src, f.path, dst, by_name=placer_is_user)
            except FileNotFoundError:
                raise SnapshotChanged(f"{f.path} vanished") from None
            except OSError as e:
                log.debug("hardlink %s failed (%s); copying", f.path, e.strerror)
            else:
                st = os.stat(dst, follow_symlinks=False)
                if (st.st_size, st.st_mtime_ns, st.st_ino) != (f.size, f.mtime_ns, f.ino):
                    raise SnapshotChanged(f"{f.path} changed since it was sealed")
                return StagedFile(st.st_size, st.st_mtime_ns, st.st_ino, "link")
        return self._copy(src, f, dst)

    @staticmethod
    def _open_checked(f: FileInfo) -> int:
        try:
            fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            raise SnapshotChanged(f"{f.path} vanished") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or \
                (st.st_size, st.st_mtime_ns, st.st_ino) != (f.size, f.mtime_ns, f.ino):
            os.close(fd)
            raise SnapshotChanged(f"{f.path} changed since it was sealed")
        return fd

    def _unchanged_after(self, fd: int, f: FileInfo) -> None:
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise SnapshotChanged(f"{f.path} changed while it was staged")

    def _clone(self, src: int, f: FileInfo, dst: str, base: str) -> StagedFile | None:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(out, FICLONE, src)
        except OSError as e:
            os.close(out)
            os.unlink(dst)
            if e.errno in _NO_REFLINK:
                self._no_reflink.add(base)
                return None
            raise
        try:
            self._unchanged_after(src, f)
            os.utime(out, ns=(f.mtime_ns, f.mtime_ns))
            st = os.fstat(out)
        finally:
            os.close(out)
        return StagedFile(st.st_size, st.st_mtime_ns, st.st_ino, "reflink")

    def _copy(self, src: int, f: FileInfo, dst: str) -> StagedFile:
        with open(dst, "xb") as out_f, os.fdopen(os.dup(src), "rb") as in_f:
            in_f.seek(0)
            shutil.copyfileobj(in_f, out_f, 1 << 20)
            out_f.flush()
            self._unchanged_after(src, f)
            os.utime(out_f.fileno(), ns=(f.mtime_ns, f.mtime_ns))
            st = os.fstat(out_f.fileno())
        return StagedFile(st.st_size, st.st_mtime_ns, st.st_ino, "copy")

    def changed(self, snap: Snapshot) -> str | None:
        """A linked file of the snapshot rewritten in place since: which one."""
        return call_as(self.ident_of(snap.dir), self._changed, snap)

    @staticmethod
    def _changed(snap: Snapshot) -> str | None:
        top = snap.path
        for rel, f in snap.linked().items():
            p = top if not os.path.isdir(top) else os.path.join(top, *rel.split("/"))
            try:
                st = os.stat(p)
            except FileNotFoundError:
                return rel
            if (st.st_size, st.st_mtime_ns, st.st_ino) != (f.size, f.mtime_ns, f.ino):
                return rel
        return None

    def remove(self, snap_dir: str) -> None:
        call_as(self.ident_of(snap_dir), shutil.rmtree, snap_dir, True)

    # ---- space -------------------------------------------------------------------------

    def account(self, snap_dirs: list[str]) -> None:
        """Recount what the staging area holds (runs in a thread)."""
        held = total = files = 0
        for d in snap_dirs:
            h, t, n = call_as(self.ident_of(d), _count, d)
            held, total, files = held + h, total + t, files + n
        self.held_bytes, self.total_bytes, self.files = held, total, files

    def room_for(self, extra_bytes: int) -> bool:
        """Whether a snapshot that holds ``extra_bytes`` on its own fits under the cap (an
        empty staging area always takes one, however large, so that nothing waits
        forever)."""
        return (self.max_bytes <= 0 or self.held_bytes == 0
                or self.held_bytes + extra_bytes <= self.max_bytes)

    def orphans(self, known: set[str], more_bases: list[str] | None = None) -> list[str]:
        """Snapshot directories of this agent that no row refers to (a crash between the
        snapshot and its row), in the bases used so far and ``more_bases``."""
        areas = {(os.path.join(b, self.owner_dir(i)), self.placer(b, i))
                 for b, i in self.bases()}
        for base in more_bases or []:
            areas |= self._owner_dirs(base)
        out = []
        for d, ident in sorted(areas, key=lambda x: x[0]):
            try:
                names = call_as(ident, os.listdir, d)
            except OSError:
                continue
            out += [os.path.join(d, n) for n in names
                    if n.startswith("snap_") and os.path.join(d, n) not in known]
        return out

    def _owner_dirs(self, base: str) -> set[tuple[str, Identity | None]]:
        """This agent's directories in a base found on disk, each with the identity its
        name gives, if the directory (not a link) is really owned by that uid."""
        try:
            names = os.listdir(base)
        except OSError:
            return set()
        found: set[tuple[str, Identity | None]] = set()
        prefix = self.agent_id + ".u"
        for n in names:
            if n == self.agent_id:
                uid = os.geteuid()
            elif n.startswith(prefix) and n[len(prefix):].isdigit():
                uid = int(n[len(prefix):])
            else:
                continue
            d = os.path.join(base, n)
            try:
                st = os.lstat(d)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                ident = Identity.of(uid)
                found.add((d, None if ident.is_daemon else ident))
        return found


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000


def _link_fd(src: int, name: str, dst: str, *, by_name: bool) -> None:
    """Hardlink the very file open as ``src`` at ``dst``: ``linkat(AT_EMPTY_PATH)``, which
    needs CAP_DAC_READ_SEARCH (the daemon as root). Without it, and only when this thread
    acts as the file's user (``by_name``), link by ``name`` and check that the same inode
    came."""
    if _libc.linkat(src, b"", AT_FDCWD, os.fsencode(dst), AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if not by_name or err not in (errno.ENOENT, errno.EPERM, errno.EINVAL):
        raise OSError(err, os.strerror(err), dst)
    os.link(name, dst, follow_symlinks=False)
    if not os.path.samestat(os.fstat(src), os.lstat(dst)):
        os.unlink(dst)
        raise SnapshotChanged(f"{name} was replaced while it was staged")


def _count(d: str) -> tuple[int, int, int]:
    held = total = files = 0
    for dirpath, _dirs, names in os.walk(d):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            files += 1
            total += st.st_size
            if st.st_nlink <= 1:
                held += st.st_size
    return held, total, files
