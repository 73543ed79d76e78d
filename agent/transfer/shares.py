"""One checkpoint on a filesystem several nodes share, uploaded by all their agents at once
(``docs/multinode.md``).

When every node's agent of a run sees the same whole checkpoint (the rule says ``shared``,
or the checkpoint is on a network filesystem and its index names only files that are here),
each takes a share of
its files instead of one agent sending everything: the files are split into ``nodes``
shares balanced by bytes, the same split on every node (it depends only on the names and
sizes, identical on a shared filesystem). Share R is node R's. Each agent joins the run's
one asset of the checkpoint with its share's components only, uploads them and adds its
node's marker; node 0 finalizes once every file and every share's marker are uploaded.

Claims, on the shared filesystem, beside the whole-checkpoint claims of one node
(:mod:`agent.watch.staging`): share ``i`` of a checkpoint is claimed by a file
``<claims>/<name>.s<i>.g<generation>``, made exclusively (``O_EXCL``, which NFS and Lustre
honour), holding its agent's id. Every agent touches ``<claims>/agents/<its id>`` every
:data:`HEARTBEAT_S` while it runs. An agent done with its own share watches the others: a
share whose marker is not uploaded and whose claim's agent has not touched its file for
``runs.takeover_s`` (measured by the watcher's own clock: nodes' clocks may differ), or that
no agent claimed within that time, is taken over: generation + 1, made exclusively (one
taker), and its files uploaded from the taker's own snapshot into the same asset. A taker
that dies is taken over the same way. Two agents uploading one share (a slow agent that
comes back) send the same bytes under the same names: harmless.

The file operations run in worker threads, with the rights of the checkpoint's user
(agent.fsid), like every other touch of a watched tree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import anyio

from agent.fsid import Identity, run_as
from agent.watch.indexes import UnreadableIndex, whole_by_index

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
"""How often a running agent touches its file under ``<claims>/agents/``."""
AGENTS_DIR = "agents"


@dataclass(frozen=True)
class SharePlan:
    """How the agents of ``nodes`` nodes split one checkpoint they all see whole."""

    files: dict[str, int]
    """Every file of the checkpoint, by name: its size."""
    shares: list[list[str]]
    mine: int
    """This node's share (its rank)."""

    @property
    def nodes(self) -> int:
        return len(self.shares)

    def share_bytes(self, i: int) -> int:
        return sum(self.files[n] for n in self.shares[i])


def split(files: dict[str, int], n: int) -> list[list[str]]:
    """The files in ``n`` shares balanced by bytes: the largest first, each to the share
    holding the fewest bytes so far (the lowest index on a tie). The same on every node."""
    loads = [0] * n
    shares: list[list[str]] = [[] for _ in range(n)]
    for name, size in sorted(files.items(), key=lambda f: (-f[1], f[0])):
        i = min(range(n), key=lambda k: (loads[k], k))
        shares[i].append(name)
        loads[i] += size
    return [sorted(s) for s in shares]


def plan(comps: Iterable[dict[str, Any]], nodes: int, rank: int | None, shared: bool,
         open_file: Any, network_fs: bool = False) -> SharePlan | None:
    """The split of a checkpoint every node sees whole, among ``nodes`` agents; None when
    each node holds only its own files (node-local directories). Whole: the rule says
    ``shared``, or the checkpoint is on a network filesystem (``network_fs``) and its index
    names only files that are here (in a worker thread, as the checkpoint's owner:
    ``open_file(name)`` opens one of its files). Never guessed on a local filesystem: there,
    a node holding every file is the only node that wrote any (rank 0 saving a whole
    model), and it sends them all."""
    files = {str(c["name"]): int(c["size"] or 0) for c in comps}
    if nodes < 2 or rank is None or not 0 <= rank < nodes:
        return None
    if not shared:
        if not network_fs:
            return None
        try:
            whole = whole_by_index(files, open_file)
        except (UnreadableIndex, OSError) as e:
            log.info("the checkpoint's index cannot be read (%s): its files are taken as "
                     "this node's own", e)
            return None
        if whole is None or not whole.files <= set(files):
            return None
    return SharePlan(files, split(files, nodes), rank)


def opener(directory: str) -> Any:
    def open_file(name: str) -> BinaryIO:
        return open(os.path.join(directory, name), "rb")  # noqa: SIM115 (closed by caller)
    return open_file


# ---- claims (worker threads, as the checkpoint's user) ----------------------------------


