"""Concurrent transfers run in task groups; a job ends by one error, not a group of them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from agent.errors import AgentError, RetryableError


def primary_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error that decides how a job ends, out of what its concurrent transfers
    raised: a final error (a refusal, a changed file) wins over a retryable one, which wins
    over cancellation."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)

    def rank(e: BaseException) -> int:
        if isinstance(e, AgentError) and not isinstance(e, RetryableError):
            return 0
        if isinstance(e, RetryableError):
            return 1
        if isinstance(e, Exception):
            return 2
        return 3  # cancellation and other BaseExceptions

    return min(leaves, key=rank)


@contextmanager
def one_error() -> Iterator[None]:
    """Around a task group: re-raise the error that decides, not the group."""
    try:
        yield
    except BaseExceptionGroup as group:
        raise primary_error(group) from None
