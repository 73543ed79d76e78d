"""The daemon's carrier for the Chronicle contract: aiohttp, with retries.

Only calls that are safe to repeat are retried: reads, mutating calls that carry an
``Idempotency-Key`` (the server replays the first result), and those that change nothing
when repeated (``Call.repeatable``). Chronicle's own 5xx and
connection errors are retryable; its 4xx answers become :class:`ChronicleError`.
"""

from __future__ import annotations

from typing import TypeVar

import aiohttp

from agent.chronicle.contract import Call
from agent.transfer.retry import RetryPolicy

T = TypeVar("T")


class AsyncChronicle:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str | None,
        retry: RetryPolicy | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.retry = retry or RetryPolicy()
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def __repr__(self) -> str:
        return f"AsyncChronicle({self.base_url!r})"

    async def send(self, call: Call[T], *, token: str | None = None) -> T:
        """Send one call; ``token`` overrides the daemon's own (a caller's credentials)."""
        if call.mutating and call.idempotency_key is None and not call.repeatable:
            return await self._once(call, token)
        return await self.retry.run(lambda: self._once(call, token), f"{call.method} {call.path}")

    async def _once(self, call: Call[T], token: str | None) -> T:
        headers, data = call.request(token or self._token)
        async with self.session.request(
            call.method, self.base_url + call.target(), data=data, headers=headers,
            timeout=self.timeout,
        ) as resp:
            return call.answer(resp.status, await resp.read())
