"""The watcher: finds checkpoints under the watch rules, seals them, snapshots them, and
queues their uploads. It never transfers anything itself: a seal ends as a row in the
queue (the upload job and the ``watched`` row, in one transaction).

Discovery: file events are hints (watchfiles: sets, order lost, renames as delete + add,
bursts coalesced, nothing from other nodes on a network filesystem), so every rule is also
rescanned at start, whenever a new directory on the way to its checkpoints appears, and
every ``watcher.rescan_s``. One watcher covers the set of roots that take events and one
polls the roots on network filesystems (NFS, Lustre, GPFS, CIFS, … by
``/proc/self/mountinfo``, or a rule's ``poll``); a running watchfiles watcher cannot gain
paths, so a watcher is restarted when its set of roots changes (inotify instances are few:
this uses one, however many rules and runs there are).

Decisions (see :mod:`agent.watch.seal`): a candidate checkpoint is looked at on every event
under it and every ``watcher.check_s`` until it is sealed; a sealed checkpoint is claimed
(shared filesystems: one agent only), snapshotted into the staging area and queued with a
registration key derived from its run, path and content. Decided paths are remembered in
the queue database, so a restart seals nothing twice and misses nothing.

After the upload: a snapshot is removed once its job is done, abandoned or cancelled (a
failed job keeps it, so that ``retry`` can still send it). A linked snapshot whose file
is rewritten in place (the writer reused the inode) is never uploaded as mixed bytes: its
job is abandoned (``source_changed``) and the checkpoint is sealed again from what is on
disk once its seal holds again.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread
import watchfiles

from agent.config import WatchRule
from agent.fsid import Identity, Refused, call_as, run_as
from agent.queue import runstore
from agent.queue.runstore import WatchedRow
from agent.queue.states import WATCHED_MOVES, AssetState, SealMode, WatchedState, check_move
from agent.queue.store import JobState
from agent.transfer import shares
from agent.transfer.shares import claim_name
from agent.watch import seal
from agent.watch.seal import STAGING_DIR_NAME, Scan
from agent.watch.staging import Snapshot, SnapshotChanged, StagedFile, Staging

if TYPE_CHECKING:
    from pathlib import Path

    from agent.config import Settings
    from agent.metrics import Metrics
    from agent.queue.aqueue import AsyncQueue
    from agent.transfer.cache import AssetCache


class RunPolicy(Protocol):
    """What the watcher asks of the runs (the run registry)."""

    def sealing(self, run_id: str | None) -> SealMode: ...
    async def abandon_local_asset(self, asset_key: str, reason: str) -> None: ...


class Jobs(Protocol):
    """What the watcher asks of the workers: stop a job, the node-local cache."""

    cache: AssetCache

    def cancel_running(self, job_id: str, abandon_reason: str | None = None) -> None: ...

log = logging.getLogger(__name__)

NETWORK_FS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "fuse.glusterfs",
    "glusterfs", "beegfs", "fuse.beegfs", "fuse.sshfs", "9p", "afs", "fuse.cephfs",
    "panfs", "orangefs", "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse", "wekafs",
})
DONE_STATES = frozenset({WatchedState.SEALED, WatchedState.DONE, WatchedState.ELSEWHERE})
"""A path whose latest row is in one of these states, with the same fingerprint, is
handled."""


def _same_entry(row: WatchedRow, st: os.stat_result) -> bool:
    """The entry a decision was made on, unchanged (for a directory: no entry came or went
    directly in it since). Rows from before identities were kept count as the same."""
    if row.ident is None:
        return True
    dev, ino, _birth = row.ident.split(":")
    return (int(dev), int(ino)) == (st.st_dev, st.st_ino) and row.top_mtime_ns == st.st_mtime_ns


def mount_fstype(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open(mountinfo) as f:
            lines = f.readlines()
    except OSError:
        return ""
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, right.split()[0]
    return fstype


def is_network_fs(path: str) -> bool:
    return mount_fstype(path) in NETWORK_FS


RootSets = tuple[frozenset[str], frozenset[str], frozenset[str], frozenset[str]]
"""Roots watched by events, by polling; parents of missing roots, by events, by polling."""


@dataclass
class BoundRule:
    key: str
    rule: WatchRule
    run_id: str | None
    """The run that registered the rule (None: a rule from the config file)."""
    uid: int | None
    """Whose jobs its checkpoints become (None: the checkpoint's owner)."""
    segs: list[str] = field(init=False)
    root: str = field(init=False)
    tmp_rx: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.segs = seal.split_glob(self.rule.path)
        self.root = seal.glob_root(self.rule.path)
        self.tmp_rx = seal.tmp_regexes(self.rule.tmp_patterns)

    def run_for(self, path: str) -> str | None:
        return seal.run_id_for(self.rule, path, self.run_id)


@dataclass
class Pending:
    rule_key: str
    run_id: str | None
    fingerprint: str
    since: float
    blocked: bool = False
    is_dir: bool = True
    next_check: float = 0.0
    idle: int = 0
    """Looks that found nothing changed: re-checks back off (events still wake them)."""
    dev_ino: tuple[int, int] = (0, 0)
    ident: str = ""
    """Its device, inode and birth time (:meth:`Scan.ident`): an inode number the
    filesystem reused for a new file after this one was deleted is not this one renamed."""
    files: int = 0
    size: int = 0
    first_seen: float = field(default_factory=time.time)
    sealed_as: str | None = None
    """A seal held, but the snapshot did not happen (yet)."""
    problem: str | None = None
    """Why the last try to snapshot it failed."""


@dataclass
class Staged:
    row: WatchedRow
    snap: Snapshot


class Watcher:
    """Watches the rules' roots, seals checkpoints and makes their upload jobs. Built from
    the narrow things it uses: the queue, the settings and state dir, the metrics, the runs
    (how to seal each run's checkpoints) and the workers (stop a job, the cache)."""

    def __init__(self, queue: AsyncQueue, settings: Settings, state_dir: Path,
                 metrics: Metrics, runs: RunPolicy, jobs: Jobs) -> None:
        self.queue = queue
        self.settings = settings
        self.metrics = metrics
        self.runs = runs
        self.jobs = jobs
        self.cfg = settings.watcher
        self.staging = Staging(state_dir, self.cfg.staging_max_bytes)
        self.rules: dict[str, BoundRule] = {}
        self.pending: dict[str, Pending] = {}
        self.tmp_live: dict[str, tuple[str, str | None]] = {}
        """Temporary-named checkpoints being written: path → (rule key, run id)."""
        self.tmp_seen: dict[tuple[str, str], str] = {}
        """(parent, final name) → the temporary path seen for it."""
        self.decided: dict[str, WatchedRow] = {}
        self.strong: dict[tuple[str, str], set[str]] = {}
        self.staged: dict[str, Staged] = {}
        self.seals = 0
        self.tally: dict[str | None, dict[str, int]] = {}
        """Per run since start: checkpoints sealed, lost, abandoned (for its end's log line)."""
        self._rescan_again_at = 0.0
        self._dirty: set[str] = set()
        self._recheck: set[str] = set()
        self._rescan_due = True
        self._rescan_rules: set[str] = set()
        self._by_root: dict[str, list[BoundRule]] | None = None
        self._watch_failed = False
        self._last_rescan = 0.0
        self._last_account = 0.0
        self._last_prune = 0.0
        self._beats: dict[str, Identity | None] = {}
        """Claims directories on filesystems several nodes' agents share, where this agent
        says it is alive (agent.transfer.shares)."""
        self._last_beat = 0.0
        self._wake = anyio.Event()
        self._roots_changed = anyio.Event()
        self._lock = anyio.Lock()
        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # a line per event batch
        for i, rule in enumerate(settings.watch):
            self.rules[f"config:{i}"] = BoundRule(f"config:{i}", rule, None, None)

    # ---- what others call ---------------------------------------------------------------

    def staging_bytes(self) -> int:
        return self.staging.held_bytes

    def staging_info(self) -> dict[str, int]:
        st = self.staging
        return {"held_bytes": st.held_bytes, "linked_bytes": st.total_bytes - st.held_bytes,
                "files": st.files, "snapshots": len(self.staged), "max_bytes": st.max_bytes,
                "waiting": sum(1 for p in self.pending.values() if p.blocked),
                "unsealed": len(self.pending), "rules": len(self.rules)}

    def add_rules(self, run_id: str, rules: list[WatchRule], uid: int) -> None:
        for i, rule in enumerate(rules):
            key = f"run:{run_id}:{i}"
            self.rules[key] = BoundRule(key, rule, run_id, uid)
            self._rescan_rules.add(key)
        self._by_root = None
        self._roots_changed.set()
        self.wake()

    def longest_quiescence_s(self) -> float:
        """The longest quiescence period of any rule (how long a clean end may wait)."""
        return max([r.rule.quiescence_s for r in self.rules.values()] or [0.0])

    def remove_rules(self, run_id: str) -> None:
        for key in [k for k, r in self.rules.items() if r.run_id == run_id]:
            del self.rules[key]
        self._by_root = None
        self._roots_changed.set()

    def wake(self) -> None:
        self._wake.set()

    # ---- the tasks ----------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        await self._load()
        async with self._lock:
            await self._pass(rescan=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watchers)
            task_status.started()
            await self._loop()

    async def _load(self) -> None:
        q = self.queue
        for row in await q.do(runstore.latest_watched, q.s):
            self.decided[row.path] = row
            if row.seal and row.state in DONE_STATES:
                self.strong.setdefault((row.rule, os.path.dirname(row.path)), set()).add(row.seal)
        for row, _state, _code in await q.do(runstore.staged_rows, q.s):
            staged = row.staged or {}
            if row.snapshot:
                snap = Snapshot(row.snapshot, str(staged.get("path", row.snapshot)),
                                {rel: StagedFile(*v)
                                 for rel, v in staged.get("files", {}).items()})
                self.staged[row.ckpt_id] = Staged(row, snap)
        known = {s.snap.dir for s in self.staged.values()}
        roots = {r.root for r in self.rules.values()}

        def orphans() -> list[str]:
            found = self.staging.orphans(known, [os.path.join(r, STAGING_DIR_NAME)
                                                 for r in roots])
            for d in found:
                self.staging.remove(d)
            return found

        removed = await anyio.to_thread.run_sync(orphans)
        if removed:
            log.info("removed %d snapshot(s) left by a daemon that died while taking them",
                     len(removed))

    async def _loop(self) -> None:
        while True:
            with anyio.move_on_after(self.cfg.check_s):
                await self._wake.wait()
            self._wake = anyio.Event()
            now = time.monotonic()
            again = 0.0 < self._rescan_again_at <= now
            if again:
                self._rescan_again_at = 0.0
            rescan = self._rescan_due or again or now - self._last_rescan >= self.cfg.rescan_s
            try:
                async with self._lock:
                    await self._pass(rescan=rescan)
            except Exception:  # a bug or a surprise from the filesystem: keep the daemon up
                log.exception("watcher pass failed; trying again")
                self._rescan_due = True
                await anyio.sleep(self.cfg.check_s)

    async def _pass(self, *, rescan: bool, only_run: str | None = None,
                    allow_quiescence: bool = True) -> None:
        """One look at everything that may have changed (under the lock). With
        ``only_run``: a rescan of that run's checkpoints alone, leaving the events and the
        rescan schedule of everything else to the next ordinary pass."""
        if only_run is not None:
            rules = [r for r in self.rules.values() if r.run_id in (only_run, None)]
            cands = await anyio.to_thread.run_sync(self._rescan, rules)
            for p, pend in self.pending.items():
                cands.setdefault(p, pend.rule_key)
            cands = {p: k for p, k in cands.items()
                     if k in self.rules and self.rules[k].run_for(p) == only_run}
            if cands:
                await self._evaluate(cands, allow_quiescence)
            return
        cands = self._from_events()
        if rescan:
            self._rescan_due = False
            self._rescan_rules.clear()
            self._last_rescan = time.monotonic()
            cands.update(await anyio.to_thread.run_sync(self._rescan, list(self.rules.values())))
        elif self._rescan_rules:
            some = [self.rules[k] for k in self._rescan_rules if k in self.rules]
            self._rescan_rules.clear()
            cands.update(await anyio.to_thread.run_sync(self._rescan, some))
        now = time.monotonic()
        for p, pend in self.pending.items():
            if now >= pend.next_check:
                cands.setdefault(p, pend.rule_key)
        for p in self._recheck:
            row = self.decided.get(p)
            if row is not None:
                cands.setdefault(p, row.rule)
        self._recheck.clear()
        if cands:
            await self._evaluate(cands, allow_quiescence)
        await self._cleanup()
        await self._supervise()
        await self._account()

    # ---- discovery ----------------------------------------------------------------------

    def _rules_under(self, path: str) -> list[BoundRule]:
        """Rules whose tree holds ``path``; rules of a run before the config file's."""
        if self._by_root is None:
            self._by_root = {}
            for r in self.rules.values():
                self._by_root.setdefault(r.root, []).append(r)
        out: list[BoundRule] = []
        p = path
        while True:
            out += self._by_root.get(p, [])
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        out.sort(key=lambda r: r.run_id is None)
        return out

    def _from_events(self) -> dict[str, str]:
        raw, self._dirty = self._dirty, set()
        cands: dict[str, str] = {}
        for p in raw:
            if seal.in_staging(p):
                continue
            for r in self._rules_under(p):
                entry, on_the_way = seal.at_depth(r.segs, p)
                if entry is None:
                    if on_the_way:
                        self._rescan_rules.add(r.key)
                    continue
                name = os.path.basename(entry)
                final = seal.final_name(name, r.tmp_rx)
                if final is not None and fnmatch.fnmatchcase(final, r.segs[-1]):
                    self.tmp_seen[(os.path.dirname(entry), final)] = entry
                    self.tmp_live[entry] = (r.key, r.run_for(entry))
                    break
                if seal.is_candidate_name(name, r.segs[-1]):
                    cands.setdefault(entry, r.key)
                    break
        return cands

    def _rescan(self, rules: list[BoundRule]) -> dict[str, str]:
        """Every rule's candidates (runs in a thread). Decided directories are left to
        events; decided single files are cheap to look at again (in-place rewrites)."""
        cands: dict[str, str] = {}
        rules = sorted(rules, key=lambda r: r.run_id is None)
        for r in rules:
            call_as(self._rule_ident(r), self._rescan_rule, r, cands)
        for p in [p for p in self.tmp_live if not os.path.lexists(p)]:
            del self.tmp_live[p]
        for key, tmp in list(self.tmp_seen.items()):
            final = os.path.join(*key)
            if not os.path.lexists(tmp) and (not os.path.lexists(final)
                                             or final in self.decided):
                del self.tmp_seen[key]
        return cands

    def _rescan_rule(self, r: BoundRule, cands: dict[str, str]) -> None:
        """One rule's candidates, looked for with the rights of the run's user."""
        parent_glob = "/" + "/".join(r.segs[:-1])
        last = r.segs[-1]
        parents = (glob.glob(parent_glob) if seal.GLOB_CHARS.search(parent_glob)
                   else [parent_glob])
        for parent in parents:
            if seal.in_staging(parent):
                continue
            try:
                entries = list(os.scandir(parent))
            except OSError:
                continue
            for e in entries:
                name = e.name
                if name == STAGING_DIR_NAME:
                    continue
                path = os.path.join(parent, name)
                final = seal.final_name(name, r.tmp_rx)
                if final is not None and fnmatch.fnmatchcase(final, last):
                    self.tmp_seen[(parent, final)] = path
                    self.tmp_live[path] = (r.key, r.run_for(path))
                    continue
                if not seal.is_candidate_name(name, last) or path in cands:
                    continue
                row = self.decided.get(path)
                if row is not None and row.state in DONE_STATES:
                    try:
                        if e.is_dir() and _same_entry(row, e.stat()):
                            continue
                    except OSError:
                        continue
                cands[path] = r.key

    # ---- decisions ----------------------------------------------------------------------

    def _rule_ident(self, r: BoundRule | None) -> Identity | None:
        """Whose rights a rule's tree is looked at with: the run's user; for a rule of the
        config file the daemon's, until a checkpoint's owner is known (:meth:`_ident`)."""
        return Identity.of(r.uid) if r is not None and r.uid is not None else None

    def _ident(self, r: BoundRule, sc: Scan) -> Identity:
        return Identity.of(self._uid(r, sc))

    def _scan_all(self, cands: dict[str, str],
                  inodes: dict[tuple[int, int], tuple[str, str]]
                  ) -> tuple[dict[str, tuple[Scan | None, bool]], set[str]]:
        """Scans of the candidates, whether each appeared by a rename, and the unsealed
        paths that are gone because they were renamed to one of them (``inodes``: the
        unsealed checkpoints by device and inode: their path and identity, birth time
        included, so that a new file given a deleted one's inode number is not taken for
        it renamed, and the deleted one is recorded as lost)."""
        out: dict[str, tuple[Scan | None, bool]] = {}
        moved_away: set[str] = set()
        for p, key in cands.items():
            tmp = self.tmp_seen.get((os.path.dirname(p), os.path.basename(p)))
            renamed = tmp is not None and not os.path.lexists(tmp)
            sc = call_as(self._rule_ident(self.rules.get(key)), seal.scan, p)
            if sc is not None:
                was, ident = inodes.get((sc.dev, sc.ino), (None, None))
                if was is not None and was != p and not os.path.lexists(was) \
                        and ident == sc.ident():
                    renamed = True  # the same file or directory under its new name
                    moved_away.add(was)
            out[p] = (sc, renamed)
        return out, moved_away

    async def _evaluate(self, cands: dict[str, str], allow_quiescence: bool) -> None:
        inodes = {pend.dev_ino: (p, pend.ident) for p, pend in self.pending.items()}
        scans, moved_away = await anyio.to_thread.run_sync(self._scan_all, dict(cands), inodes)
        for p in moved_away:
            log.debug("unsealed checkpoint %s was renamed", p)
            self.pending.pop(p, None)
        now = time.monotonic()
        for path, (sc, renamed) in scans.items():
            r = self.rules.get(cands[path])
            if r is None:
                self.pending.pop(path, None)
                continue
            run_id = r.run_for(path)
            mode = self.runs.sealing(run_id)
            if mode == SealMode.CLOSED:
                self.pending.pop(path, None)
                continue
            if sc is None:
                gone = self.pending.pop(path, None)
                if gone is not None:
                    await self._lost(path, r, run_id, gone)
                continue
            fp = sc.fingerprint()
            last = self.decided.get(path)
            if last is not None and last.state in DONE_STATES and last.fingerprint == fp:
                self.pending.pop(path, None)
                continue
            # a decision is about the entry it was made on: another one at the same path (a
            # second run writing checkpoint-N again) is a new checkpoint
            same = last is not None and last.ident in (None, sc.ident())
            pend = self.pending.get(path)
            if pend is None or pend.fingerprint != fp:
                old = pend
                pend = self.pending[path] = Pending(r.key, run_id, fp, now, is_dir=sc.is_dir)
                if old is not None and old.ident == sc.ident():
                    pend.first_seen, pend.problem = old.first_seen, old.problem
            else:
                pend.idle += 1
            pend.dev_ino, pend.files, pend.size = (sc.dev, sc.ino), len(sc.files), sc.size
            pend.ident = sc.ident()
            wait = min(self.cfg.check_s * 2 ** min(pend.idle, 8), 10.0)
            if "quiescence" in r.rule.seal:  # never later than when it may become quiet
                wait = min(wait, max(self.cfg.check_s,
                                     pend.since + r.rule.quiescence_s - now + 0.01))
            pend.next_check = now + wait
            quiet_ok = allow_quiescence and mode == SealMode.OPEN and not (
                sc.is_dir and (
                    self.strong.get((r.key, os.path.dirname(path)), set()) & seal.STRONG_DIR_SEALS
                    or (same and last is not None and last.state in DONE_STATES
                        and last.seal != "quiescence")))
            kind = seal.check_seal(r.rule, sc, renamed=renamed, stable_for_s=now - pend.since,
                                   age_s=time.time() - sc.newest_ns / 1e9,
                                   allow_quiescence=quiet_ok)
            if kind is not None:
                await self._seal(path, sc, r, run_id, kind, pend)

    def _uid(self, r: BoundRule, sc: Scan) -> int:
        return r.uid if r.uid is not None else sc.uid

    async def _seal(self, path: str, sc: Scan, r: BoundRule, run_id: str | None, kind: str,
                    pend: Pending) -> None:
        q = self.queue
        key = seal.register_key(run_id, path, sc.version())
        fp = sc.fingerprint()
        ident = self._ident(r, sc)
        base = await anyio.to_thread.run_sync(self.staging.base_for, r.root, sc.dev, ident)
        several = r.rule.nodes > 1 and run_id is not None
        # several nodes of one run: each agent uploads its part (its own files, or its share
        # of a checkpoint they all see: agent.transfer.shares), none claims the whole
        owner = None if several else await anyio.to_thread.run_sync(
            self.staging.claim, base, key, path, ident)
        if owner == "unknown":
            return  # another agent is writing its claim right now: look again next time
        if owner is not None:
            row = WatchedRow(runstore.new_ckpt_id(), path, run_id, r.key,
                             WatchedState.ELSEWHERE, kind, fp, key, ident=sc.ident(),
                             top_mtime_ns=sc.mtime_ns)
            await q.do(runstore.record_watched, q.s, row)
            self._decide(row)
            log.info("checkpoint %s sealed (%s): claimed by agent %s, not uploaded here",
                     path, kind, owner)
            return
        pend.sealed_as = kind
        if sc.problem:
            await self._abandon_unsealed(path, r, run_id, "invalid_checkpoint", sc.problem,
                                         seal_kind=kind, sc=sc)
            return
        copy_bytes = sum(f.size for f in sc.files
                         if any(fnmatch.fnmatchcase(f.rel, g)
                                or fnmatch.fnmatchcase(f.rel.rsplit("/", 1)[-1], g)
                                for g in r.rule.copy_files))
        if self.staging.max_bytes and self.staged:
            # recounted now, not at the last periodic recount: a writer that just deleted
            # an original makes its linked snapshot count against the cap at once
            await anyio.to_thread.run_sync(self.staging.account,
                                           [st.snap.dir for st in self.staged.values()])
        if not self.staging.room_for(copy_bytes):
            if not pend.blocked:
                log.warning("checkpoint %s waits: the staging area holds %d bytes of its "
                            "%d-byte cap (watcher.staging_max_bytes)", path,
                            self.staging.held_bytes, self.staging.max_bytes)
            pend.blocked = True
            return
        try:
            snap = await anyio.to_thread.run_sync(self.staging.snapshot, sc, base,
                                                  r.rule.copy_files, ident)
        except SnapshotChanged as e:
            log.info("checkpoint %s changed while it was staged (%s); waiting for its next "
                     "seal", path, e)
            pend.since = time.monotonic()
            pend.problem = f"changed while it was staged ({e})"
            return
        except (PermissionError, Refused) as e:
            await self._abandon_unsealed(
                path, r, run_id, "forbidden",
                f"uid {ident.uid} cannot read all of it ({e}); the daemon reads a checkpoint "
                "only with the rights of the user it uploads it for", seal_kind=kind, sc=sc)
            return
        except OSError as e:
            log.warning("checkpoint %s: cannot snapshot it (%s); trying again", path, e)
            pend.problem = f"could not be staged ({e.strerror or e})"
            return
        row = WatchedRow(runstore.new_ckpt_id(), path, run_id, r.key, WatchedState.SEALED,
                         kind, fp, key, snapshot=snap.dir,
                         staged={"path": snap.path, "files": snap.files},
                         ident=sc.ident(), top_mtime_ns=sc.mtime_ns)
        payload: dict[str, Any] = {
            "path": snap.path, "asset_type": r.rule.asset_type,
            "visibility": self.settings.upload.visibility, "register_key": key,
            "checkpoint": path, "seal": kind}
        if several:
            # every node's agent joins the run's one asset of this checkpoint by its name
            payload["join"] = {"key": os.path.basename(path), "nodes": r.rule.nodes,
                               "node_rank": r.rule.node_rank, "shared": r.rule.shared,
                               "network_fs": await anyio.to_thread.run_sync(is_network_fs,
                                                                            path),
                               "agent": self.staging.agent_id}
            if base != self.staging.fallback_base():  # claims the other nodes can see
                placer = self.staging.placer(base, ident)
                claims = self.staging.claims_dir(base, placer)
                payload["join"] |= {"claims": claims, "claim": claim_name(key)}
                self._beats[claims] = placer
        job = await q.change(runstore.seal_checkpoint, q.s, row, self._uid(r, sc), payload,
                             sc.size)
        self._decide(row)
        self.staged[row.ckpt_id] = Staged(row, snap)
        self.staging.held_bytes += sum(f.size for f in snap.files.values() if f.how != "link")
        self.seals += 1
        self._count(run_id, "sealed", kind)
        hows = sorted({f.how for f in snap.files.values()})
        log.info("checkpoint %s sealed (%s), staged by %s: job %s", path, kind,
                 "+".join(hows), job.job_id)

    def _decide(self, row: WatchedRow) -> None:
        self.decided[row.path] = row
        self.pending.pop(row.path, None)
        if row.seal and row.state in DONE_STATES:
            self.strong.setdefault((row.rule, os.path.dirname(row.path)), set()).add(row.seal)

    def _count(self, run_id: str | None, fate: str, reason: str) -> None:
        tally = self.tally.setdefault(run_id, {})
        tally[fate] = tally.get(fate, 0) + 1
        self.metrics.checkpoint(fate, reason)

    async def _lost(self, path: str, r: BoundRule, run_id: str | None, gone: Pending) -> None:
        """An unsealed checkpoint is gone: a visible record of what could not be captured
        (it may have been complete: its writer rotated it away before it was sealed)."""
        seen = f"{gone.files} file(s), {gone.size} bytes, first seen " \
               f"{max(0.0, time.time() - gone.first_seen):.1f} s earlier"
        if gone.blocked:
            code, why = "staging_full", ("deleted while it waited for room in the staging "
                                         "area (watcher.staging_max_bytes)")
        elif gone.problem and gone.problem.startswith("changed"):
            code, why = "changed_during_snapshot", f"deleted after it {gone.problem}"
        elif gone.sealed_as is not None:
            code, why = "deleted_before_snapshot", (
                f"sealed ({gone.sealed_as}) but deleted before it could be staged"
                + (f": {gone.problem}" if gone.problem else ""))
        else:
            code, why = "deleted_before_seal", (
                "deleted before any seal held (the writer removed it, or rotated it away "
                "before the daemon could seal it)")
        await self._abandon_unsealed(path, r, run_id, code, f"{why}; {seen}",
                                     job_state=JobState.LOST)

    async def _abandon_unsealed(self, path: str, r: BoundRule, run_id: str | None, code: str,
                                message: str, *, seal_kind: str | None = None,
                                sc: Scan | None = None,
                                job_state: JobState = JobState.ABANDONED) -> None:
        """A checkpoint that never becomes an asset: a job row born ``abandoned`` (or
        ``lost``), a WARNING line and a count."""
        q = self.queue
        uid = r.uid
        if uid is None:
            try:
                uid = (await anyio.to_thread.run_sync(os.lstat, path)).st_uid
            except OSError:
                uid = os.getuid()
        row = WatchedRow(runstore.new_ckpt_id(), path, run_id, r.key,
                         WatchedState(str(job_state)), seal_kind,
                         sc.fingerprint() if sc else None,
                         ident=sc.ident() if sc else None,
                         top_mtime_ns=sc.mtime_ns if sc else None)
        payload = {"path": path, "asset_type": r.rule.asset_type, "checkpoint": path}
        job = await q.change(runstore.record_abandoned, q.s, row, uid, payload,
                             {"code": code, "message": message}, job_state)
        self._decide(row)
        self.tmp_live.pop(path, None)
        self._count(run_id, str(job_state), code)
        log.warning("checkpoint %s %s (%s): %s; job %s", path, job_state, code, message,
                    job.job_id)

    # ---- a run's end --------------------------------------------------------------------

    async def final_scan(self, run_id: str, *, allow_quiescence: bool) -> None:
        """Look at every checkpoint of the run once more (at its end): what is sealed now is
        sealed."""
        async with self._lock:
            await self._pass(rescan=True, only_run=run_id, allow_quiescence=allow_quiescence)

    def unsealed(self, run_id: str) -> int:
        return sum(1 for p in self.pending.values() if p.run_id == run_id)

    async def abandon_unsealed(self, run_id: str, why: str) -> int:
        """Everything of the run not sealed yet never becomes an asset: a job born
        abandoned for each (checkpoints being written under a temporary name too)."""
        n = 0
        async with self._lock:
            for path, pend in list(self.pending.items()):
                if pend.run_id != run_id:
                    continue
                r = self.rules.get(pend.rule_key)
                del self.pending[path]
                if r is not None:
                    await self._abandon_unsealed(path, r, run_id, "not_sealed", why)
                    n += 1
            live = {p: v for p, v in self.tmp_live.items() if v[1] == run_id}
            exists = await anyio.to_thread.run_sync(
                lambda: [p for p in live if os.path.lexists(p)])
            for path in exists:
                r = self.rules.get(live[path][0])
                if r is not None and path not in self.decided:
                    await self._abandon_unsealed(path, r, run_id, "not_sealed", why)
                    n += 1
        return n

    # ---- after the upload ---------------------------------------------------------------

    async def _cleanup(self) -> None:
        if not self.staged:
            return
        q = self.queue
        for row, jstate, code in await q.do(runstore.staged_rows, q.s):
            st = self.staged.get(row.ckpt_id)
            snap_dir = row.snapshot
            assert snap_dir is not None
            superseded = row.state == WatchedState.SUPERSEDED or (
                st is not None and st.row.state == WatchedState.SUPERSEDED)
            if jstate == JobState.DONE:
                new_state = WatchedState.SUPERSEDED if superseded else WatchedState.DONE
            elif jstate in (JobState.ABANDONED, JobState.CANCELLED):
                new_state = WatchedState.SUPERSEDED if superseded else WatchedState.ABANDONED
                if superseded and jstate == JobState.CANCELLED:
                    await self._relabel(row, (JobState.CANCELLED,))
            elif jstate == JobState.FAILED and (superseded or code == "source_changed"):
                await self._relabel(row, (JobState.FAILED,))
                new_state = WatchedState.SUPERSEDED
                self._recheck.add(row.path)
            else:
                continue  # queued, running, or failed for another reason (kept for `retry`)
            if new_state == WatchedState.DONE:
                await self._keep_in_cache(row.job_id, snap_dir)
            await anyio.to_thread.run_sync(self.staging.remove, snap_dir)
            await q.do(runstore.set_watched, q.s, row.ckpt_id, state=new_state)
            self.staged.pop(row.ckpt_id, None)
            decided = self.decided.get(row.path)
            if decided is not None and decided.ckpt_id == row.ckpt_id:
                decided.state = check_move(WATCHED_MOVES, decided.state, new_state,
                                           f"checkpoint {row.ckpt_id}")
                decided.snapshot = None
            log.info("snapshot of %s removed (job %s %s)", row.path, row.job_id, jstate)

    async def _keep_in_cache(self, job_id: str | None, snap_dir: str) -> None:
        """A finalized upload's snapshot becomes its asset's entry in the node-local cache
        (``download.cache_uploads``): moved there, so a restore on this node fetches
        nothing. So does this node's part of a checkpoint several nodes build (its job done
        once its files are in: another node may finalize), so that restoring this node's
        ranks fetches only what other nodes wrote. Only files inside the snapshot are
        moved."""
        cache = self.jobs.cache
        if job_id is None or not self.settings.download.cache_uploads:
            return
        q = self.queue
        job = await q.do(q.s.get, job_id)
        rec = None if job is None or job.asset_key is None else \
            await q.do(q.s.asset, job.asset_key)
        if job is None or job.asset_key is None or rec is None or rec.asset_id is None \
                or not (rec.state == AssetState.FINALIZED
                        or (job.state == JobState.DONE and (job.result or {}).get("joined"))):
            return
        root = os.path.join(snap_dir, "")
        files = [{"name": c.name, "size": c.size or 0, "sha256": c.sha256, "path": c.path}
                 for c in await q.do(q.s.components, job.asset_key)]
        if not all(f["sha256"] and f["path"] and str(f["path"]).startswith(root)
                   for f in files):
            return
        try:
            await cache.adopt(rec.asset_id, files)
        except OSError as e:
            log.warning("cache: snapshot of %s not kept: %s", rec.asset_id, e)

    async def _relabel(self, row: WatchedRow, expect: tuple[JobState, ...]) -> None:
        q = self.queue
        assert row.job_id is not None
        await q.change(runstore.relabel_abandoned, q.s, row.job_id, expect, "source_changed",
                       f"{row.path} was rewritten in place after it was sealed: this snapshot "
                       "is not uploaded (no mixed bytes); the checkpoint is sealed again")

    async def _supervise(self) -> None:
        """Linked snapshots rewritten in place: supersede their jobs."""
        watch = {cid: s for cid, s in self.staged.items()
                 if s.row.state == WatchedState.SEALED and s.snap.linked()}
        if not watch:
            return
        changed = await anyio.to_thread.run_sync(
            lambda: {cid: rel for cid, s in watch.items()
                     if (rel := self.staging.changed(s.snap)) is not None})
        q = self.queue
        for cid, rel in changed.items():
            st = watch[cid]
            row = st.row
            assert row.job_id is not None
            job = await q.do(q.s.get, row.job_id)
            if job is None or job.terminal:
                continue
            log.warning("checkpoint %s: %s was rewritten in place after the seal; its job %s "
                        "is abandoned and the checkpoint will be sealed again", row.path, rel,
                        row.job_id)
            row.state = check_move(WATCHED_MOVES, row.state, WatchedState.SUPERSEDED,
                                   f"checkpoint {cid}")
            await q.do(runstore.set_watched, q.s, cid, state=WatchedState.SUPERSEDED,
                       snapshot=row.snapshot)
            if not await q.change(runstore.relabel_abandoned, q.s, row.job_id,
                                  (JobState.QUEUED,),
                                  "source_changed",
                                  f"{row.path} was rewritten in place after it was sealed: "
                                  "this snapshot is not uploaded; the checkpoint is sealed "
                                  "again"):
                await q.change(q.s.request_cancel, row.job_id)
                self.jobs.cancel_running(row.job_id)
            elif job.asset_key:
                await self.runs.abandon_local_asset(job.asset_key, "superseded by a rewrite")
            self._recheck.add(row.path)
        if changed:
            self.wake()

    async def _account(self) -> None:
        now = time.monotonic()
        if now - self._last_prune > 3600:
            self._last_prune = now
            await anyio.to_thread.run_sync(self.staging.prune_claims)
        if self._beats and now - self._last_beat >= shares.HEARTBEAT_S:
            self._last_beat = now
            for claims, placer in list(self._beats.items()):
                try:
                    await run_as(placer, shares.heartbeat, claims, self.staging.agent_id)
                except OSError as e:
                    log.warning("cannot say this agent is alive in %s (%s): other nodes' "
                                "agents may take over its shares", claims, e)
        if now - self._last_account < min(2.0, self.cfg.check_s * 2):
            return
        self._last_account = now
        dirs = [s.snap.dir for s in self.staged.values()]
        await anyio.to_thread.run_sync(self.staging.account, dirs)
        if any(p.blocked for p in self.pending.values()) and self.staging.room_for(0):
            for p in self.pending.values():
                p.blocked = False

    # ---- file events --------------------------------------------------------------------

    def _root_sets(self) -> RootSets:
        """The roots watched by events and by polling, and for roots that do not exist yet
        their nearest existing parents (watched without recursion: the moment a root
        appears, the watchers restart with it and its rule is rescanned)."""
        events: set[str] = set()
        polled: set[str] = set()
        parents: set[str] = set()
        parents_polled: set[str] = set()
        fs_cache: dict[str, bool] = {}
        for r in list(self.rules.values()):
            root = r.root
            exists = os.path.isdir(root)
            while not os.path.isdir(root):
                root = os.path.dirname(root)
            poll = r.rule.poll
            if poll is None:
                if root not in fs_cache:
                    fs_cache[root] = is_network_fs(root)
                poll = fs_cache[root]
            if exists:
                (polled if poll else events).add(root)
            else:
                (parents_polled if poll else parents).add(root)

        def outermost(roots: set[str]) -> frozenset[str]:
            return frozenset(p for p in roots if not any(
                p != o and p.startswith(o.rstrip("/") + "/") for o in roots))

        return (outermost(events), outermost(polled - events), frozenset(parents),
                frozenset(parents_polled - parents))

    def _filter(self, change: watchfiles.Change, path: str) -> bool:
        return not seal.in_staging(path)

    def _on_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        self._dirty.update(p for _c, p in changes)
        self._wake.set()

    def _on_parent_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        self._roots_changed.set()  # a missing root (or a step towards it) may be there now

    async def _watchers(self) -> None:
        none: RootSets = (frozenset(), frozenset(), frozenset(), frozenset())
        current = none
        stops: list[anyio.Event] = []
        async with anyio.create_task_group() as tg:
            try:
                while True:
                    sets = await anyio.to_thread.run_sync(self._root_sets)
                    if self._watch_failed:
                        self._watch_failed = False
                        current = none
                        await anyio.sleep(min(self.cfg.rescan_s, 10.0))
                    if sets != current:
                        for ev in stops:
                            ev.set()
                        stops = []
                        for roots, poll, whole in ((sets[0], False, True), (sets[1], True, True),
                                                   (sets[2], False, False),
                                                   (sets[3], True, False)):
                            if roots:
                                ev = anyio.Event()
                                stops.append(ev)
                                tg.start_soon(self._awatch, sorted(roots), poll, ev, whole)
                        # what happened while no one watched: now, and once more when the
                        # new watchers surely took hold (they give no sign of it)
                        self._rescan_due = True
                        self._rescan_again_at = time.monotonic() + 1.0
                        self.wake()
                        current = sets
                        log.info("watching %d root(s) by events, %d by polling; %d missing "
                                 "root(s) from their parents", len(sets[0]), len(sets[1]),
                                 len(sets[2]) + len(sets[3]))
                    with anyio.move_on_after(self.cfg.rescan_s):
                        await self._roots_changed.wait()
                    self._roots_changed = anyio.Event()
            finally:
                for ev in stops:
                    ev.set()

    async def _awatch(self, roots: list[str], poll: bool, stop: anyio.Event,
                      recursive: bool = True) -> None:
        """One watchfiles watcher: recursive over roots, or only the entries of the parents
        of missing roots."""
        handle = self._on_changes if recursive else self._on_parent_changes
        try:
            async for changes in watchfiles.awatch(
                *roots, watch_filter=self._filter, debounce=self.cfg.debounce_ms,
                step=self.cfg.step_ms, stop_event=stop, force_polling=poll,
                poll_delay_ms=self.cfg.poll_delay_ms, ignore_permission_denied=True,
                recursive=recursive,
            ):
                handle(changes)
        except Exception as e:  # a root removed under the watcher, an inotify limit, ...
            if not stop.is_set():
                log.warning("file watcher on %s stopped (%s); rescans go on, and it restarts "
                            "when its roots change", ", ".join(roots), e)
                self._watch_failed = True
                self._roots_changed.set()
