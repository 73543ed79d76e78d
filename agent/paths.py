"""Default locations, shared by the settings model and the training-side client (standard
library only: training processes import this)."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_ENV = "CHRONICLE_AGENT_SOCKET"


def fallback_socket_path() -> Path:
    """Where the socket is when neither the environment nor the config names it:
    ``/run/chronicle-agent/agent.sock`` for root, else
    ``$XDG_RUNTIME_DIR/chronicle-agent/agent.sock``, else
    ``/tmp/chronicle-agent-$UID/agent.sock``."""
    if os.geteuid() == 0:
        return Path("/run/chronicle-agent/agent.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "chronicle-agent" / "agent.sock"
    return Path(f"/tmp/chronicle-agent-{os.getuid()}/agent.sock")
