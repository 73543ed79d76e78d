"""An idle daemon is idle: no worker spins on an empty queue (a regression: idle workers
once woke each other on every empty claim)."""

from __future__ import annotations

import time

import psutil

from tests.support.helpers_daemon import DaemonProc, start_daemon


def _cpu(daemon: DaemonProc) -> float:
    assert daemon.pid is not None
    t = psutil.Process(daemon.pid).cpu_times()
    return float(t.user + t.system)


def test_idle_daemon_uses_almost_no_cpu() -> None:
    # Many workers: the more idle workers, the likelier they would set each other off.
    with start_daemon({"CHRONICLE_AGENT_AGENT__WORKERS": "32"}) as daemon:
        time.sleep(1.0)  # let start-up settle
        before = _cpu(daemon)
        time.sleep(3.0)
        assert _cpu(daemon) - before < 0.3, "an idle daemon is spinning"

