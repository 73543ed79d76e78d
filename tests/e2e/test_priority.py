"""Resource manners: by default the daemon lowers its own CPU and I/O priority; /metrics can
be served on a loopback TCP port too."""

from __future__ import annotations

import os
import subprocess
import urllib.request

from tests.support.helpers_daemon import start_daemon
from tests.support.helpers_e2e import free_port


def test_daemon_lowers_its_priority_by_default() -> None:
    defaults = {"CHRONICLE_AGENT_AGENT__NICE": "10", "CHRONICLE_AGENT_AGENT__IO_CLASS": "idle"}
    with start_daemon(defaults) as daemon:  # the shipped defaults, spelled out
        assert daemon.pid is not None
        assert os.getpriority(os.PRIO_PROCESS, daemon.pid) >= 10
        out = subprocess.run(["ionice", "-p", str(daemon.pid)], capture_output=True,
                             text=True, check=True).stdout
        assert out.strip() == "idle", out


def test_metrics_on_a_loopback_tcp_port() -> None:
    port = free_port()
    with start_daemon({"CHRONICLE_AGENT_AGENT__METRICS_LISTEN": f"127.0.0.1:{port}"}):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "chronicle_agent_bytes_sent_total" in text
        assert 'chronicle_agent_jobs{state="queued"}' in text


def test_the_shipped_defaults_are_low_priority() -> None:
    from agent.config import AgentSection

    a = AgentSection()
    assert a.nice == 10 and a.io_class == "idle"
