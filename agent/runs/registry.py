"""Runs known to the daemon: registered over the socket (or by ``chronicle-agent exec``),
alive while their process lives (pidfd) or while heartbeats arrive (lease), ended by
``finish`` or by their death. Persisted in the queue database (table ``runs``), so a
restart keeps watching and tracking them.

A run's end, in order:

1. **Seal what is complete.** The watcher looks at the run's checkpoints once more. After a
   clean ``finish`` (status ``finished``) checkpoints still settling get their quiescence
   time; after a death (or ``failed``/``crashed``) only a strong seal counts (marker,
   ``.metadata``, rename): a half-written checkpoint must never become an asset.
2. **Abandon what is not.** Every checkpoint of the run not sealed by then is recorded as
   a job born ``abandoned`` (``jobs`` shows it); the run's watch rules are dropped.
3. **Abandon what nothing will finalize.** Assets of the run registered through the
   three-step flow with no finalize job are abandoned on Chronicle at once.
4. **``runs.on_exit``** (only when the run did not finish cleanly): ``drain`` (default)
   lets the sealed checkpoints upload and finalize; ``abandon`` abandons the run's
   pending jobs too.
5. **End the run on Chronicle** (``finished``, ``failed`` or ``crashed``) only once all its
   jobs are terminal, since ending a run abandons whatever of it is still pending.

A pid-observed death is settled at once (steps 1–4 take milliseconds); under ``exec`` the
reporter (the command's parent) reports its exit status, so the daemon waits up to
``EXEC_GRACE_S`` for it before calling the death a crash. Only Chronicle API calls are
made from here (register the run, abandon assets, end the run); transfers stay with the
workers.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread

from agent.access import Refused
from agent.chronicle import contract
from agent.config import WatchRule
from agent.errors import AgentError, AssetNotPending, ChronicleError, UsageError
from agent.queue import runstore
from agent.queue.runstore import RunRow
from agent.queue.states import (
    RUN_MOVES,
    SEAL_MOVES,
    AssetState,
    RunState,
    SealMode,
    check_move,
)
from agent.queue.store import TERMINAL, JobState, StateConflict, _rfc3339
from agent.runs import liveness
from agent.transfer.primitives import backoff_s
from agent.transfer.upload import caller_token, part_marker
from agent.watch.seal import glob_root

if TYPE_CHECKING:
    from agent.chronicle.aio import AsyncChronicle
    from agent.config import Settings, WatcherSection
    from agent.queue.aqueue import AsyncQueue

log = logging.getLogger(__name__)

EXEC_GRACE_S = 1.0
"""How long a dead ``exec`` command's run waits for its reporter to report its exit status."""


