"""Keeping out of training's way while bytes move.

Three mechanisms, measured in ``benchmarks/bench_slowdown.py``:

- **Idle threads** (:class:`agent.priority.BulkThreads`): reading, hashing, copying and
  writing transferred bytes run under ``SCHED_IDLE``, so they get a core only when nothing
  else wants it.
- **Holding back**: every ``agent.busy_check_s`` the :class:`Yielder` measures how much CPU
  the other processes use on the daemon's CPUs (``/proc/stat`` less the daemon's own time,
  ``/proc/self/stat``). At ``agent.busy_cpu_fraction`` of them (training is busy on them)
  it caps every transfer together at ``agent.busy_bytes_per_s`` until they use clearly less
  (a quarter of the CPUs less, for three looks in a row). Multi-threaded training is hurt
  by any neighbour far more than that neighbour's share suggests (its threads meet at every
  step, so one descheduled thread stalls all); a small, steady trickle is what it tolerates
  best. CPU pressure (``/proc/pressure/cpu``) is reported beside it, not used: the daemon's
  own work raises it.
- **The progress floor**: uploads must finish on a node that is busy for days. When
  transfers or bulk work (a finalize hashing what was assembled moves no transfer bytes)
  are under way but moved less than half of ``busy_bytes_per_s`` over the last
  ``FLOOR_WINDOW`` looks, the bulk work stops yielding (``SCHED_BATCH`` threads at the
  daemon's niceness) until it moves at least that rate again or ends. Long bulk work is cut
  into short calls (:func:`agent.priority.hash_step`), so a boost reaches it at the next.

Everything it decides is in ``/v1/health`` (``yield``), ``chronicle-agent status`` and
``/metrics``, with the reason.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio

from agent.config import AgentSection
from agent.metrics import Metrics
from agent.priority import BULK
from agent.transfer.limits import Limits

log = logging.getLogger(__name__)

FLOOR_WINDOW = 5
"""Looks (``agent.busy_check_s`` each) over which the progress floor is judged."""
RELEASE_LOOKS = 3
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (guest is in user)


def cpu_ticks(cpus: set[int], stat: str = "/proc/stat") -> int:
    """Busy clock ticks of these CPUs since boot."""
    total = 0
    with open(stat) as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *values = line.split()
            if int(name[3:]) in cpus:
                nums = [int(v) for v in values]
                total += sum(nums[i] for i in _BUSY_FIELDS if i < len(nums))
    return total


def own_ticks(pid: int | str = "self") -> int:
    """User + system ticks of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)