def claim_name(register_key: str) -> str:
    """A checkpoint's name among the claims: the same on every node (the registration key
    holds the run, the path and a hash of the files' names, sizes and mtimes)."""
    return hashlib.sha256(register_key.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Claim:
    generation: int
    agent: str


def _claim_re(name: str, share: int) -> re.Pattern[str]:
    return re.compile(re.escape(f"{name}.s{share}.g") + r"(\d{1,9})")


def newest(claims: str, name: str, share: int) -> Claim | None:
    """Share ``share``'s newest claim (None: nobody claimed it)."""
    pat = _claim_re(name, share)
    try:
        entries = os.listdir(claims)
    except FileNotFoundError:
        return None
    gens = sorted((int(m.group(1)) for e in entries if (m := pat.fullmatch(e))), reverse=True)
    for g in gens:
        try:
            with open(os.path.join(claims, f"{name}.s{share}.g{g}"), "rb") as f:
                agent = json.loads(f.read(4096) or b"{}").get("agent")
        except (OSError, ValueError):
            agent = None  # being written right now
        return Claim(g, str(agent or ""))
    return None


def make_claim(claims: str, name: str, share: int, generation: int, agent: str) -> bool:
    """Claim share ``share`` at ``generation``, exclusively: False if another agent made
    that generation first."""
    os.makedirs(claims, mode=0o755, exist_ok=True)
    p = os.path.join(claims, f"{name}.s{share}.g{generation}")
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o644)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o644)  # readable by the other agents, whatever the umask
        os.write(fd, json.dumps({"agent": agent, "share": share, "generation": generation,
                                 "host": socket.gethostname(), "at": time.time()}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def alive_mark(claims: str, agent: str) -> int | None:
    """The mtime (ns) of ``agent``'s heartbeat file; None if it has none."""
    try:
        return os.stat(os.path.join(claims, AGENTS_DIR, agent)).st_mtime_ns
    except FileNotFoundError:
        return None


def heartbeat(claims: str, agent: str) -> None:
    """Touch this agent's heartbeat file (set to the file server's time)."""
    d = os.path.join(claims, AGENTS_DIR)
    os.makedirs(d, mode=0o755, exist_ok=True)
    p = os.path.join(d, agent)
    try:
        os.utime(p)
    except FileNotFoundError:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        os.fchmod(fd, 0o644)
        os.close(fd)


def look(claims: str, name: str, share: int) -> tuple[Claim | None, int | None]:
    """Share ``share``'s newest claim and its agent's heartbeat mark."""
    c = newest(claims, name, share)
    return c, (alive_mark(claims, c.agent) if c is not None and c.agent else None)


class Watch:
    """Which of the other shares are stale: their state (claim, heartbeat) unchanged for
    ``takeover_s`` by this agent's own clock."""

    def __init__(self, takeover_s: float) -> None:
        self.takeover_s = takeover_s
        self._seen: dict[int, tuple[Any, float]] = {}

    def stale(self, share: int, state: Any, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        seen = self._seen.get(share)
        if seen is None or seen[0] != state:
            self._seen[share] = (state, now)
            return False
        return now - seen[1] >= self.takeover_s

    def forget(self, share: int) -> None:
        self._seen.pop(share, None)


def share_id(join: dict[str, Any]) -> str:
    """How a share's registration is told apart (its key's suffix): ``share-<i>``, and a
    taken-over share's claim generation."""
    gen = join.get("generation")
    return f"share-{join.get('share', join.get('node_rank'))}" + (
        f"-g{gen}" if gen is not None else "")


@dataclass(frozen=True)
class Claims:
    """One checkpoint's share claims, as a job sees them (its payload's ``join``)."""

    dir: str
    name: str
    agent: str
    ident: Identity | None

    @classmethod
    def of(cls, join: dict[str, Any] | None, ident: Identity | None) -> Claims | None:
        if not join or not join.get("claims") or not join.get("agent"):
            return None
        return cls(str(join["claims"]), str(join["claim"]), str(join["agent"]), ident)

    async def make(self, share: int, generation: int) -> bool:
        return bool(await run_as(self.ident, make_claim, self.dir, self.name, share,
                                 generation, self.agent))

    async def look(self, share: int) -> tuple[Claim | None, int | None]:
        return await run_as(self.ident, look, self.dir, self.name, share)

    async def beat(self) -> None:
        await run_as(self.ident, heartbeat, self.dir, self.agent)


@asynccontextmanager
async def beating(claims: Claims | None) -> AsyncIterator[None]:
    """While the block runs, say every :data:`HEARTBEAT_S` that this agent is alive."""
    if claims is None:
        yield
        return

    async def loop() -> None:
        while True:
            try:
                await claims.beat()
            except OSError as e:
                log.warning("cannot say this agent is alive in %s (%s): other nodes' agents "
                            "may take over its shares", claims.dir, e)
            await anyio.sleep(HEARTBEAT_S)

    async with anyio.create_task_group() as tg:
        tg.start_soon(loop)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
