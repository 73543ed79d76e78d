"""One checkpoint written by several nodes: each node's agent joins the run's one asset of
that checkpoint (API 1.1 ``asset_keys``) with the files it holds; the node holding the
checkpoint's index finalizes it once every file the index names is uploaded
(``docs/multinode.md``).

A job's ``join`` (from the watcher): ``{"key": <the checkpoint's name>, "nodes": N,
"node_rank": R | None}``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from agent.chronicle import contract
from agent.chronicle import models as m
from agent.errors import AgentError, ChronicleError
from agent.queue import runstore
from agent.queue.states import RunState
from agent.transfer.http import create_only
from agent.transfer.primitives import classify_storage_answer
from agent.transfer.shares import Claims, SharePlan, Watch
from agent.transfer.upload import NODES_DIR, marker_decl, node_marker, own_part_marker
from agent.watch.indexes import Whole, whole_by_index

if TYPE_CHECKING:
    from agent.transfer.upload import AssetUpload

log = logging.getLogger(__name__)

POLL_S = (1.0, 5.0)
"""How often the finalizing node asks what is uploaded: from the first to the second,
doubling."""
REPORT_S = 60.0
"""How often a wait for the other nodes is logged."""


def missing(expected: frozenset[str], asset: m.Asset, uploads: m.Uploads) -> list[str]:
    """The files of ``expected`` that are not yet in the asset whole: not declared by any
    node, or declared and not all uploaded (a multipart one: until its parts cover its
    declared size)."""
    sizes = {c.name: c.size for c in asset.components}
    out = []
    for name in sorted(expected):
        held = uploads.components.get(name)
        if name not in sizes or held is None:
            out.append(name)
        elif not held.uploaded:
            size = sizes[name]
            numbers = sorted(p.part_number for p in held.parts)
            total = sum(p.size or 0 for p in held.parts)
            if not (numbers and numbers == list(range(1, len(numbers) + 1))
                    and size is not None and total == size):
                out.append(name)
    return out


def read_index(open_fd: Callable[[str], int], directory: str, names: list[str]) -> Whole | None:
    """What the checkpoint holds when whole, by the index among this node's files (in a
    worker thread; ``open_fd`` opens as the checkpoint's owner)."""

    return whole_by_index(names, lambda name: os.fdopen(open_fd(os.path.join(directory, name)),
                                                        "rb"))


async def finish(up: AssetUpload, directory: str) -> dict[str, Any]:
    """After this node's files are uploaded: say so (its marker), then finalize if this
    node is the one: the node holding the checkpoint's index, once every file it names and
    every node's marker are uploaded; with no index anywhere, node 0 once every node's
    marker is. The job's result."""
    assert up.join is not None
    comps = await up.q.do(up.q.s.components, up.asset.asset_key)
    names = [c.name for c in comps]
    whole = await anyio.to_thread.run_sync(read_index, up.open_src, directory, names)
    await add_marker(up, node_marker(up.join, whole is not None))
    nodes = int(up.join.get("nodes") or 1)
    result = {"asset_id": up.asset_id, "joined": True, "finalized_here": False,
              "files_here": len(names)}
    if whole is not None:
        log.info("asset %s: this node holds its index (%s, %d file(s)); finalizing once "
                 "every node's files are uploaded", up.asset_id, whole.index, len(whole.files))
        await wait_whole(up, whole.files, nodes)
    elif up.join.get("node_rank") == 0:
        log.info("asset %s: node 0 finalizes it once all %d nodes have uploaded their files "
                 "(unless one of them holds an index)", up.asset_id, nodes)
        markers = await wait_whole(up, frozenset(), nodes)
        holder = next((m for m in markers if m.endswith(".index")), None)
        if holder is not None:
            # node 0 ends the run on Chronicle, which abandons what is pending: not before
            # the node holding the index has finalized it
            log.info("asset %s: %s holds its index and finalizes it; waiting for that",
                     up.asset_id, holder)
            await wait_ready(up)
            return result
    else:
        log.info("asset %s: this node's %d file(s) are uploaded; another node finalizes it",
                 up.asset_id, len(names))
        return result
    await up.finalize()
    return result | {"finalized_here": True}