@dataclass
class RunInfo:
    run_id: str
    uid: int
    pid: int | None
    pid_start: int | None = None
    wrapper_pid: int | None = None
    liveness: str = "pid"
    lease_s: float = 60.0
    on_exit: str = "drain"
    watch: list[dict[str, Any]] = field(default_factory=list)
    state: RunState = RunState.RUNNING
    status: str | None = None
    exit_code: int | None = None
    last_seen: float = field(default_factory=time.time)
    created_at: float = field(default_factory=time.time)
    sealing: SealMode = SealMode.OPEN
    """open (any seal) | strong (dying: no quiescence) | closed (nothing more is sealed)."""
    finished: anyio.Event = field(default_factory=anyio.Event)
    pidfd: int | None = None
    settled: bool = False
    saved_seen: float = 0.0
    cred_id: str | None = None
    """The caller's own Chronicle credential, if it sent one: the run is made with it."""
    ended_at: float | None = None

    def move(self, to: RunState) -> None:
        """Its state becomes ``to`` (:data:`~agent.queue.states.RUN_MOVES`)."""
        self.state = check_move(RUN_MOVES, self.state, to, f"run {self.run_id}")

    def seal_only(self, mode: SealMode) -> None:
        """Which seals its checkpoints may still get becomes ``mode``
        (:data:`~agent.queue.states.SEAL_MOVES`)."""
        self.sealing = check_move(SEAL_MOVES, self.sealing, mode, f"run {self.run_id}'s sealing")

    def to_api(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "pid": self.pid, "state": self.state,
                "status": self.status, "exit_code": self.exit_code,
                "liveness": self.liveness, "lease_s": self.lease_s, "on_exit": self.on_exit,
                "watch": self.watch, "started_at": _rfc3339(self.created_at),
                "ended_at": _rfc3339(self.ended_at) if self.ended_at is not None else None,
                "settled": self.settled or self.state == RunState.ENDED}

    def row(self) -> RunRow:
        return RunRow(run_id=self.run_id, uid=self.uid, pid=self.pid, pid_start=self.pid_start,
                      wrapper_pid=self.wrapper_pid, liveness=self.liveness,
                      lease_s=self.lease_s, on_exit=self.on_exit, watch=self.watch,
                      state=self.state, status=self.status, exit_code=self.exit_code,
                      last_seen=self.last_seen, created_at=self.created_at,
                      cred_id=self.cred_id)

    @classmethod
    def of(cls, r: RunRow) -> RunInfo:
        return cls(run_id=r.run_id, uid=r.uid, pid=r.pid, pid_start=r.pid_start,
                   wrapper_pid=r.wrapper_pid, liveness=r.liveness, lease_s=r.lease_s,
                   on_exit=r.on_exit, watch=r.watch, state=r.state, status=r.status,
                   exit_code=r.exit_code, last_seen=r.last_seen, created_at=r.created_at,
                   cred_id=r.cred_id,
                   ended_at=r.updated_at if r.state == RunState.ENDED else None)


def ended_message(info: RunInfo) -> str:
    """Why an ended run cannot be registered (or joined) again."""
    how = info.status or "crashed"
    if info.exit_code is not None:
        how += f", exit code {info.exit_code}"
    return (f"run {info.run_id} has already ended ({how}): a run id names one run, so "
            "give this one a new id (or none: one is made up)")


class RunsChronicle(Protocol):
    """What the registry asks of Chronicle (the daemon's upload engine offers it)."""

    chronicle: AsyncChronicle

    async def ensure_run(self, run_id: str | None, token: str | None = None) -> None: ...

    async def features(self) -> frozenset[str]: ...


class Canceller(Protocol):
    """Stops a running job (the workers)."""

    def cancel_running(self, job_id: str, abandon_reason: str | None = None) -> None: ...


class Sealer(Protocol):
    """The watcher, as a run's start and end use it: its rules, and what it still waits to
    seal."""

    cfg: WatcherSection
    tally: dict[str | None, dict[str, int]]

    def add_rules(self, run_id: str, rules: list[WatchRule], uid: int) -> None: ...
    def remove_rules(self, run_id: str) -> None: ...
    def longest_quiescence_s(self) -> float: ...
    def unsealed(self, run_id: str) -> int: ...
    async def final_scan(self, run_id: str, *, allow_quiescence: bool) -> None: ...
    async def abandon_unsealed(self, run_id: str, why: str) -> int: ...


