"""Unit tests start no process of their own: a daemon, a server, a store or a fault proxy
belongs in tests/e2e (marked slow there). This guard makes the rule hold."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

_SERVICES = ("agent daemon", "agent server", "weed", "faultproxy")


@pytest.fixture(autouse=True)
def no_service_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen[Any], args: Any, *a: Any, **kw: Any) -> None:
        line = " ".join(map(str, args)) if isinstance(args, list | tuple) else str(args)
        if any(s in line for s in _SERVICES):
            raise AssertionError(f"a unit test started {line[:120]!r}: move it to tests/e2e")
        real(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield
