"""The queue from the event loop: every SQLite call runs in a worker thread (one at a time,
so the connection is never shared across threads at once), and waiters are woken when a
job changes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import ParamSpec, TypeVar

import anyio
import anyio.to_thread

from agent.queue.store import Queue

P = ParamSpec("P")
T = TypeVar("T")


class Notifier:
    """A broadcast "something changed": waiters wake on the next notify()."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self, timeout_s: float) -> None:
        with anyio.move_on_after(timeout_s):
            await self._event.wait()


class AsyncQueue:
    def __init__(self, queue: Queue) -> None:
        self.s = queue
        self._limiter = anyio.CapacityLimiter(1)
        self.changed = Notifier()

    @classmethod
    async def open(cls, path: Path) -> AsyncQueue:
        q = await anyio.to_thread.run_sync(Queue, path)
        return cls(q)

    async def do(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a Queue method in the queue's thread."""
        result: T = await anyio.to_thread.run_sync(
            partial(fn, *args, **kwargs), limiter=self._limiter
        )
        return result

    async def change(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a Queue method that changes a job, then wake the waiters."""
        try:
            return await self.do(fn, *args, **kwargs)
        finally:
            self.changed.notify()

    async def close(self) -> None:
        await self.do(self.s.close)
