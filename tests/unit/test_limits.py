"""The bandwidth limiter shared by every transfer: a limit lifted (rate 0, as when the daemon
stops holding back for training) while transfers wait for it lets them all go, never a
division by zero that fails a job (seen in a download benchmark under load)."""

from __future__ import annotations

import time

import anyio

from agent.transfer.limits import TokenBucket

MiB = 1 << 20


async def test_a_limit_lifted_while_transfers_wait_lets_them_go() -> None:
    bucket = TokenBucket(MiB)
    await bucket.take(MiB)  # the one-second burst spent
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(3):  # one sleeps about a second under the lock, two wait for it
            tg.start_soon(bucket.take, MiB)
        await anyio.sleep(0.2)
        bucket.set_rate(0)
    assert time.monotonic() - started < 3  # the two waiting did not sleep their share


async def test_a_lower_rate_set_while_waiting_is_kept() -> None:
    bucket = TokenBucket(64 * MiB)
    bucket.set_rate(4 * MiB)
    await bucket.take(4 * MiB)
    started = time.monotonic()
    await bucket.take(2 * MiB)
    assert time.monotonic() - started > 0.3  # about half a second at 4 MiB/s