class RunRegistry:
    """The runs this daemon tracks. Built from the narrow things it uses: the queue, the
    settings, Chronicle, a job canceller; the watcher (a :class:`Sealer`) is attached once
    it exists (it asks the registry how to seal each run's checkpoints)."""

    def __init__(self, queue: AsyncQueue, settings: Settings, chronicle: RunsChronicle,
                 canceller: Canceller) -> None:
        self.queue = queue
        self.settings = settings
        self.chronicle = chronicle
        self.canceller = canceller
        self._sealer: Sealer | None = None
        self.runs: dict[str, RunInfo] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._ready = anyio.Event()
        self._restored: list[tuple[RunInfo, bool]] = []

    def bind(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg

    def attach(self, sealer: Sealer) -> None:
        self._sealer = sealer

    @property
    def sealer(self) -> Sealer:
        if self._sealer is None:
            raise RuntimeError("no watcher attached to the run registry")
        return self._sealer

    def sealing(self, run_id: str | None) -> SealMode:
        info = self.runs.get(run_id) if run_id else None
        return info.sealing if info is not None else SealMode.OPEN

    # ---- start -------------------------------------------------------------------------

    async def restore(self) -> None:
        """Before the watcher starts: the runs of the previous daemon, with their rules,
        and which of them died meanwhile (their checkpoints get strong seals only)."""
        q = self.queue
        for row in await q.do(runstore.load_runs, q.s):
            info = RunInfo.of(row)
            self.runs[info.run_id] = info
            if info.state == RunState.ENDED:
                info.seal_only(SealMode.CLOSED)
                continue
            self._add_rules(info)
            dead = False
            if info.state == RunState.RUNNING and info.liveness == "pid" and info.pid:
                info.pidfd = liveness.open_pidfd(info.pid, info.pid_start)
                dead = info.pidfd is None
            elif info.state == RunState.RUNNING:
                info.last_seen = max(info.last_seen, time.time())  # the lease starts anew
            # an exec run's reporter may still report a clean exit (it rides out a daemon
            # restart): its checkpoints keep every seal until that grace is over (_exited)
            if (dead and not info.wrapper_pid) or (
                    info.state == RunState.ENDING and info.status != "finished"):
                info.seal_only(SealMode.STRONG)
            self._restored.append((info, dead))
        if self._restored:
            log.info("tracking %d run(s) again", len(self._restored))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """After the watcher has scanned: settle what died while the daemon was down, watch
        the pids of the living, and expire leases."""
        assert self._tg is not None
        for info, dead in self._restored:
            if info.state == RunState.RUNNING:
                self._tg.start_soon(self._ensure_remote, info.run_id)
            if dead:
                self._tg.start_soon(self._exited, info, f"its process (pid {info.pid}) exited "
                                    "while the daemon was down, without finish")
            elif info.state == RunState.ENDING:
                self._tg.start_soon(self._settle, info)
            elif info.pidfd is not None:
                self._tg.start_soon(self._watch_pid, info)
        self._restored = []
        self._ready.set()
        task_status.started()
        while True:
            await anyio.sleep(0.5)
            now = time.time()
            for info in list(self.runs.values()):
                if (info.state == RunState.RUNNING and info.liveness == "lease"
                        and now - info.last_seen > info.lease_s):
                    info.move(RunState.DYING)
                    self._tg.start_soon(self._died, info,
                                        f"no heartbeat for {info.lease_s:g} s (lease expired)")

    async def _wait_ready(self) -> None:
        with anyio.fail_after(30):
            await self._ready.wait()

    # ---- the API ------------------------------------------------------------------------

    async def register(
        self, run_id: str | None, pid: int | None, uid: int, name: str | None = None, *,
        peer_pid: int = 0, watch: list[dict[str, Any]] | None = None,
        on_exit: str | None = None, lease: bool = False, exec_wrapper: bool = False,
        cred_id: str | None = None,
    ) -> dict[str, Any]:
        await self._wait_ready()
        run_id = run_id or f"run_{secrets.token_hex(8)}"
        rules = [WatchRule.model_validate(w) for w in watch or []]
        await anyio.to_thread.run_sync(self._check_rules, rules, uid)
        existing = self.runs.get(run_id)
        if existing is not None:
            if uid not in (0, existing.uid):
                raise Refused(f"run {run_id} belongs to another user")
            if existing.state != RunState.RUNNING:
                raise StateConflict(ended_message(existing), code="run_ended")
            new = [r.model_dump(mode="json") for r in rules]
            new = [w for w in new if w not in existing.watch]
            if new and existing.state == RunState.RUNNING:
                existing.watch += new
                self._add_rules(existing)
                await self.queue.do(runstore.update_run, self.queue.s, run_id,
                                      watch=existing.watch)
            return existing.to_api()
        chosen = None if lease else await anyio.to_thread.run_sync(
            self._pick_pid, pid, peer_pid, uid)
        info = RunInfo(
            run_id, uid, chosen,
            pid_start=liveness.start_time(chosen) if chosen else None,
            wrapper_pid=peer_pid if exec_wrapper and peer_pid else None,
            liveness="pid" if chosen else "lease",
            lease_s=self.settings.runs.lease_s,
            on_exit=on_exit or self.settings.runs.on_exit,
            watch=[r.model_dump(mode="json") for r in rules],
            cred_id=cred_id,
        )
        if chosen:
            info.pidfd = liveness.open_pidfd(chosen, info.pid_start)
        await self.queue.do(runstore.save_run, self.queue.s, info.row())
        self.runs[run_id] = info
        self._add_rules(info)
        assert self._tg is not None
        self._tg.start_soon(self._ensure_remote, run_id)
        if info.pidfd is not None:
            self._tg.start_soon(self._watch_pid, info)
        elif chosen:
            self._tg.start_soon(self._died, info, f"its process (pid {chosen}) had already "
                                "exited when it was registered")
        log.info("run %s registered (%s, uid %d%s)", run_id,
                 f"pid {chosen}" if chosen else f"lease {info.lease_s:g} s", uid,
                 f", {len(rules)} watch rule(s)" if rules else "")
        return info.to_api()

    def _pick_pid(self, pid: int | None, peer_pid: int, uid: int) -> int | None:
        """The process whose life is the run's: the pid given if it is the caller, the
        caller's child (``exec``) or, for root or its owner, a process the caller names;
        else the caller's own pid from SO_PEERCRED; none (a lease) for a caller in another
        pid namespace (SO_PEERCRED pid 0)."""
        if pid is not None and pid > 0:
            if peer_pid and (pid == peer_pid or liveness.parent_pid(pid) == peer_pid):
                return pid
            if peer_pid and (uid == 0 or liveness.owner_uid(pid) == uid):
                return pid
        return peer_pid or None

    def _check_rules(self, rules: list[WatchRule], uid: int) -> None:
        """A caller may only have the daemon watch (and upload) what it owns, within
        ``agent.roots`` when those are set."""
        allowed = [str(p).rstrip("/") for p in self.settings.agent.roots]
        for r in rules:
            root = glob_root(r.path)
            if allowed and not any(root == a or root.startswith(a + "/") for a in allowed):
                raise UsageError(f"watch path {r.path} is outside agent.roots", code="forbidden")
            if uid in (0, os.geteuid()):
                continue
            p = root
            while not os.path.exists(p) and p != "/":
                p = os.path.dirname(p)
            if os.stat(p).st_uid != uid:
                raise UsageError(f"watch path {r.path}: {p} is not yours (uid {uid})",
                                 code="forbidden")

    def _add_rules(self, info: RunInfo) -> None:
        if info.watch:
            self.sealer.add_rules(info.run_id, [WatchRule.model_validate(w)
                                                   for w in info.watch], info.uid)

    def _get(self, run_id: str, uid: int = 0) -> RunInfo:
        """The run, for its owner or root; to anyone else it does not exist."""
        info = self.runs.get(run_id)
        if info is None or uid not in (0, info.uid):
            raise StateConflict(f"run {run_id} is not registered with this daemon",
                                code="not_found")
        return info

    def get(self, run_id: str, uid: int = 0) -> dict[str, Any]:
        return self._get(run_id, uid).to_api()

    def list(self, uid: int | None = None) -> list[dict[str, Any]]:
        """The runs of ``uid`` (None: every run)."""
        return [i.to_api() for i in self.runs.values() if uid is None or i.uid == uid]

    async def heartbeat(self, run_id: str, uid: int = 0) -> dict[str, Any]:
        info = self._get(run_id, uid)
        info.last_seen = time.time()
        # persisted now and then only: after a restart every lease starts anew anyway
        if (info.state == RunState.RUNNING
                and info.last_seen - info.saved_seen >= info.lease_s / 4):
            info.saved_seen = info.last_seen
            await self.queue.do(runstore.update_run, self.queue.s, run_id,
                                  last_seen=info.last_seen)
        return info.to_api()

    async def finish(self, run_id: str, status: str, exit_code: int | None = None,
                     uid: int = 0) -> dict[str, Any]:
        await self._wait_ready()
        info = self._get(run_id, uid)
        if info.state in (RunState.RUNNING, RunState.DYING):
            info.move(RunState.ENDING)
            info.status, info.exit_code = status, exit_code
            await self._save(info)
            info.finished.set()
            assert self._tg is not None
            self._tg.start_soon(self._settle, info)
        return info.to_api()

    # ---- life and death -----------------------------------------------------------------

    async def _ensure_remote(self, run_id: str) -> None:
        """Create the run on Chronicle in the background (a registration must never wait
        on Chronicle; uploads create it too if this fails)."""
        info = self.runs.get(run_id)
        try:
            await self.chronicle.ensure_run(run_id, await self._token(info))
        except AgentError as e:
            log.warning("run %s: could not create it on Chronicle yet: %s", run_id, e)

    async def _token(self, info: RunInfo | None) -> str | None:
        """The token the run is made with on Chronicle: its caller's, else the daemon's."""
        if info is None or info.cred_id is None:
            return None
        q = self.queue
        return caller_token(info.cred_id, await q.do(q.s.token, info.cred_id),
                            f"run {info.run_id}")

    async def _save(self, info: RunInfo) -> None:
        await self.queue.do(runstore.update_run, self.queue.s, info.run_id,
                              state=RunState.ENDING if info.state == RunState.DYING
                              else info.state,
                              status=info.status, exit_code=info.exit_code)

    async def _watch_pid(self, info: RunInfo) -> None:
        fd = info.pidfd
        assert fd is not None
        try:
            await liveness.wait_exit(fd)
        finally:
            info.pidfd = None
            os.close(fd)
        await self._exited(info, f"its process (pid {info.pid}) exited without finish")

    async def _exited(self, info: RunInfo, why: str) -> None:
        """The run's process is gone: an ``exec`` run's reporter (the registering peer)
        reports its status, maybe after riding out a daemon restart, so it gets a grace
        period first; without that report the run died."""
        if info.state != RunState.RUNNING:
            return
        if info.wrapper_pid:
            with anyio.move_on_after(EXEC_GRACE_S):
                await info.finished.wait()
            if info.state != RunState.RUNNING:
                return
        await self._died(info, why)

    async def _died(self, info: RunInfo, why: str) -> None:
        if info.state not in (RunState.RUNNING, RunState.DYING):
            return
        info.seal_only(SealMode.STRONG)
        info.move(RunState.ENDING)
        info.status = "crashed"
        log.warning("run %s crashed: %s", info.run_id, why)
        await self._save(info)
        await self._settle(info, why)

    async def _settle(self, info: RunInfo, why: str | None = None) -> None:
        """Steps 1–5 of the module docstring (idempotent: a restart runs it again)."""
        try:
            await self._settle_steps(info, why)
        except Exception:  # a bug must not take the daemon down; a restart settles again
            log.exception("run %s: settling its end failed", info.run_id)

    async def _settle_steps(self, info: RunInfo, why: str | None) -> None:
        w = self.sealer
        clean = info.status == "finished"
        why = why or f"run {info.run_id} ended ({info.status}) before it was sealed"
        if not info.settled:
            if clean:
                await w.final_scan(info.run_id, allow_quiescence=True)
                deadline = time.monotonic() + w.longest_quiescence_s() + 2 * w.cfg.check_s
                while True:  # the watcher keeps looking meanwhile
                    if not w.unsealed(info.run_id) or time.monotonic() >= deadline:
                        break
                    await anyio.sleep(w.cfg.check_s)
            else:
                info.seal_only(SealMode.STRONG)
                await w.final_scan(info.run_id, allow_quiescence=False)
            n = await w.abandon_unsealed(info.run_id, why)
            info.seal_only(SealMode.CLOSED)
            w.remove_rules(info.run_id)
            m = await self._abandon_presigned(info)
            k = 0
            if not clean and info.on_exit == "abandon":
                k = await self._abandon_pending(info)
            info.settled = True
            tally = w.tally.get(info.run_id, {})
            log.log(logging.WARNING if n or tally.get("lost") else logging.INFO,
                    "run %s settled: %d checkpoint(s) sealed, %d lost, %d unsealed "
                    "abandoned, %d unfinalized asset(s) abandoned%s (this daemon's count "
                    "since its start)", info.run_id, tally.get("sealed", 0),
                    tally.get("lost", 0), n, m,
                    f", {k} pending job(s) abandoned (on_exit = abandon)" if k else "")
        await self._end_when_drained(info)

    async def _others_done(self, info: RunInfo, nodes: int) -> None:
        """Node 0 of a run several nodes write, before it ends the run on Chronicle (which
        abandons whatever of it is pending and takes no new asset): until no asset of the
        run is pending (the other nodes' uploads) and, on a Chronicle without
        ``asset_keys``, every node's part of each of this node's checkpoints is there; at
        most ``runs.join_wait_s``."""
        deadline = time.monotonic() + self.settings.runs.join_wait_s
        delay = 1.0
        parts: set[str] = set()
        try:
            if "asset_keys" not in await self.chronicle.features():
                q = self.queue
                keys = {str(j.payload["join"]["key"]) for j in await q.do(
                    q.s.list_jobs, run_id=info.run_id) if j.payload.get("join")}
                parts = {part_marker(k, r) for k in keys for r in range(nodes)}
        except AgentError as e:
            log.warning("run %s: cannot ask Chronicle what it offers (%s)", info.run_id, e)
        while time.monotonic() < deadline:
            try:
                token = await self._token(info)
                assets = (await self.chronicle.chronicle.send(contract.list_assets(
                    output_of=info.run_id), token=token)).assets
            except AgentError as e:
                log.warning("run %s: cannot see its assets (%s); ending it anyway",
                            info.run_id, e)
                return
            pending = [a.asset_id for a in assets if a.state == "pending"]
            missing = sorted(parts - {c.name for a in assets if a.state == "ready"
                                      for c in a.components})
            if not pending and not missing:
                return
            log.info("run %s: waiting for the other nodes before ending the run on Chronicle "
                     "(at most runs.join_wait_s): %d asset(s) pending%s", info.run_id,
                     len(pending), f", parts not there yet: {', '.join(missing[:8])}"
                     if missing else "")
            await anyio.sleep(delay)
            delay = min(2 * delay, 10.0)
        log.warning("run %s: asset(s) still pending or nodes' parts missing after "
                    "runs.join_wait_s; ending the run on Chronicle (it abandons what is "
                    "pending)", info.run_id)

    async def _abandon_presigned(self, info: RunInfo) -> int:
        q = self.queue
        recs = await q.do(runstore.unfinalized_presigned, q.s, info.run_id)
        for rec in recs:
            await self.abandon_local_asset(
                rec.asset_key, f"run {info.run_id} ended ({info.status}) without finalizing it")
        return len(recs)

    async def _abandon_pending(self, info: RunInfo) -> int:
        q = self.queue
        n = 0
        for job in await q.do(q.s.list_jobs, run_id=info.run_id):
            if job.terminal:
                continue
            n += 1
            reason = f"run {info.run_id} ended ({info.status}) and runs.on_exit is abandon"
            await self._stop_job(job.job_id, job.state, reason)
            if job.asset_key:
                await self.abandon_local_asset(job.asset_key, reason)
        return n

    async def _stop_job(self, job_id: str, state: JobState, reason: str) -> None:
        q = self.queue
        try:
            if state == JobState.QUEUED:
                await q.change(q.s.abandon_job, job_id, reason)
                return
        except StateConflict:
            pass  # claimed meanwhile: stop it like a running one
        try:
            await q.change(q.s.request_cancel, job_id)
        except StateConflict:
            return
        self.canceller.cancel_running(job_id, abandon_reason=reason)

    async def abandon_local_asset(self, asset_key: str, reason: str) -> None:
        """Abandon an asset this daemon registered (on Chronicle, then in the queue's
        records) and stop the jobs still working on it."""
        q = self.queue
        rec = await q.do(q.s.asset, asset_key)
        if rec is None or rec.state in (AssetState.FINALIZED, AssetState.ABANDONED):
            return
        if rec.asset_id is not None:
            try:
                await self.chronicle.chronicle.send(contract.abandon(
                    rec.asset_id, reason, idempotency_key=f"abandon:{rec.register_key}"),
                    token=caller_token(rec.cred_id, rec.token, f"asset {rec.asset_id}"))
            except AssetNotPending as e:  # finalized meanwhile: a ready asset stays ready
                log.info("asset %s: not abandoned (%s): it was finalized first; the record "
                         "is left to its upload", rec.asset_id, e)
                return
            except ChronicleError as e:
                log.info("asset %s: not abandoned on Chronicle (%s)", rec.asset_id, e)
            except AgentError as e:
                log.warning("asset %s: could not abandon it on Chronicle (%s); ending the "
                            "run will", rec.asset_id, e)
        await q.do(q.s.set_asset, asset_key, state=AssetState.ABANDONED)
        for job in await q.do(q.s.list_jobs, asset_key=asset_key):
            if not job.terminal:
                await self._stop_job(job.job_id, job.state, reason)
        log.info("asset %s abandoned: %s", rec.asset_id or asset_key, reason)

    async def _end_when_drained(self, info: RunInfo) -> None:
        q = self.queue
        while True:
            jobs = await q.do(q.s.list_jobs, run_id=info.run_id)
            if all(j.state in TERMINAL for j in jobs):
                break
            await q.changed.wait(1.0)
        tries = 0
        nodes = max([int(w.get("nodes") or 1) for w in info.watch] or [1])
        ranks = {w.get("node_rank") for w in info.watch if int(w.get("nodes") or 1) > 1}
        if nodes > 1 and 0 not in ranks:
            # ending the run on Chronicle abandons its pending assets: the checkpoints the
            # other nodes still upload into. Node 0 ends it once its own jobs are done.
            log.info("run %s ended on this node (node %s of %d); node 0 ends it on Chronicle",
                     info.run_id, "/".join(str(r) for r in ranks), nodes)
            tries = -1
        elif nodes > 1:
            await self._others_done(info, nodes)
        while tries >= 0:
            tries += 1
            delay = backoff_s(tries, 1.0, 60.0, jitter=False)
            try:
                token = await self._token(info)
                await self.chronicle.ensure_run(info.run_id, token)  # a registration may not
                await self.chronicle.chronicle.send(contract.end_run(  # have reached Chronicle
                    info.run_id, info.status or "finished",
                    idempotency_key=f"run-end:{info.run_id}"), token=token)
                break
            except ChronicleError as e:
                log.warning("run %s: Chronicle refused to end it: %s", info.run_id, e)
                break
            except AgentError as e:
                log.warning("run %s: could not end it on Chronicle (%s); trying again in "
                            "%.0f s", info.run_id, e, delay)
                await anyio.sleep(delay)
        info.move(RunState.ENDED)
        info.ended_at = time.time()
        await self._save(info)
        if tries >= 0:
            log.info("run %s ended on Chronicle: %s", info.run_id, info.status)
