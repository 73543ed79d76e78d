"""chronicle-agent: the upload/download sidecar for Chronicle assets.

``from agent import Run, Chronicle``. Names are resolved lazily so that ``import agent`` in a
training process costs next to nothing and pulls in no aiohttp, pydantic or event loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.chronicle.sdk import Chronicle  # type: ignore[import-not-found, unused-ignore]
    from agent.client import SocketClient
    from agent.errors import (
        AgentError,
        ApiError,
        ChronicleError,
        ConfigError,
        DaemonUnreachable,
        JobFailed,
        RunEnded,
        UsageError,
    )
    from agent.run import JobHandle, PresignedUpload, Run

__all__ = [
    "AgentError",
    "ApiError",
    "Chronicle",
    "ChronicleError",
    "ConfigError",
    "DaemonUnreachable",
    "JobFailed",
    "JobHandle",
    "PresignedUpload",
    "Run",
    "RunEnded",
    "SocketClient",
    "UsageError",
    "__version__",
]

_LAZY = {
    "Run": "agent.run",
    "JobHandle": "agent.run",
    "PresignedUpload": "agent.run",
    "SocketClient": "agent.client",
    "Chronicle": "agent.chronicle.sdk",
    "AgentError": "agent.errors",
    "ApiError": "agent.errors",
    "ChronicleError": "agent.errors",
    "ConfigError": "agent.errors",
    "DaemonUnreachable": "agent.errors",
    "JobFailed": "agent.errors",
    "RunEnded": "agent.errors",
    "UsageError": "agent.errors",
}
_FALLBACK_VERSION = "0.1.0"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chronicle-agent")
    except PackageNotFoundError:  # running from a source tree
        return _FALLBACK_VERSION


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