async def finish_shared(up: AssetUpload, plan: SharePlan, claims: Claims | None,
                        takeover_s: float,
                        take: Callable[[int, int], Awaitable[None]]) -> dict[str, Any]:
    """After this agent's share of a checkpoint every node sees whole (a shared
    filesystem: :mod:`agent.transfer.shares`) is uploaded: say so (the share's marker);
    then, unless this job uploads a share taken over from another agent (the job that took
    it waits), wait until every file and every share's marker are uploaded, taking over
    the shares of agents that fell silent, and finalize on node 0 (or, once the asset has
    been whole for ``takeover_s`` with no finalize, on any node). The job's result."""
    assert up.join is not None
    mine = int(up.join.get("share", plan.mine))
    await add_marker(up, f"{NODES_DIR}/{mine}")
    result: dict[str, Any] = {
        "asset_id": up.asset_id, "joined": True, "finalized_here": False, "share": mine,
        "files_here": len(plan.shares[mine]), "bytes_here": plan.share_bytes(mine)}
    if "share" in up.join:
        log.info("asset %s: share %d (taken over) uploaded", up.asset_id, mine)
        return result
    expected = frozenset(plan.files) | {f"{NODES_DIR}/{i}" for i, names in
                                        enumerate(plan.shares) if names}
    watch, took = Watch(takeover_s), list[int]()
    delay, reported, give_up = POLL_S[0], time.monotonic(), None
    whole_since: float | None = None
    while True:
        asset = await up.e.chronicle.send(contract.get_asset(up.asset_id), token=up.token)
        if asset.state == "ready":
            return result | {"taken_over": took}
        if asset.state != "pending":
            raise ChronicleError(409, "asset_not_pending",
                                 f"asset {up.asset_id} was abandoned before every share was "
                                 f"uploaded ({asset.abandoned_reason or 'no reason'})")
        uploads = await up.e.chronicle.send(contract.list_uploads(up.asset_id), token=up.token)
        left = missing(expected | {c.name for c in asset.components}, asset, uploads)
        now = time.monotonic()
        if not left:
            whole_since = now if whole_since is None else whole_since
            if mine == 0 or 0 in took or now - whole_since >= takeover_s:
                if mine != 0 and 0 not in took:
                    log.warning("asset %s: whole for %.0f s and node 0 has not finalized it; "
                                "finalizing it here", up.asset_id, now - whole_since)
                await up.finalize()
                return result | {"finalized_here": True, "taken_over": took}
        elif claims is not None:
            for i, names in enumerate(plan.shares):
                if i == mine or not names or i in took or f"{NODES_DIR}/{i}" not in left:
                    continue
                claim, alive = await claims.look(i)
                if not watch.stale(i, (claim, alive), now):
                    continue
                watch.forget(i)
                gen = 0 if claim is None else claim.generation + 1
                if claim is not None and claim.agent == claims.agent:
                    gen = claim.generation  # ours already: a restart after taking it
                elif not await claims.make(i, gen):
                    continue  # another agent took it first
                log.warning("asset %s: share %d (%d file(s)) %s for %.0f s; this agent "
                            "takes it over", up.asset_id, i, len(names),
                            "never claimed" if claim is None else
                            f"claimed by agent {claim.agent}, silent", takeover_s)
                await take(i, gen)
                took.append(i)
        give_up = await _give_up_at(up, give_up, left or ["its finalize"])
        if now - reported >= REPORT_S:
            reported = now
            log.info("asset %s: waiting for %d file(s) of the other shares (%s%s)",
                     up.asset_id, len(left), ", ".join(left[:5]), " …" if len(left) > 5 else "")
        await anyio.sleep(delay)
        delay = min(delay * 2, POLL_S[1])


async def add_marker(up: AssetUpload, name: str) -> None:
    """Declare and PUT this node's empty marker (declaring it again is harmless)."""
    urls = await up.e.chronicle.send(contract.add_components(up.asset_id, [marker_decl(name)]),
                                     token=up.token)
    await _put_empty(up, name, urls.upload_urls.get(name), urls.upload_headers.get(name, {}))


async def put_own_part_marker(up: AssetUpload) -> None:
    """On a Chronicle without ``asset_keys``: PUT the marker that names this node in its
    own part's asset (declared at register; its URL asked for again after a restart)."""
    assert up.join is not None
    name = own_part_marker(up.join)
    if up.plans.get(name) is None or up.plans[name].url is None:
        await up.refresh([name])
    plan = up.plans[name]
    await _put_empty(up, name, plan.url, plan.headers or {})


async def _put_empty(up: AssetUpload, name: str, url: str | None,
                     bound: dict[str, str]) -> None:
    if url is None:  # a multipart plan for an empty object: not something a server makes
        raise ChronicleError(502, "bad_plan", f"no single upload URL for {name}")
    headers = {"Content-Length": "0", **bound}
    async with up.e.session.put(url, data=b"", headers=headers,
                                skip_auto_headers=("Content-Type",)) as resp:
        body = await resp.read()
        if resp.status == 412 and create_only(bound):  # there already: a repeat
            return
        if resp.status >= 300:
            raise classify_storage_answer(resp.status, body, f"PUT {name} of {up.asset_id}")


