"""Group commits of the queue (agent.queue.aqueue.Batched): components that finish together
are recorded in one transaction, each caller returns once its own item is committed, and a
failed transaction reaches every caller whose item was in it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio

from agent.queue.aqueue import AsyncQueue, Batched


async def test_items_that_arrive_together_share_one_call(tmp_path: Path) -> None:
    q = await AsyncQueue.open(tmp_path / "q.db")
    calls: list[list[int]] = []
    committed: set[int] = set()
    returned_early: list[int] = []

    def write(items: list[int]) -> None:
        time.sleep(0.02)  # a transaction's fsync
        calls.append(list(items))
        committed.update(items)

    b: Batched[int] = Batched(q, write)

    async def add(i: int) -> None:
        await b.add(i)
        if i not in committed:
            returned_early.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(add, i)
    assert sorted(x for c in calls for x in c) == list(range(50))
    assert returned_early == []
    assert b.calls == len(calls) == 1, calls  # all fifty in one transaction
    await b.add(50)  # alone: a call of its own, as before
    assert calls[-1] == [50] and b.calls == 2
    await q.close()


async def test_a_failed_call_reaches_each_of_its_callers_and_the_next_goes_on(
    tmp_path: Path,
) -> None:
    q = await AsyncQueue.open(tmp_path / "q.db")
    fail = threading.Event()
    fail.set()
    done: list[list[int]] = []

    def write(items: list[int]) -> None:
        time.sleep(0.01)
        if fail.is_set():
            raise OSError("disk I/O error")
        done.append(items)

    b: Batched[int] = Batched(q, write)
    errors: list[int] = []

    async def add(i: int) -> None:
        try:
            await b.add(i)
        except OSError:
            errors.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(add, i)
    assert sorted(errors) == list(range(10))  # every caller of the failed batch hears of it
    fail.clear()
    await b.add(99)  # and the next one is written
    assert done == [[99]]
    await q.close()
