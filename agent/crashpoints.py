"""Crash points: the daemon SIGKILLs itself at a named step, so tests can hit the narrow
windows of crash recovery for real (``debug.crash_point`` / CHRONICLE_AGENT_DEBUG__CRASH_POINT).

Names: ``before_register``; ``after_register_sent`` (Chronicle answered, the answer is not
stored yet); ``after_register``; ``after_part_sent:N`` (the N-th part acknowledged by storage
in this process, its ETag not stored yet); ``after_part:N`` (… and its ETag stored);
``after_component:N`` (the N-th component fully uploaded); ``after_declare:N`` (the N-th
batch of small components declared after register, API 1.1, its URLs in memory only);
``before_finalize``;
``after_finalize_sent`` (Chronicle finalized, nothing stored); ``after_finalize`` (stored,
job not yet marked done); ``mid_download:N`` (after N bytes of a download). A point may be
followed by ``@K`` to fire only on the K-th start of the daemon with this state dir (counted in
``<state_dir>/crash-starts``), so a test can let the restart pass.

Loop blocks (``debug.block_loop`` / CHRONICLE_AGENT_DEBUG__BLOCK_LOOP), debug only: at the
same named steps the daemon instead calls ``time.sleep`` on the event loop's thread, once, so
that a test can see what a stuck loop does (the systemd watchdog pings stop, see
docs/systemd.md). The form is ``<point>:<seconds>``, the point as above (``after_part:2:1.5``
blocks 1.5 s at the 2nd ``after_part``; a point without ``:N`` blocks at its first hit;
``mid_download:N`` once N bytes are in). Never set it in production: it freezes every
transfer and the socket for that long.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)


class LoopBlock:
    """``debug.block_loop``: sleeps on the calling (event loop) thread, once, at one point."""

    def __init__(self, spec: str) -> None:
        self.name, self.n, self.seconds, self._count = "", 0, 0.0, 0
        if spec:
            point, _, seconds = spec.rpartition(":")
            name, _, n = point.partition(":")
            self.name, self.n, self.seconds = name, int(n) if n else 0, float(seconds)
            log.warning("debug.block_loop = %r: the event loop will be blocked on purpose "
                        "(a debug setting, never for production)", spec)

    def hit(self, name: str) -> None:
        if name != self.name:
            return
        self._count += 1
        if self._count == (self.n or 1):
            self._block()

    def progress(self, name: str, done: int) -> None:
        if name == self.name and not self._count and done >= self.n:
            self._count = 1
            self._block()

    def _block(self) -> None:
        log.warning("debug.block_loop: blocking the event loop for %g s at %s", self.seconds,
                    self.name)
        time.sleep(self.seconds)  # deliberately blocking: that is what this knob is for
        log.warning("debug.block_loop: event loop unblocked")


class CrashPoints:
    def __init__(self, spec: str, block: str = "") -> None:
        self.name, self.n = "", 0
        self._counts: dict[str, int] = {}
        self.block = LoopBlock(block)
        if spec:
            name, _, n = spec.partition(":")
            self.name = name
            self.n = int(n) if n else 0

    @property
    def armed(self) -> bool:
        return bool(self.name)

    def hit(self, name: str) -> None:
        """Call at a named step; kills the process if this is the configured point (blocks
        the loop first if ``debug.block_loop`` names it)."""
        self.block.hit(name)
        if name != self.name:
            return
        c = self._counts[name] = self._counts.get(name, 0) + 1
        if self.n and c != self.n:
            return
        log.warning("crash point %s reached: killing the daemon (SIGKILL)", name)
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def progress(self, name: str, done: int) -> None:
        """For byte-count points (``mid_download:N``): fire once ``done`` reaches N."""
        self.block.progress(name, done)
        if name == self.name and self.n and done >= self.n:
            self.n = 0
            self.name = name
            self._counts[name] = -1
            log.warning("crash point %s reached: killing the daemon (SIGKILL)", name)
            os.kill(os.getpid(), signal.SIGKILL)


def from_settings(spec: str, state_dir: str, block: str = "") -> CrashPoints:
    """Honour ``name@K``: armed only on the K-th start with this state dir. ``block`` is
    ``debug.block_loop``, armed on every start."""
    if "@" not in spec:
        return CrashPoints(spec, block)
    point, _, k = spec.partition("@")
    path = os.path.join(state_dir, "crash-starts")
    try:
        with open(path) as f:
            starts = int(f.read().strip() or 0)
    except (OSError, ValueError):
        starts = 0
    starts += 1
    with open(path, "w") as f:
        f.write(str(starts))
    return CrashPoints(point if starts == int(k) else "", block)
