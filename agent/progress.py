"""Waiting for a job from the command line, with a live progress line on a terminal.

On a TTY the job is polled about five times a second and one line is redrawn in place:
``[#######.......]  48%  1.2 GiB / 2.5 GiB  85.3 MiB/s  ETA 0:15  running``. Elsewhere
nothing is drawn and the wait is the daemon's long poll.

:func:`follow_job` follows the job across a daemon restart: the job survives in the
persistent queue, so while the socket does not answer the wait says so and asks again with
backoff, for up to ``reconnect_s``, then goes on waiting on the same job id.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from agent.client import TERMINAL_STATES, SocketClient
from agent.errors import DaemonUnreachable
from agent.termsafe import visible

POLL_S = 0.2
RATE_WINDOW_S = 3.0
RECONNECT_S = 60.0
"""How long a waiting command keeps asking for a daemon that went away (a restart)."""
RECONNECT_MAX_DELAY_S = 2.0
BAR_WIDTH = 24


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RateMeter:
    """Bytes per second over a sliding window of samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, t: float, bytes_done: int) -> None:
        if self._samples and bytes_done < self._samples[-1][1]:
            self._samples.clear()  # a retry started over
        self._samples.append((t, bytes_done))
        while len(self._samples) > 2 and t - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None


def render(job: dict[str, Any], rate: float | None, width: int = BAR_WIDTH) -> str:
    """One progress line for a job."""
    total = int(job.get("bytes_total") or 0)
    done = int(job.get("bytes_done") or 0)
    state = str(job.get("state"))
    parts: list[str] = []
    if total > 0:
        frac = min(1.0, max(0.0, done / total))
        filled = int(frac * width)
        parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:3.0f}%")
        parts.append(f"{format_bytes(done)} / {format_bytes(total)}")
    else:
        parts.append(format_bytes(done))
    if rate is not None and state == "running":
        parts.append(f"{format_bytes(rate)}/s")
        if total > 0 and rate > 0 and done < total:
            parts.append(f"ETA {format_duration((total - done) / rate)}")
    attempts = int(job.get("attempts") or 0)
    if attempts > 1:
        parts.append(f"attempt {attempts}")
    parts.append(state)
    return "  ".join(parts)


def wait_with_progress(
    client: SocketClient,
    job: dict[str, Any],
    stream: TextIO,
    *,
    show: bool | None = None,
    poll_s: float = POLL_S,
    unreachable_grace_s: float | None = None,
) -> dict[str, Any]:
    """Wait for ``job`` to be terminal; draw progress on ``stream`` if it is a terminal (or
    ``show``)."""
    if show is None:
        show = _isatty(stream)
    job_id = str(job["job_id"])
    if not show:
        if job.get("state") in TERMINAL_STATES:
            return job
        if unreachable_grace_s is None:
            return client.wait_job(job_id)
        return client.wait_job(job_id, unreachable_grace_s=unreachable_grace_s)
    meter = RateMeter()
    last_len = 0
    try:
        while True:
            meter.add(time.monotonic(), int(job.get("bytes_done") or 0))
            line = visible(f"{job_id} {render(job, meter.rate())}")
            stream.write("\r" + line + " " * max(0, last_len - len(line)))
            stream.flush()
            last_len = len(line)
            if job.get("state") in TERMINAL_STATES:
                return job
            time.sleep(poll_s)
            job = client.get_job(job_id)
    finally:
        stream.write("\n")
        stream.flush()


def follow_job(
    client: SocketClient,
    job: dict[str, Any],
    stream: TextIO,
    say: Callable[[str], None],
    *,
    reconnect_s: float = RECONNECT_S,
    show: bool | None = None,
) -> dict[str, Any]:
    """:func:`wait_with_progress`, across daemon restarts. While the daemon does not answer,
    ``say`` tells the user so once, and the daemon is asked again with backoff; once it
    answers, the wait goes on with the same job. Raises :class:`DaemonUnreachable` (saying
    that the job stays queued) if it does not answer within ``reconnect_s``."""
    job_id = str(job["job_id"])
    while True:
        try:
            return wait_with_progress(client, job, stream, show=show, unreachable_grace_s=0.0)
        except DaemonUnreachable as e:
            say(f"chronicle-agent: daemon restarting ({e.message}); job {job_id} resumes when "
                f"it is back (waiting up to {reconnect_s:g} s)")
        job = _reconnect(client, job_id, reconnect_s)
        say(f"chronicle-agent: daemon is back; job {job_id} is {job.get('state')}")


def _reconnect(client: SocketClient, job_id: str, reconnect_s: float) -> dict[str, Any]:
    """The job, once the daemon answers again."""
    deadline = time.monotonic() + max(0.0, reconnect_s)
    delay = POLL_S
    while True:
        try:
            return client.get_job(job_id)
        except DaemonUnreachable:
            if time.monotonic() >= deadline:
                raise DaemonUnreachable(
                    f"the daemon on {client.socket_path} did not come back within "
                    f"{reconnect_s:g} s; job {job_id} stays in its queue and resumes when it "
                    f"is back (`chronicle-agent jobs` shows it then)") from None
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, RECONNECT_MAX_DELAY_S)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