def cpu_pressure(path: str = "/proc/pressure/cpu") -> float | None:
    """``some avg10`` of the CPU pressure (percent of the last 10 s in which a task waited
    for a CPU), or None where the kernel has no PSI."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("some"):
                    for part in line.split():
                        if part.startswith("avg10="):
                            return float(part[6:])
    except OSError:
        return None
    return None


class Yielder:
    def __init__(self, cfg: AgentSection, limits: Limits, metrics: Metrics,
                 active: Callable[[], bool]) -> None:
        self.cfg = cfg
        self.limits = limits
        self.metrics = metrics
        self.active = active
        self.configured_rate = limits.bucket.rate
        self.cpus = set(os.sched_getaffinity(0))
        self.holding = False
        self.others_cpu = 0.0
        self.pressure: float | None = None
        self.since = 0.0
        self.held_s = 0.0
        self._calm = 0
        self._moved: deque[tuple[int, bool]] = deque(maxlen=FLOOR_WINDOW)
        BULK.configure(cfg.bulk_policy)

    @property
    def cap(self) -> int:
        """The rate every transfer together may use now (0 = unlimited)."""
        if not self.holding:
            return self.configured_rate
        busy = self.cfg.busy_bytes_per_s
        return min(self.configured_rate, busy) if self.configured_rate else busy

    def info(self) -> dict[str, Any]:
        reason = None
        if self.holding:
            reason = (f"other processes use {self.others_cpu:.1f} of {len(self.cpus)} CPU(s) "
                      f"(agent.busy_cpu_fraction = {self.cfg.busy_cpu_fraction:g}): "
                      f"transfers capped at {self.cap} B/s")
        if BULK.boost:
            reason = (reason + "; " if reason else "") + (
                "progress floor: transfers moved under half of agent.busy_bytes_per_s, "
                "bulk threads stop yielding until they catch up")
        return {"holding_back": self.holding, "reason": reason,
                "others_cpu": round(self.others_cpu, 2), "cpus": len(self.cpus),
                "cpu_pressure_some_avg10": self.pressure,
                "rate_cap_bytes_per_s": self.cap, "bulk_policy": BULK.current(),
                "floor_boost": BULK.boost, "held_s": round(self.held_s, 1)}

    async def run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        step = self.cfg.busy_check_s
        try:
            prev = await anyio.to_thread.run_sync(self._sample)
        except (OSError, ValueError, IndexError) as e:  # no /proc: nothing to measure by
            log.warning("cannot measure the CPU use of other processes (%s): the daemon "
                        "does not hold back for training", e)
            return
        last = time.monotonic()
        while True:
            await anyio.sleep(step)
            now = time.monotonic()
            try:
                cur = await anyio.to_thread.run_sync(self._sample)
            except (OSError, ValueError, IndexError) as e:
                log.warning("measuring the CPU use of other processes failed (%s)", e)
                continue
            elapsed = max(now - last, 1e-3)
            others = (cur[0] - prev[0] - (cur[1] - prev[1])) / tick / elapsed
            self.pressure = cur[3]
            self.look(max(0.0, others), cur[2] - prev[2], self.active(), elapsed)
            prev, last = cur, now

    def _sample(self) -> tuple[int, int, int, float | None]:
        return (cpu_ticks(self.cpus), own_ticks(),
                self.metrics.bytes_up + self.metrics.bytes_down, cpu_pressure())

    def look(self, others_cpu: float, moved: int, active: bool, elapsed: float) -> None:
        """One look: whether to hold back, and whether the progress floor needs a boost."""
        self.others_cpu = others_cpu
        n = len(self.cpus)
        frac = self.cfg.busy_cpu_fraction
        if self.holding:
            self.held_s += elapsed
        if frac > 0 and others_cpu >= frac * n:
            self._calm = 0
            if not self.holding:
                self.holding, self.since = True, time.monotonic()
                self._apply()
                log.info("holding back: other processes use %.1f of %d CPU(s); transfers "
                         "capped at %d B/s, bulk threads %s", others_cpu, n, self.cap,
                         BULK.current())
        elif self.holding and others_cpu < (frac - 0.25) * n:
            self._calm += 1
            if self._calm >= RELEASE_LOOKS:
                self.holding = False
                self._apply()
                log.info("no longer holding back (others use %.1f of %d CPU(s), held for "
                         "%.0f s)", others_cpu, n, time.monotonic() - self.since)
        else:
            self._calm = 0
        self._floor(int(moved / elapsed), active)

    def _floor(self, rate: int, active: bool) -> None:
        self._moved.append((rate, active))
        floor = self.cfg.busy_bytes_per_s // 2
        if BULK.policy != "idle":
            return
        starved = (len(self._moved) == FLOOR_WINDOW and all(a for _r, a in self._moved)
                   and sum(r for r, _a in self._moved) / FLOOR_WINDOW < floor)
        if starved and not BULK.boost:
            BULK.boost = True
            log.info("progress floor: transfers moved under %d B/s for %d s; bulk threads "
                     "stop yielding until they catch up", floor, FLOOR_WINDOW)
        elif BULK.boost and (not active or rate >= self.cfg.busy_bytes_per_s):
            BULK.boost = False
            log.info("progress floor: transfers caught up; bulk threads yield again")

    def _apply(self) -> None:
        self.limits.bucket.set_rate(self.cap)
