"""Seal rules: when is a checkpoint complete?

A checkpoint is a directory or a single file matched by a rule's path glob. It is sealed
by the first of the rule's ``seal`` kinds that holds:

- ``marker``: a marker file (``_SUCCESS``, ``commit_success.txt``, or a configured name) is
  in the directory and no other file is newer than it (a stale marker left from an earlier
  save into the same directory does not seal a rewrite);
- ``dcp_metadata``: torch.distributed.checkpoint's ``.metadata``, written last, is there and
  no other file is newer;
- ``rename_dir`` / ``rename_file``: the directory (file) appeared by a rename: from one of
  the rule's temporary names (Orbax ``*.orbax-checkpoint-tmp-*``, ``*.tmp``), seen by the
  watcher and gone now, or from another name the watcher had seen it under (the same
  inode). Temporary names are never checkpoints themselves;
- ``format``: a single file whose own structure says it is whole: a zip archive
  (``torch.save``, Lightning ``.ckpt``, ``np.savez``) whose end-of-central-directory record
  ends the file and points at a central directory right before it, or a safetensors file
  whose header's offsets reach exactly its end;
- ``quiescence`` (the fallback): nothing changed (names, sizes, mtimes) for
  ``quiescence_s``, by the watcher's own observation and by the files' mtimes. It never
  seals a directory that shows the signs of a stronger seal not yet given (``.distcp``
  shards without ``.metadata``), nor a directory whose siblings were sealed by a marker or
  ``.metadata`` (their writer uses those, so this one is not finished without one).

Everything here is synchronous and side-effect free except :func:`scan` (which stats
files); the watcher calls it from a thread.
"""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO

from agent.config import WatchRule

STAGING_DIR_NAME = ".chronicle-staging"
GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class FileInfo:
    rel: str
    """Path relative to the checkpoint (a single-file checkpoint: its base name)."""
    path: str
    size: int
    mtime_ns: int
    ino: int
    dev: int


@dataclass
class Scan:
    path: str
    is_dir: bool
    files: list[FileInfo]
    ino: int
    dev: int
    uid: int
    newest_ns: int
    """Newest mtime among the files and directories."""
    problem: str | None = None
    """Why this cannot be uploaded as it is (a symlink leaving it), if anything."""
    btime_ns: int | None = None
    """When the file or directory was created (statx), where the filesystem tells."""
    mtime_ns: int = 0
    """The top entry's own mtime (a directory's changes when entries come or go)."""
    whole: bool = False
    """A single file whose format says it is complete (see :func:`file_whole`)."""

    def ident(self) -> str:
        """Which file or directory this is, not where: a new checkpoint at an old path has
        another (an inode number the filesystem reused has another birth time)."""
        return f"{self.dev}:{self.ino}:{self.btime_ns if self.btime_ns is not None else '-'}"

    def fingerprint(self) -> str:
        """Names, sizes, mtimes and inodes: any change to the content changes it."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.rel}\0{f.size}\0{f.mtime_ns}\0{f.ino}\n".encode())
        return h.hexdigest()

    def version(self) -> str:
        """Names, sizes and mtimes only: the same for every node of a shared filesystem, so
        two agents derive the same registration key for the same content."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.rel}\0{f.size}\0{f.mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def scan(path: str) -> Scan | None:
    """Stat a checkpoint (file or directory tree); None if it is gone (or not a regular
    file or directory). Symlinks are followed only when they stay inside the checkpoint."""
    try:
        st = os.stat(path)
        owner = os.lstat(path).st_uid  # a link's owner, not its target's: whose it is
    except OSError:
        return None
    btime = birth_ns(path)
    if stat.S_ISREG(st.st_mode):
        f = FileInfo(os.path.basename(path), path, st.st_size, st.st_mtime_ns, st.st_ino,
                     st.st_dev)
        return Scan(path, False, [f], st.st_ino, st.st_dev, owner, st.st_mtime_ns,
                    btime_ns=btime, mtime_ns=st.st_mtime_ns, whole=file_whole(path, st))
    if not stat.S_ISDIR(st.st_mode):
        return None
    files: list[FileInfo] = []
    newest = st.st_mtime_ns
    problem: str | None = None
    try:
        root = os.path.realpath(path)  # raises if a link is swapped for a directory under it
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for d in dirnames:
                try:
                    newest = max(newest, os.stat(os.path.join(dirpath, d)).st_mtime_ns)
                except OSError:
                    pass
            for fn in sorted(filenames):
                full = os.path.join(dirpath, fn)
                try:
                    fst = os.stat(full)
                except OSError:
                    continue  # deleted meanwhile, or a dangling link
                if not stat.S_ISREG(fst.st_mode):
                    continue
                if os.path.islink(full):
                    real = os.path.realpath(full)
                    if os.path.commonpath([root, real]) != root:
                        problem = f"symlink leaves the checkpoint: {full} -> {real}"
                        continue
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                files.append(FileInfo(rel, full, fst.st_size, fst.st_mtime_ns, fst.st_ino,
                                      fst.st_dev))
                newest = max(newest, fst.st_mtime_ns)
    except OSError:
        return None
    if not os.path.isdir(path):
        return None
    return Scan(path, True, files, st.st_ino, st.st_dev, owner, newest, problem,
                btime_ns=btime, mtime_ns=st.st_mtime_ns)


