"""Workers: claim a job from the queue, run it, record how it ended.

Each kind of job has one runner. How a job ends is decided here, from the error tree:
done; failed (a refusal, a changed source, a bad request — with the error in the job);
back to the queue with a delay (retryable errors that outlived their request-level
retries, and a full disk under a download, while job attempts remain); cancelled (by
request: an upload's pending asset is abandoned on Chronicle).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from agent.access import make_dest_parents
from agent.chronicle import contract
from agent.errors import (
    AgentError,
    ChronicleError,
    DiskFull,
    RetryableError,
    SourceChanged,
    StateDiskFull,
    StorageRefused,
)
from agent.fsid import Identity, run_as
from agent.queue.states import AssetState
from agent.queue.store import AssetRecord, Job, JobKind, JobState
from agent.transfer import joined, shares
from agent.transfer.cache import AssetCache
from agent.transfer.download import discard_staging, download_asset
from agent.transfer.groups import primary_error
from agent.transfer.primitives import backoff_s
from agent.transfer.selection import latest_call, require_latest, selected_view
from agent.transfer.shares import SharePlan
from agent.transfer.upload import AssetUpload, Engine, Progress, caller_token, scan_path

log = logging.getLogger(__name__)


class Workers:
    def __init__(self, engine: Engine, owner: str, job_max_attempts: int = 5) -> None:
        self.e = engine
        self.q = engine.queue
        self.owner = owner
        self.job_max_attempts = job_max_attempts
        self.live: dict[str, Progress] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._abandon_reasons: dict[str, str] = {}
        self._stopping = False
        dl = engine.settings.download
        self.cache = AssetCache(engine.settings.cache_dir(), dl.cache_max_bytes)
        """The node-local cache of ready assets (opened on the first download)."""
        self.private_staging = os.path.join(engine.settings.state_dir(), "staging", "")
        self.roots = [str(r) for r in engine.settings.agent.roots]

    def identity(self, job: Job) -> Identity | None:
        """Whose rights a job's files are opened with: its owner's (uid, and the gid its
        request came with), at every step; the daemon's own only for a watcher's snapshot
        in the daemon's private staging area (taken with the owner's rights, see
        agent.watch.staging). The payload keys that say so are set by the watcher alone:
        the socket API refuses unknown fields."""
        p = job.payload
        if (job.kind == JobKind.UPLOAD and p.get("checkpoint")
                and str(p.get("path", "")).startswith(self.private_staging)):
            return None
        return Identity.of(job.uid, p.get("gid"))

    # ---- API-facing ----------------------------------------------------------------------

    def live_bytes(self, job_id: str) -> int | None:
        p = self.live.get(job_id)
        return p.bytes_done if p is not None else None

    def cancel_running(self, job_id: str, abandon_reason: str | None = None) -> None:
        """Stop a running job: it ends ``cancelled`` (by request), or ``abandoned`` with
        ``abandon_reason`` (its run died and ``runs.on_exit`` is ``abandon``)."""
        if abandon_reason is not None:
            self._abandon_reasons[job_id] = abandon_reason
        scope = self._scopes.get(job_id)
        if scope is not None:
            scope.cancel()

    def stop_claiming(self) -> None:
        self._stopping = True
        self.q.changed.notify()

    # ---- the loop ------------------------------------------------------------------------

    async def run(self, n: int, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(self._loop, i)
            tg.start_soon(self._forget_tokens)
            task_status.started()

    async def _forget_tokens(self, every_s: float = 60.0) -> None:
        """Every minute, jobs finished longer than queue.finished_retention_s ago
        (:meth:`~agent.queue.store.Queue.prune_finished`), then callers' tokens that no live
        work needs (:meth:`~agent.queue.store.Queue.prune_credentials`), are deleted."""
        retention_s = self.e.settings.queue.finished_retention_s
        while not self._stopping:
            try:
                pruned = await self.q.do(self.q.s.prune_finished, retention_s)
                if pruned:
                    log.info("pruned %d job(s) finished over %.0f s ago", pruned, retention_s)
                await self.q.do(self.q.s.prune_credentials)
            except StateDiskFull:
                pass
            await anyio.sleep(every_s)

    async def _loop(self, i: int) -> None:
        while not self._stopping:
            # An empty claim changes nothing and must wake nobody: idle workers that woke
            # each other on every empty claim spun a core (seen in the benchmarks).
            try:
                job = await self.q.do(self.q.s.claim, self.owner)
            except StateDiskFull:  # a claim writes too: wait for space, keep the worker
                await anyio.sleep(2)
                continue
            if job is not None:
                self.q.changed.notify()  # its state moved to running
            else:
                # Sleep until the next delayed job is due, or until something changes. A
                # job that is due but cannot be claimed (a finalize waiting for its
                # components) is not a reason to poll: its components' ends notify.
                nxt = await self.q.do(self.q.s.next_wakeup)
                now = time.time()
                wait = 1.0 if nxt is None or nxt <= now else min(1.0, max(0.01, nxt - now))
                await self.q.changed.wait(wait)
                continue
            await self._run_one(job)

    async def _run_one(self, job: Job) -> None:
        progress = Progress()
        self.live[job.job_id] = progress
        scope = anyio.CancelScope()
        self._scopes[job.job_id] = scope
        log.info("job %s (%s) started, attempt %d", job.job_id, job.kind, job.attempts)
        outcome: tuple[JobState, dict[str, str] | None, dict[str, Any] | None] | None = None
        retry_in: float | None = None
        try:
            with scope:
                try:
                    outcome = (JobState.DONE, None, await self._dispatch(job, progress))
                except BaseExceptionGroup as group:
                    raise primary_error(group) from None
            if scope.cancelled_caught:
                outcome = await self._cancelled(job)
        except StateDiskFull as e:  # not the job's fault: wait for space, lose nothing
            retry_in = 10.0
            outcome = (JobState.QUEUED, e.to_dict(), None)
        except RetryableError as e:
            if job.attempts < self.job_max_attempts and not self._stopping:
                retry_in = backoff_s(job.attempts, 30.0, 600.0, jitter=False)
                outcome = (JobState.QUEUED, e.to_dict(), None)
            else:
                outcome = (JobState.FAILED, e.to_dict(), None)
        except DiskFull as e:  # waits for space; its partial files are kept for the resume
            if job.attempts < self.job_max_attempts and not self._stopping:
                base = self.e.settings.download.disk_full_retry_s
                retry_in = backoff_s(job.attempts, base, 600.0, jitter=False)
                outcome = (JobState.QUEUED, e.to_dict(), None)
            else:
                outcome = (JobState.FAILED, e.to_dict(), None)
        except AgentError as e:
            outcome = (JobState.FAILED, e.to_dict(), None)
        except Exception as e:  # a bug: keep the daemon alive, fail the job loudly
            log.exception("job %s: internal error", job.job_id)
            outcome = (JobState.FAILED, {"code": "internal_error",
                                         "message": f"{type(e).__name__}: {e}"}, None)
        finally:
            self._scopes.pop(job.job_id, None)
            self.live.pop(job.job_id, None)
            if outcome is None:  # the daemon is shutting down: leave the job running,
                with anyio.CancelScope(shield=True):  # a restart resumes it
                    await self._save_progress(job.job_id, progress)
        assert outcome is not None
        state, error, result = outcome
        with anyio.CancelScope(shield=True):
            if state == JobState.QUEUED:
                assert retry_in is not None
                log.warning("job %s: %s; queued again in %.0fs", job.job_id,
                            error["message"] if error else "", retry_in)
            elif error:
                log.warning("job %s %s: %s: %s", job.job_id, state, error["code"],
                            error["message"])
            else:
                log.info("job %s %s", job.job_id, state)
            await self._record_end(job, progress, state, error, result, retry_in)
            if state != JobState.QUEUED:
                self.e.metrics.jobs_finished[str(state)] += 1

    async def _record_end(
        self, job: Job, progress: Progress, state: JobState, error: dict[str, str] | None,
        result: dict[str, Any] | None, retry_in: float | None,
    ) -> None:
        """Write how the job ended; on a full state disk, keep trying until space returns
        (the job stays ``running`` meanwhile, and a restart would resume it)."""
        warned = False
        while True:
            try:
                await self._save_progress(job.job_id, progress)
                if state == JobState.QUEUED:
                    await self.q.change(self.q.s.release, job.job_id, self.owner,
                                        retry_in or 0.0, error)
                else:
                    await self.q.change(self.q.s.finish, job.job_id, self.owner, state,
                                        error, result)
                return
            except StateDiskFull as e:
                if not warned:
                    log.error("job %s ended %s but %s", job.job_id, state, e.message)
                    warned = True
                await anyio.sleep(2)

    async def _cancelled(
        self, job: Job
    ) -> tuple[JobState, dict[str, str] | None, dict[str, Any] | None]:
        reason = self._abandon_reasons.pop(job.job_id, None)
        with anyio.CancelScope(shield=True):
            if job.asset_key and job.kind in (JobKind.UPLOAD, JobKind.FINALIZE):
                asset = await self.q.do(self.q.s.asset, job.asset_key)
                if asset is not None:
                    try:
                        await AssetUpload(self.e, asset, Progress()).abandon(
                            reason or "upload cancelled")
                    except AgentError as e:
                        log.warning("job %s: could not abandon %s: %s", job.job_id,
                                    asset.asset_id, e)
            if job.kind == JobKind.DOWNLOAD:
                await run_as(self.identity(job), discard_staging, job.payload["dest"],
                             job.job_id)
        if reason is not None:
            return JobState.ABANDONED, {"code": "abandoned", "message": reason}, None
        return (JobState.CANCELLED, {"code": "cancelled", "message": "cancelled by request"},
                None)

    async def _save_progress(self, job_id: str, progress: Progress) -> None:
        await self.q.do(self.q.s.set_progress, job_id, bytes_done=max(0, progress.bytes_done))

    async def _dispatch(self, job: Job, progress: Progress) -> dict[str, Any] | None:
        if job.cancel_requested:
            self.cancel_running(job.job_id)
            await anyio.lowlevel.checkpoint()
        if job.kind == JobKind.UPLOAD:
            return await self._upload(job, progress)
        if job.kind == JobKind.INLINE:
            return await self._inline(job)
        if job.kind == JobKind.COMPONENT:
            return await self._component(job, progress)
        if job.kind == JobKind.FINALIZE:
            return await self._finalize(job)
        if job.kind == JobKind.DOWNLOAD:
            return await self._download(job, progress)
        raise AgentError(f"unknown job kind {job.kind}")

    # ---- runners -------------------------------------------------------------------------

    async def _asset_for(self, job: Job) -> AssetRecord:
        assert job.asset_key is not None
        asset = await self.q.do(self.q.s.asset, job.asset_key)
        assert asset is not None
        if asset.state == AssetState.ABANDONED:  # a retried job whose asset was abandoned
            await self.q.do(self.q.s.reset_asset, job.asset_key)
            asset = await self.q.do(self.q.s.asset, job.asset_key)
            assert asset is not None
        return asset

    async def _upload(self, job: Job, progress: Progress) -> dict[str, Any] | None:
        # a share of a checkpoint several nodes' agents split: say this agent is alive
        async with shares.beating(shares.Claims.of(job.payload.get("join"),
                                                   self.identity(job))):
            return await self._upload_job(job, progress)

    async def _upload_job(self, job: Job, progress: Progress) -> dict[str, Any] | None:
        p = job.payload
        if job.asset_key is not None:
            prior = await self.q.do(self.q.s.asset, job.asset_key)
            if prior is not None and prior.state == AssetState.ABANDONED:
                job.asset_key = None  # a retry after a cancel or a changed source: rescan
        ident = self.identity(job)
        share = await self._share_plan(job, ident)
        if share is not None and not share.shares[share.mine]:
            log.info("checkpoint %s: share %d of %d holds no file (fewer files than nodes); "
                     "nothing to send here", p.get("checkpoint") or p["path"], share.mine,
                     share.nodes)
            return {"joined": True, "finalized_here": False, "share": share.mine,
                    "files_here": 0, "bytes_here": 0}
        if job.asset_key is None:
            try:
                comps = await self._scan(job, ident)
            except FileNotFoundError as e:
                raise SourceChanged(f"{e.filename} vanished while {p['path']} was scanned; "
                                    f"`chronicle-agent retry {job.job_id}` scans it again"
                                    ) from None
            except OSError as e:  # e.g. a link swapped for a directory under realpath(3)
                raise SourceChanged(f"{e.filename or p['path']} changed while {p['path']} was "
                                    f"scanned ({e.strerror}); `chronicle-agent retry "
                                    f"{job.job_id}` scans it again") from None
            if p.get("content_type") and len(comps) == 1:
                comps[0]["content_type"] = p["content_type"]
            register_key = p.get("register_key")
            if share is not None:  # this node's share only, registered as such
                mine = set(share.shares[share.mine])
                comps = [c for c in comps if c["name"] in mine]
                register_key = f"{register_key}/{shares.share_id(p['join'])}"
            rec = await self.q.do(
                self.q.s.create_asset, asset_type=p["asset_type"], uid=job.uid,
                run_id=job.run_id, visibility=p.get("visibility"), components=comps,
                job_id=job.job_id, register_key=register_key, cred_id=job.cred_id,
            )
            job.asset_key = rec.asset_key
        up = AssetUpload(self.e, await self._asset_for(job), progress, reader=ident,
                         join=p.get("join"))
        result = None
        if up.asset.state != AssetState.FINALIZED:
            try:
                try:
                    await up.ensure_registered()
                    await up.upload_all()
                    result = await self._finish(job, up, share, ident)
                except (ChronicleError, StorageRefused) as e:
                    if up.join is not None:
                        done = await joined.after_refusal(up, e)
                        if done is not None:
                            return done
                    await self._abandoned_remotely(job, up, e)
                    raise
            except SourceChanged as e:
                # Never finalize mixed bytes: give up this asset, and let a retry start over
                # from a fresh scan of what is on disk then.
                with anyio.CancelScope(shield=True):
                    await up.abandon(f"source changed during upload: {e.message}")
                raise SourceChanged(
                    f"{e.message}; the partial asset was abandoned, and `chronicle-agent retry "
                    f"{job.job_id}` uploads the files as they are then"
                ) from None
        return result

    async def _finish(self, job: Job, up: AssetUpload, share: SharePlan | None,
                      ident: Identity | None) -> dict[str, Any] | None:
        """Once this job's files are uploaded: finalize, or, for a part of a checkpoint
        several nodes write, what :mod:`agent.transfer.joined` does. The job's result."""
        if share is not None and await up.joined():
            return await joined.finish_shared(
                up, share, shares.Claims.of(job.payload["join"], ident),
                self.e.settings.runs.takeover_s, lambda i, gen: self._take_over(job, i, gen))
        if await up.joined():
            return await joined.finish(up, job.payload["path"])
        if up.own_part(await self.e.features()):
            await joined.put_own_part_marker(up)
        await up.finalize()
        return None

    async def _scan(self, job: Job, ident: Identity | None) -> list[dict[str, Any]]:
        return await run_as(ident, scan_path, job.payload["path"],
                            self.roots if ident is not None else [])

    async def _share_plan(self, job: Job, ident: Identity | None) -> SharePlan | None:
        """How the agents of several nodes split a checkpoint they all see whole (a shared
        filesystem; agent.transfer.shares); None where each holds its own files. The same
        answer after a restart: it depends only on the snapshot's names and sizes."""
        join = job.payload.get("join")
        if not join or int(join.get("nodes") or 1) < 2:
            return None
        try:
            comps = await self._scan(job, ident)
        except OSError:
            return None  # the upload's own scan says what is wrong
        plan = await run_as(ident, shares.plan, comps, int(join["nodes"]),
                            join.get("share", join.get("node_rank")), bool(join.get("shared")),
                            shares.opener(job.payload["path"]), bool(join.get("network_fs")))
        if plan is not None and "share" not in join:
            log.info("checkpoint %s: every node sees it whole; this node (%d of %d) sends "
                     "share %d: %d file(s), %d bytes of %d", job.payload.get("checkpoint"),
                     plan.mine, plan.nodes, plan.mine, len(plan.shares[plan.mine]),
                     plan.share_bytes(plan.mine), sum(plan.files.values()))
            claims = shares.Claims.of(join, ident)
            if claims is None:
                log.warning("checkpoint %s: its claims are not on the shared filesystem "
                            "(staging there is not possible): the share of a node whose "
                            "agent dies is not taken over", job.payload.get("checkpoint"))
            else:
                await claims.make(plan.mine, 0)  # ours (or, after a restart, already)
        return plan

    async def _take_over(self, job: Job, share: int, generation: int) -> None:
        """Queue the upload of another node's share of this job's checkpoint, from this
        agent's own snapshot (its claim at ``generation`` is ours)."""
        p = job.payload
        payload = {**p, "join": {**p["join"], "share": share, "generation": generation}}
        jid = f"{job.job_id}.s{share}g{generation}"
        if await self.q.do(self.q.s.get, jid) is None:
            await self.q.change(self.q.s.enqueue, JobKind.UPLOAD, job.uid, payload,
                                run_id=job.run_id, job_id=jid, cred_id=job.cred_id)

    async def _abandoned_remotely(self, job: Job, up: AssetUpload, err: Exception) -> None:
        """After a refusal that an abandoned asset explains (409 ``asset_not_pending``, the
        disk store's ``upload_closed``): if Chronicle abandoned the asset (its run ended, or
        it sat idle past the server's pending TTL, reason ``expired``), record that, so a
        retry scans and registers anew, and fail with that reason. Anything else: return."""
        code = getattr(err, "code", "")
        if up.asset.asset_id is None or code not in ("asset_not_pending", "upload_closed"):
            return
        try:
            asset = await self.e.chronicle.send(contract.get_asset(up.asset.asset_id),
                                                token=up.token)
        except ChronicleError:
            return
        if asset.state != "abandoned":
            return
        await self.q.do(self.q.s.set_asset, up.asset.asset_key,
                        state=AssetState.ABANDONED)
        reason = asset.abandoned_reason or "no reason given"
        raise ChronicleError(
            409, "asset_abandoned",
            f"Chronicle abandoned asset {asset.asset_id} before it was finalized (reason: "
            f"{reason}); `chronicle-agent retry {job.job_id}` uploads the files anew as a "
            "new asset") from err

    async def _inline(self, job: Job) -> dict[str, Any] | None:
        p = job.payload
        if job.asset_key is None:
            rec = await self.q.do(
                self.q.s.create_asset, asset_type=p["asset_type"], uid=job.uid,
                run_id=job.run_id, visibility=p.get("visibility"), components=[],
                register_key=f"inline:{job.job_id}", job_id=job.job_id, cred_id=job.cred_id,
            )
            job.asset_key = rec.asset_key
        asset = await self._asset_for(job)
        token = caller_token(asset.cred_id, asset.token, f"job {job.job_id}")
        await self.e.ensure_run(job.run_id, token)
        created = await self.e.chronicle.send(contract.create_inline(
            p["asset_type"], p["content"], content_type=p.get("content_type"),
            output_of=job.run_id, visibility=p.get("visibility"),
            idempotency_key=asset.register_key,
        ), token=token)
        await self.q.do(self.q.s.set_asset, asset.asset_key, asset_id=created.asset_id,
                        state=AssetState.FINALIZED)
        return None

    async def _component(self, job: Job, progress: Progress) -> dict[str, Any] | None:
        p = job.payload
        assert job.asset_key is not None
        asset = await self.q.do(self.q.s.asset, job.asset_key)
        assert asset is not None
        up = AssetUpload(self.e, asset, progress, reader=self.identity(job))
        comps = {c.name: c for c in await self.q.do(self.q.s.components, job.asset_key)}
        comp = comps[p["name"]]
        if comp.uploaded and comp.path == p["path"]:
            return None
        try:
            st = await up.stat_src(p["path"])
        except FileNotFoundError:
            raise SourceChanged(f"{p['path']} was deleted before it could be uploaded as "
                                f"component {comp.name!r}") from None
        declare = None
        if comp.size != st.size or comp.path != p["path"]:
            declare = {comp.name: st.size}
            await self.q.do(
                self.q.s.update_component, job.asset_key, comp.name, path=p["path"],
                size=st.size, mtime_ns=st.mtime_ns, ino=st.ino, dev=st.dev,
                content_type=p.get("content_type") or comp.content_type, uploaded=0,
                part_size=None, sha256=None,
            )
            await self.q.do(self.q.s.clear_parts, job.asset_key, comp.name)
            await self.q.do(self.q.s.set_progress, job.job_id, bytes_total=st.size)
        await up.refresh([comp.name], declare=declare)
        comp = next(c for c in await self.q.do(self.q.s.components, job.asset_key)
                    if c.name == comp.name)
        await up.upload_component(comp)
        return None

    async def _finalize(self, job: Job) -> dict[str, Any] | None:
        assert job.asset_key is not None
        siblings = await self.q.do(self.q.s.list_jobs, asset_key=job.asset_key,
                                   kind=str(JobKind.COMPONENT))
        latest = {j.payload.get("name"): j for j in siblings}  # in creation order
        bad = [j for j in latest.values() if j.state in (JobState.FAILED, JobState.CANCELLED)]
        if bad:
            raise AgentError(
                f"cannot finalize: component job {bad[0].job_id} ({bad[0].payload.get('name')})"
                f" is {bad[0].state}" + (f": {bad[0].error['message']}" if bad[0].error else ""),
                code="component_failed",
            )
        asset = await self.q.do(self.q.s.asset, job.asset_key)
        assert asset is not None
        up = AssetUpload(self.e, asset, Progress())
        if asset.state != AssetState.FINALIZED:
            await up.finalize()
        return None

    async def _download(self, job: Job, progress: Progress) -> dict[str, Any] | None:
        p = job.payload
        ident = self.identity(job)
        token = caller_token(job.cred_id, job.token, f"job {job.job_id}")
        try:
            if p.get("latest") and not p.get("asset_id"):
                p = await self._choose_latest(job, token)
            await run_as(ident, make_dest_parents, p["dest"], self.roots)
            res = await download_asset(
                self.e, job.job_id, p["asset_id"], p["dest"], bool(p.get("allow_invalid")),
                progress, token=token, cache=self.cache, ident=ident,
                include=p.get("include"), exclude=p.get("exclude"))
        except (ChronicleError, AgentError) as e:
            # A retryable error or a full disk keeps the partial files for the next attempt;
            # anything else, or the last attempt, ends this download: nothing is left behind.
            if (not isinstance(e, RetryableError | DiskFull)
                    or job.attempts >= self.job_max_attempts or self._stopping):
                await run_as(ident, discard_staging, p["dest"], job.job_id)
            raise
        if res.warnings:
            await self.q.do(self.q.s.set_progress, job.job_id, warnings=res.warnings)
        out = {"asset_id": p["asset_id"], "dest": p["dest"], "files": res.files,
               "cached": res.cached, "fetched": res.fetched,
               "fetched_bytes": res.fetched_bytes}
        if "selected" in p:
            out["selected"] = p["selected"]
        return out

    async def _choose_latest(self, job: Job, token: str | None) -> dict[str, Any]:
        """A ``latest`` download's asset, chosen once (agent.transfer.selection) and kept
        in the job's payload before a byte is fetched: a restart or a retry resumes the
        same asset, even once a newer one is ready."""
        p = job.payload
        listing = await self.e.chronicle.send(latest_call(p["run_id"], p["asset_type"]),
                                              token=token)
        asset = require_latest(listing.assets, p["run_id"], p["asset_type"],
                               bool(p.get("allow_invalid")))
        chosen = {"asset_id": asset.asset_id, "selected": selected_view(asset)}
        await self.q.do(self.q.s.update_payload, job.job_id, chosen)
        log.info("job %s: the latest ready %s of run %s is %s (created %s)", job.job_id,
                 p["asset_type"], p["run_id"], asset.asset_id, asset.created_at)
        job.payload = p | chosen
        return job.payload
