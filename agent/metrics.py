"""Counters the daemon keeps, shown by /v1/health and /metrics (Prometheus text format)."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any


class Rate:
    """Bytes per second over a sliding window."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._sum = 0

    def add(self, n: int) -> None:
        now = time.monotonic()
        self._events.append((now, n))
        self._sum += n
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._sum -= self._events.popleft()[1]

    def per_s(self) -> float:
        self._trim(time.monotonic())
        return max(0.0, self._sum / self.window_s)


async def watch_loop_lag(metrics: Metrics, every_s: float = 0.25, warn_s: float = 1.0) -> None:
    """Measure how late the event loop wakes up; a blocked loop shows here (and in a log
    warning), never silently in stalled transfers."""
    import logging

    import anyio

    log = logging.getLogger("agent.loop")
    while True:
        t0 = time.monotonic()
        await anyio.sleep(every_s)
        lag = time.monotonic() - t0 - every_s
        metrics.loop_lag_max_s = max(metrics.loop_lag_max_s, lag)
        if lag > warn_s:
            log.warning("event loop blocked for %.2fs", lag)


class Metrics:
    def __init__(self) -> None:
        self.loop_lag_max_s = 0.0
        self.bytes_up = 0
        self.bytes_down = 0
        self.rate_up = Rate()
        self.rate_down = Rate()
        self.retries: Counter[str] = Counter()
        self.jobs_finished: Counter[str] = Counter()
        self.checkpoints: Counter[tuple[str, str]] = Counter()
        """Watched checkpoints since start by (fate, reason): sealed (by seal kind), lost
        and abandoned (by why)."""

    def sent(self, n: int) -> None:
        self.bytes_up += n
        if n > 0:
            self.rate_up.add(n)

    def received(self, n: int) -> None:
        self.bytes_down += n
        if n > 0:
            self.rate_down.add(n)

    def retry(self, cause: str) -> None:
        self.retries[cause] += 1

    def checkpoint(self, fate: str, reason: str) -> None:
        self.checkpoints[(fate, reason)] += 1

    def prometheus(self, queue_counts: dict[str, int], staging_bytes: int,
                   yielding: dict[str, Any] | None = None) -> str:
        lines = [
            "# HELP chronicle_agent_bytes_sent_total Bytes sent to storage.",
            "# TYPE chronicle_agent_bytes_sent_total counter",
            f"chronicle_agent_bytes_sent_total {self.bytes_up}",
            "# HELP chronicle_agent_bytes_received_total Bytes received from storage.",
            "# TYPE chronicle_agent_bytes_received_total counter",
            f"chronicle_agent_bytes_received_total {self.bytes_down}",
            "# HELP chronicle_agent_transfer_bytes_per_second Current transfer rate.",
            "# TYPE chronicle_agent_transfer_bytes_per_second gauge",
            "chronicle_agent_transfer_bytes_per_second"
            f'{{direction="up"}} {self.rate_up.per_s():.0f}',
            "chronicle_agent_transfer_bytes_per_second"
            f'{{direction="down"}} {self.rate_down.per_s():.0f}',
            "# HELP chronicle_agent_jobs Jobs in the queue by state.",
            "# TYPE chronicle_agent_jobs gauge",
        ]
        lines += [
            f'chronicle_agent_jobs{{state="{s}"}} {n}' for s, n in sorted(queue_counts.items())
        ]
        depth = queue_counts.get("queued", 0) + queue_counts.get("running", 0)
        lines += [
            "# HELP chronicle_agent_queue_depth Jobs queued or running.",
            "# TYPE chronicle_agent_queue_depth gauge",
            f"chronicle_agent_queue_depth {depth}",
            "# HELP chronicle_agent_retries_total Retries by cause.",
            "# TYPE chronicle_agent_retries_total counter",
        ]
        lines += [f'chronicle_agent_retries_total{{cause="{c}"}} {n}'
                  for c, n in sorted(self.retries.items())]
        lines += [
            "# HELP chronicle_agent_loop_lag_max_seconds Longest event-loop delay seen.",
            "# TYPE chronicle_agent_loop_lag_max_seconds gauge",
            f"chronicle_agent_loop_lag_max_seconds {self.loop_lag_max_s:.3f}",
            "# HELP chronicle_agent_checkpoints_total Watched checkpoints by fate since start "
            "(sealed; lost or abandoned, with why).",
            "# TYPE chronicle_agent_checkpoints_total counter",
        ]
        lines += [f'chronicle_agent_checkpoints_total{{fate="{f}",reason="{r}"}} {n}'
                  for (f, r), n in sorted(self.checkpoints.items())]
        lines += [
            "# HELP chronicle_agent_staging_bytes Bytes held in the staging area.",
            "# TYPE chronicle_agent_staging_bytes gauge",
            f"chronicle_agent_staging_bytes {staging_bytes}",
        ]
        if yielding is not None:
            lines += [
                "# HELP chronicle_agent_holding_back 1 while other processes keep the CPUs "
                "busy and transfers are capped (agent.busy_cpu_fraction).",
                "# TYPE chronicle_agent_holding_back gauge",
                f"chronicle_agent_holding_back {int(yielding['holding_back'])}",
                "# HELP chronicle_agent_holding_back_seconds_total Time spent holding back.",
                "# TYPE chronicle_agent_holding_back_seconds_total counter",
                f"chronicle_agent_holding_back_seconds_total {yielding['held_s']}",
                "# HELP chronicle_agent_progress_floor_boost 1 while the progress floor has "
                "the bulk threads stop yielding.",
                "# TYPE chronicle_agent_progress_floor_boost gauge",
                f"chronicle_agent_progress_floor_boost {int(yielding['floor_boost'])}",
                "# HELP chronicle_agent_others_cpu CPUs other processes use on the daemon's "
                "CPUs.",
                "# TYPE chronicle_agent_others_cpu gauge",
                f"chronicle_agent_others_cpu {yielding['others_cpu']}",
            ]
        return "\n".join(lines) + "\n"
