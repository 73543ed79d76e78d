"""Retry as data: which errors are worth another attempt, and how long to wait between them.

Backoff is truncated exponential with full jitter, as botocore's standard mode:
``delay(n) = uniform(0, 1) * min(base_s * 2 ** (n - 1), max_s)`` for the n-th retry.
The sleep function is a field so tests can replace it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from agent.errors import RetryableError, TransferError, map_transport_error
from agent.transfer.primitives import backoff_s

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RetryPolicy:
    max_attempts: int = 8
    base_s: float = 0.5
    max_s: float = 20.0
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay_s(self, retry_number: int) -> float:
        """Delay before the ``retry_number``-th retry (1-based)."""
        return backoff_s(retry_number, self.base_s, self.max_s, rng=self.rng)

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        what: str,
        on_retry: Callable[[TransferError], None] | None = None,
    ) -> T:
        """Call ``attempt`` until it succeeds, raises a non-retryable error, or attempts run
        out (then the last retryable error is raised)."""
        n = 0
        while True:
            n += 1
            try:
                return await attempt()
            except Exception as exc:  # noqa: BLE001 - classified below
                err = map_transport_error(exc, what)
                if err is None:
                    raise
                if not isinstance(err, RetryableError) or n >= self.max_attempts:
                    if err is exc:
                        raise
                    raise err from exc
                if on_retry is not None:
                    on_retry(err)
                delay = self.delay_s(n)
                log.info(
                    "%s: %s; retry %d/%d in %.2fs",
                    what,
                    err.message,
                    n,
                    self.max_attempts - 1,
                    delay,
                )
                await self.sleep(delay)