# ---- identity and formats -------------------------------------------------------------------

_STATX_BTIME = 0x800
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_statx = getattr(_libc, "statx", None)


def birth_ns(path: str) -> int | None:
    """The creation time of ``path`` (statx ``stx_btime``), or None where the filesystem
    or the C library does not tell it."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(256)
    if _statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_BTIME, buf) != 0:
        return None
    mask = struct.unpack_from("<I", buf, 0)[0]
    if not mask & _STATX_BTIME:
        return None
    sec, nsec = struct.unpack_from("<qI", buf, 80)  # struct statx: stx_btime at offset 80
    return int(sec) * 1_000_000_000 + int(nsec)


_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_LOC64 = b"PK\x06\x07"
_CEN = b"PK\x01\x02"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def file_whole(path: str, st: os.stat_result) -> bool:
    """True when the file's own format says it is complete: a zip archive (PyTorch's
    ``torch.save`` since 1.6, Lightning ``.ckpt``, ``np.savez``) or a safetensors file.
    Written in place or renamed, such a file is whole once this holds: the structure that
    says so is written last."""
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(8)
            if head[:4] == b"PK\x03\x04":
                return _zip_whole(f, st.st_size)
            if len(head) == 8:
                return _safetensors_whole(f, head, st.st_size)
    except (OSError, ValueError, struct.error):
        pass
    return False


def _zip_whole(f: BinaryIO, size: int) -> bool:
    """The end-of-central-directory record ends the file exactly (its comment included),
    and the central directory it points at ends where it (or its zip64 record) begins."""
    tail_len = min(size, 22 + 65535)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(_EOCD)
    while pos >= 0:
        if pos + 22 <= len(tail):
            (_d, _cd, n_here, n_all, cd_size, cd_off,
             comment) = struct.unpack_from("<HHHHIIH", tail, pos + 4)
            eocd_at = size - tail_len + pos
            if eocd_at + 22 + comment == size:
                end = eocd_at
                if pos >= 20 and tail[pos - 20:pos - 16] == _LOC64:  # zip64 (torch: always)
                    rec_at = struct.unpack_from("<Q", tail, pos - 12)[0]
                    f.seek(rec_at)
                    rec = f.read(56)
                    if (len(rec) < 56 or rec[:4] != _EOCD64
                            or rec_at + 12 + struct.unpack_from("<Q", rec, 4)[0] != eocd_at - 20):
                        return False
                    cd_size, cd_off = struct.unpack_from("<QQ", rec, 40)
                    end = rec_at
                elif 0xFFFFFFFF in (cd_size, cd_off) or 0xFFFF in (n_here, n_all):
                    return False
                if cd_off + cd_size != end:
                    return False
                if cd_size == 0:
                    return True
                f.seek(cd_off)
                return bool(f.read(4) == _CEN)
        pos = tail.rfind(_EOCD, 0, pos)
    return False


def _safetensors_whole(f: BinaryIO, head: bytes, size: int) -> bool:
    """An 8-byte header length, a JSON header, and data up to the largest end offset: the
    file is exactly that long."""
    n = int(struct.unpack("<Q", head)[0])
    if not 2 <= n <= min(_MAX_SAFETENSORS_HEADER, size - 8):
        return False
    raw = f.read(n)
    if raw[:1] != b"{":
        return False
    header = json.loads(raw)
    if not isinstance(header, dict):
        return False
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2
                and all(isinstance(o, int) for o in offs)):
            return False
        end = max(end, offs[1])
    return size == 8 + n + end


# ---- globs, roots, temporary names -----------------------------------------------------------


def split_glob(pattern: str) -> list[str]:
    return [s for s in pattern.split("/") if s]


def glob_root(pattern: str) -> str:
    """The longest directory prefix of a path glob without glob characters (for a plain
    path, its parent)."""
    segs = split_glob(pattern)
    fixed: list[str] = []
    for s in segs[:-1]:
        if GLOB_CHARS.search(s):
            break
        fixed.append(s)
    return "/" + "/".join(fixed)


def at_depth(segs: list[str], path: str) -> tuple[str | None, bool]:
    """For a path inside a rule's tree: the entry at the checkpoints' depth it lies in, if
    every directory above it matches the glob (its own name is for the caller to check: a
    checkpoint name, or a temporary one), and whether the path is shallower than that and
    on the way to it (a new directory that may hold checkpoints later)."""
    parts = split_glob(path)
    n = len(segs)
    if len(parts) < n:
        on_the_way = all(fnmatch.fnmatchcase(p, s) for p, s in zip(parts, segs, strict=False))
        return None, on_the_way
    if all(fnmatch.fnmatchcase(p, s) for p, s in zip(parts[:n - 1], segs, strict=False)):
        return "/" + "/".join(parts[:n]), False
    return None, False


def is_candidate_name(name: str, pattern: str) -> bool:
    """A checkpoint name: matches the glob's last segment (hidden names only if it asks)."""
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def tmp_regexes(patterns: list[str]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        before, after = p.split("{name}")
        rx = (re.escape(before).replace(r"\*", ".*") + "(?P<name>.+?)"
              + re.escape(after).replace(r"\*", ".*"))
        out.append(re.compile(rx + r"\Z", re.S))
    return out


def final_name(basename: str, regexes: list[re.Pattern[str]]) -> str | None:
    """The name a temporary name will be renamed to, or None if it is not a temporary
    name."""
    for rx in regexes:
        m = rx.match(basename)
        if m:
            return m.group("name")
    return None


def in_staging(path: str) -> bool:
    return f"/{STAGING_DIR_NAME}" in path


# ---- the decision --------------------------------------------------------------------------


def looks_unfinished(sc: Scan, nodes: int = 1, shared: bool = False) -> bool:
    """Signs that a stronger seal is still to come (not when several nodes write the
    checkpoint into directories of their own: only one of them holds its ``.metadata``;
    on a filesystem they share, every node sees it come)."""
    if sc.is_dir and (nodes == 1 or shared):
        names = {f.rel for f in sc.files}
        if any(n.endswith(".distcp") for n in names) and ".metadata" not in names:
            return True
    return False


def _written_last(sc: Scan, names: list[str]) -> bool:
    """One of ``names`` is at the checkpoint's top level and no other file is newer."""
    marks = [f for f in sc.files if f.rel in names]
    if not marks:
        return False
    newest_mark = max(f.mtime_ns for f in marks)
    others = [f.mtime_ns for f in sc.files if f.rel not in names]
    return not others or max(others) <= newest_mark


def check_seal(
    rule: WatchRule,
    sc: Scan,
    *,
    renamed: bool,
    stable_for_s: float,
    age_s: float,
    allow_quiescence: bool,
) -> str | None:
    """The seal kind that holds for this scan, or None (not complete yet). ``renamed``: the
    watcher saw it appear from a temporary name; ``stable_for_s``: how long the watcher has
    seen the same fingerprint; ``age_s``: seconds since the newest mtime."""
    if not sc.files:
        return None
    for kind in rule.seal:
        if kind == "marker" and sc.is_dir and _written_last(sc, rule.markers):
            return kind
        if kind == "dcp_metadata" and sc.is_dir and _written_last(sc, [".metadata"]):
            return kind
        if kind == "rename_dir" and sc.is_dir and renamed:
            return kind
        if kind == "rename_file" and not sc.is_dir and renamed:
            return kind
        if kind == "format" and not sc.is_dir and sc.whole:
            return kind
    if (
        "quiescence" in rule.seal
        and allow_quiescence
        and stable_for_s >= rule.quiescence_s
        and age_s >= rule.quiescence_s
        and not looks_unfinished(sc, rule.nodes, rule.shared)
    ):
        return "quiescence"
    return None


STRONG_DIR_SEALS = frozenset({"marker", "dcp_metadata"})
STRONG_SEALS = frozenset({"marker", "dcp_metadata", "rename_dir", "rename_file", "format"})
"""Seals that show the writer finished: the only ones that count once its run died."""


def run_id_for(rule: WatchRule, path: str, bound: str | None) -> str | None:
    """Where the run id comes from: a literal, "{N}" (the N-th path segment, from 1), or ""
    (the run that registered the rule; none for a rule from the config file)."""
    spec = rule.run_id
    m = re.fullmatch(r"\{(\d+)\}", spec)
    if m:
        parts = split_glob(path)
        n = int(m.group(1))
        return parts[n - 1] if 1 <= n <= len(parts) else bound
    return spec or bound


def register_key(run_id: str | None, path: str, version: str) -> str:
    """The Idempotency-Key of a watched checkpoint's registration, the same on every agent
    that sees the same content at the same path: ``watch:<run_id>:<path>@<version>``
    (a run id and path too long for the 255-character key are replaced by their SHA-256)."""
    key = f"watch:{run_id or '-'}:{path}@{version}"
    if len(key) > 240:
        digest = hashlib.sha256(f"{run_id or '-'}:{path}".encode()).hexdigest()
        key = f"watch:sha256={digest}@{version}"
    return key
