"""The standard-library carrier for the Chronicle contract, for ``Chronicle()`` and the CLI."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import TypeVar

from agent.chronicle.contract import Call
from agent.errors import RetryableError
from agent.transfer.primitives import backoff_s

T = TypeVar("T")


class SyncChronicle:
    def __init__(
        self, base_url: str, token: str | None, timeout_s: float = 60.0, attempts: int = 4
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self.attempts = attempts

    def __repr__(self) -> str:
        return f"SyncChronicle({self.base_url!r})"

    def send(self, call: Call[T]) -> T:
        retry_ok = not call.mutating or call.idempotency_key is not None or call.repeatable
        n = 0
        while True:
            n += 1
            try:
                return self._once(call)
            except RetryableError:
                if not retry_ok or n >= self.attempts:
                    raise
                time.sleep(backoff_s(n, 0.5, 4.0))

    def _once(self, call: Call[T]) -> T:
        headers, data = call.request(self._token)
        req = urllib.request.Request(
            self.base_url + call.target(), data=data, headers=headers, method=call.method
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RetryableError(
                f"cannot reach Chronicle at {self.base_url}: {reason}", code="chronicle_unreachable"
            ) from None
        return call.answer(status, raw)
