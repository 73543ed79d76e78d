"""The daemon's manners: a low CPU and I/O priority by default, so that a training job on
the same node comes first (systemd units set the same with Nice= and IOSchedulingClass=)."""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_CLASSES = {"best-effort": 2, "idle": 3}
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "arm64": 30}


def lower_priority(nice: int, io_class: str) -> None:
    """Raise our niceness to ``nice`` (never lower it) and set the I/O class."""
    if nice > 0:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    cls = _CLASSES.get(io_class)
    nr = _SYS_IOPRIO_SET.get(platform.machine())
    if cls is None:
        return
    if nr is None:
        log.info("io_class %s: not supported on %s", io_class, platform.machine())
        return
    libc = ctypes.CDLL(None, use_errno=True)
    prio = (cls << _IOPRIO_CLASS_SHIFT) | (7 if cls == 2 else 0)
    if libc.syscall(nr, _IOPRIO_WHO_PROCESS, 0, prio) != 0:
        log.warning("could not set the I/O class to %s: %s", io_class,
                    os.strerror(ctypes.get_errno()))
