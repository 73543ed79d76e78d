"""Seal rules: when is a checkpoint complete?

A checkpoint is a directory or a single file matched by a rule's path glob. It is sealed
by the first of the rule's ``seal`` kinds that holds:

- ``marker``: a marker file (``_SUCCESS``, ``commit_success.txt``, or a configured name) is
  in the directory and no other file is newer than it (a stale marker left from an earlier
  save into the same directory does not seal a rewrite);
- ``dcp_metadata``: torch.distributed.checkpoint's ``.metadata``, written last, is there and
  no other file is newer;
- ``rename_dir`` / ``rename_file``: the directory (file) appeared by a rename from one of
  the rule's temporary names (Hugging Face ``tmp-checkpoint-*``, Orbax
  ``*.orbax-checkpoint-tmp-*``, ``*.tmp``): the watcher saw the temporary name, and it is
  gone now. Temporary names are never checkpoints themselves;
- ``quiescence`` (the fallback): nothing changed (names, sizes, mtimes) for
  ``quiescence_s``, by the watcher's own observation and by the files' mtimes. It never
  seals a directory that shows the signs of a stronger seal not yet given (``.distcp``
  shards without ``.metadata``), nor a directory whose siblings were sealed by a marker or
  ``.metadata`` (their writer uses those, so this one is not finished without one).

Everything here is synchronous and side-effect free except :func:`scan` (which stats
files); the watcher calls it from a thread.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
from dataclasses import dataclass

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
    if stat.S_ISREG(st.st_mode):
        f = FileInfo(os.path.basename(path), path, st.st_size, st.st_mtime_ns, st.st_ino,
                     st.st_dev)
        return Scan(path, False, [f], st.st_ino, st.st_dev, owner, st.st_mtime_ns)
    if not stat.S_ISDIR(st.st_mode):
        return None
    files: list[FileInfo] = []
    newest = st.st_mtime_ns
    problem: str | None = None
    root = os.path.realpath(path)
    try:
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
    return Scan(path, True, files, st.st_ino, st.st_dev, owner, newest, problem)


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


def looks_unfinished(sc: Scan) -> bool:
    """Signs that a stronger seal is still to come."""
    if sc.is_dir:
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
    if (
        "quiescence" in rule.seal
        and allow_quiescence
        and stable_for_s >= rule.quiescence_s
        and age_s >= rule.quiescence_s
        and not looks_unfinished(sc)
    ):
        return "quiescence"
    return None


STRONG_DIR_SEALS = frozenset({"marker", "dcp_metadata"})


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
