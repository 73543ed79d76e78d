"""The queue from the event loop: every SQLite call runs in a worker thread (one at a time,
so the connection is never shared across threads at once), and waiters are woken when a
job changes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Generic, ParamSpec, TypeVar

import anyio
import anyio.to_thread

from agent.queue.store import Queue

P = ParamSpec("P")
T = TypeVar("T")
X = TypeVar("X")


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


class _Batch(Generic[X]):
    def __init__(self) -> None:
        self.items: list[X] = []
        self.done = anyio.Event()
        self.error: Exception | None = None


class Batched(Generic[X]):
    """Calls of one Queue method that takes a list, gathered (a group commit): a caller's
    item goes into the next call, together with every item that arrived while the previous
    call ran, and the caller returns once that call has committed it. Under load many
    components share one transaction and one thread hop; alone, a call is as before."""

    def __init__(self, queue: AsyncQueue, fn: Callable[[list[X]], None]) -> None:
        self.q, self.fn = queue, fn
        self._open: _Batch[X] = _Batch()
        self._lock = anyio.Lock()
        self.calls = 0
        """Calls made (for tests and tuning: items per call = items / calls)."""

    async def add(self, *items: X) -> None:
        batch = self._open
        batch.items.extend(items)
        async with self._lock:  # FIFO: whoever finds its batch not yet written writes it
            if not batch.done.is_set():
                self._open = _Batch()
                self.calls += 1
                try:
                    await self.q.do(self.fn, batch.items)
                except Exception as e:
                    batch.error = e
                finally:
                    batch.done.set()
        if batch.error is not None:
            raise batch.error
