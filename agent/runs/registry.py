"""Runs known to the daemon: registered over the socket, ended by ``finish``.

A run's end is reported to Chronicle only after its jobs are terminal, since ending a run
on Chronicle abandons whatever of its assets is still pending.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from agent.chronicle import contract
from agent.errors import AgentError, UsageError
from agent.queue.store import TERMINAL

if TYPE_CHECKING:
    from agent.daemon import Daemon

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    run_id: str
    uid: int
    pid: int | None
    state: str = "running"
    status: str | None = None
    last_seen: float = field(default_factory=time.time)

    def to_api(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "pid": self.pid, "state": self.state,
                "status": self.status}


class RunRegistry:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.runs: dict[str, RunInfo] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    def bind(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg

    async def register(self, run_id: str | None, pid: int | None, uid: int,
                       name: str | None = None) -> dict[str, Any]:
        run_id = run_id or f"run_{secrets.token_hex(8)}"
        existing = self.runs.get(run_id)
        if existing is not None:
            return existing.to_api()
        await self.d.engine.ensure_run(run_id)
        info = self.runs[run_id] = RunInfo(run_id, uid, pid)
        log.info("run %s registered (pid %s, uid %d)", run_id, pid, uid)
        return info.to_api()

    def _get(self, run_id: str) -> RunInfo:
        info = self.runs.get(run_id)
        if info is None:
            raise UsageError(f"run {run_id} is not registered with this daemon",
                             code="not_found")
        return info

    async def heartbeat(self, run_id: str) -> dict[str, Any]:
        info = self._get(run_id)
        info.last_seen = time.time()
        return info.to_api()

    async def finish(self, run_id: str, status: str) -> dict[str, Any]:
        info = self._get(run_id)
        if info.state == "running":
            info.state, info.status = "ending", status
            assert self._tg is not None
            self._tg.start_soon(self._end_when_drained, info)
        return info.to_api()

    async def _end_when_drained(self, info: RunInfo) -> None:
        q = self.d.queue
        while True:
            jobs = await q.do(q.s.list_jobs, run_id=info.run_id)
            if all(j.state in TERMINAL for j in jobs):
                break
            await q.changed.wait(1.0)
        try:
            await self.d.engine.chronicle.send(contract.end_run(
                info.run_id, info.status or "finished",
                idempotency_key=f"run-end:{info.run_id}"))
            info.state = "ended"
            log.info("run %s ended on Chronicle: %s", info.run_id, info.status)
        except AgentError as e:
            log.warning("run %s: could not end it on Chronicle: %s", info.run_id, e)