async def after_refusal(up: AssetUpload, err: Exception) -> dict[str, Any] | None:
    """A joined asset refused this node's call because it is no longer pending: if another
    node finalized it with this node's files in it (they were uploaded before a restart
    lost their record), the job is done: its result. If it was finalized without them
    (this node's part came late), a clear failure. None: for the caller to handle (an
    abandoned asset, another refusal)."""
    if up.asset.asset_id is None or getattr(err, "code", "") != "asset_not_pending":
        return None
    asset = await up.e.chronicle.send(contract.get_asset(up.asset_id), token=up.token)
    if asset.state != "ready":
        return None
    comps = await up.q.do(up.q.s.components, up.asset.asset_key)
    names = {c.name for c in comps}
    held = {c.name for c in asset.components}
    if names <= held:
        log.info("asset %s: finalized by the node holding its index, with this node's %d "
                 "file(s) in it", up.asset_id, len(names))
        return {"asset_id": up.asset_id, "joined": True, "finalized_here": False,
                "files_here": len(names)}
    late = sorted(names - held)
    raise ChronicleError(409, "joined_too_late",
                         f"asset {up.asset_id} (checkpoint {up.join and up.join.get('key')}) "
                         f"was finalized before this node's part joined it: {len(late)} "
                         f"file(s) of this node are not in it ({', '.join(late[:5])}"
                         f"{' …' if len(late) > 5 else ''})") from err


async def wait_whole(up: AssetUpload, expected: frozenset[str], nodes: int) -> list[str]:
    """Until every file of ``expected``, ``nodes`` nodes' markers and everything declared
    are uploaded to the asset (by whichever node); the markers. An asset abandoned
    meanwhile (its run ended, or a node's agent gave it up) ends the wait with Chronicle's
    refusal."""
    delay, reported = POLL_S[0], time.monotonic()
    give_up: float | None = None
    """Once the run stopped running here: when to stop waiting for the other nodes."""
    while True:
        asset = await up.e.chronicle.send(contract.get_asset(up.asset_id), token=up.token)
        if asset.state == "ready":  # finalized: by this node before a restart, or by the
            return [c.name for c in asset.components  # index holder (node 0 waiting)
                    if c.name.startswith(NODES_DIR + "/")]
        if asset.state != "pending":
            raise ChronicleError(409, "asset_not_pending",
                                 f"asset {up.asset_id} was abandoned before every node's "
                                 f"files were uploaded ({asset.abandoned_reason or 'no reason'})")
        uploads = await up.e.chronicle.send(contract.list_uploads(up.asset_id), token=up.token)
        declared = frozenset(c.name for c in asset.components)
        left = missing(expected | declared, asset, uploads)
        markers = sorted(n for n in declared if n.startswith(NODES_DIR + "/")
                         and n not in left)
        if not left and len(markers) >= nodes:
            return markers
        if not left:
            left = [f"{nodes - len(markers)} more node(s)"]
        give_up = await _give_up_at(up, give_up, left)
        if time.monotonic() - reported >= REPORT_S:
            reported = time.monotonic()
            log.info("asset %s: waiting for %d file(s) from the other nodes (%s%s)",
                     up.asset_id, len(left), ", ".join(left[:5]), " …" if len(left) > 5 else "")
        await anyio.sleep(delay)
        delay = min(delay * 2, POLL_S[1])


async def wait_ready(up: AssetUpload) -> None:
    """Until another node has finalized the asset (bounded like :func:`wait_whole` once
    this node's run has ended)."""
    delay, give_up = POLL_S[0], None
    while True:
        asset = await up.e.chronicle.send(contract.get_asset(up.asset_id), token=up.token)
        if asset.state == "ready":
            return
        if asset.state != "pending":
            raise ChronicleError(409, "asset_not_pending",
                                 f"asset {up.asset_id} was abandoned before the node holding "
                                 f"its index finalized it ({asset.abandoned_reason or '?'})")
        give_up = await _give_up_at(up, give_up, ["its finalize"])
        await anyio.sleep(delay)
        delay = min(delay * 2, POLL_S[1])


async def _give_up_at(up: AssetUpload, give_up: float | None, left: list[str]) -> float | None:
    """When the wait ends, once this node's run has ended (``runs.join_wait_s`` later);
    past it, the asset is abandoned and :class:`~agent.errors.AgentError` ``nodes_missing``
    raised: a checkpoint is never finalized partial."""
    run_id = up.asset.run_id
    state = await up.q.do(runstore.run_state, up.q.s, run_id) if run_id else None
    if state is None or state == RunState.RUNNING:
        return None
    now = time.monotonic()
    if give_up is None:
        wait_s = up.e.settings.runs.join_wait_s
        log.info("asset %s: run %s ended here; waiting up to %.0f s more for %d file(s) from "
                 "the other nodes (runs.join_wait_s)", up.asset_id, run_id, wait_s, len(left))
        return now + wait_s
    if now < give_up:
        return give_up
    shown = ", ".join(left[:5]) + (" …" if len(left) > 5 else "")
    why = (f"what the checkpoint needs never arrived from the other nodes ({shown}) within "
           f"runs.join_wait_s after run {run_id} ended here")
    await up.abandon(why)
    raise AgentError(f"asset {up.asset_id} abandoned, never finalized partial: {why}",
                     code="nodes_missing")
