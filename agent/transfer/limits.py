"""The one global limit on transfers in flight and the one bandwidth limiter in front of
every job, part and download."""

from __future__ import annotations

import time

import anyio


class TokenBucket:
    """Bytes per second with a burst of one second's worth; rate 0 = unlimited."""

    def __init__(self, rate_bytes_per_s: int) -> None:
        self.rate = rate_bytes_per_s
        self._tokens = float(rate_bytes_per_s)
        self._stamp = time.monotonic()
        self._lock = anyio.Lock()

    def set_rate(self, rate_bytes_per_s: int) -> None:
        """A new rate from now on (the daemon holding back, or letting go)."""
        self.rate = rate_bytes_per_s
        self._tokens = min(self._tokens, float(rate_bytes_per_s))

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            rate = self.rate  # read again: set_rate may have lifted the limit meanwhile
            if rate <= 0:
                return
            now = time.monotonic()
            self._tokens = min(float(rate), self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await anyio.sleep(-self._tokens / rate)


class Limits:
    def __init__(self, concurrency: int, bandwidth_bytes_per_s: int = 0) -> None:
        self.slots = anyio.CapacityLimiter(concurrency)
        self.bucket = TokenBucket(bandwidth_bytes_per_s)

    async def throttle(self, n: int) -> None:
        await self.bucket.take(n)
