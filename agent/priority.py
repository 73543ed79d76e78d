"""The daemon's manners: a low CPU and I/O priority by default, so that a training job on
the same node comes first (systemd units set the same with Nice= and IOSchedulingClass=)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import os
import platform
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def set_cpus(cpus: list[int]) -> None:
    """``agent.cpus``: run on these CPUs only (threads made later inherit it)."""
    if not cpus:
        return
    allowed = os.sched_getaffinity(0)
    if not set(cpus) <= allowed:
        from agent.errors import ConfigError

        raise ConfigError(f"agent.cpus = {sorted(cpus)}: this process may only use CPUs "
                          f"{sorted(allowed)}")
    os.sched_setaffinity(0, cpus)
    log.info("running on CPU(s) %s (agent.cpus)", ",".join(map(str, sorted(cpus))))


# ---- the threads that move bytes ------------------------------------------------------------

BULK_POLICIES = {"idle": os.SCHED_IDLE, "batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER}
HASH_STEP_BYTES = 32 * 1024 * 1024
"""Bytes hashed per bulk call: long work is cut into short calls, so that a boost of the
progress floor reaches it at the next call (a thread never leaves SCHED_IDLE itself)."""
BULK_THREADS = 16
"""Threads per bulk pool (reads, hashes, copies and writes of transfers, and the embedded
server's I/O): as many as transfers usually run at once, and more than enough."""


def _enter_policy(name: str) -> None:
    """A bulk pool thread's initializer: its scheduling policy for life (a thread that
    leaves SCHED_IDLE needs CAP_SYS_NICE or a large RLIMIT_NICE, so it never does: the
    pools are separate)."""
    try:
        os.sched_setscheduler(0, BULK_POLICIES[name], os.sched_param(0))
    except OSError as e:  # seccomp, an exotic kernel: the thread runs at the process's policy
        log.warning("bulk thread: cannot set scheduling policy %s: %s", name, e)


class BulkThreads:
    """Where the work that moves bytes runs: reading and hashing what is uploaded, writing
    and hashing what is downloaded, cache copies, and the embedded server's ingest.

    With ``policy = "idle"`` (the default) that work runs in threads under ``SCHED_IDLE``:
    the kernel gives them a core only when nothing else wants it, so a training step is
    never made to wait for a hash. The progress floor (:class:`agent.yielding.Yielder`)
    sets ``boost`` when that starves transfers for too long: the work then runs in
    ``SCHED_BATCH`` threads at the daemon's niceness until it catches up. ``"normal"``
    runs it in the ordinary worker threads."""

    def __init__(self) -> None:
        self.policy = "normal"
        self.boost = False
        self.inflight = 0
        """Calls waiting for or running in a bulk thread (the progress floor's "under
        way": a finalize hashing a large object moves no transfer bytes)."""
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def configure(self, policy: str) -> None:
        if policy not in BULK_POLICIES:
            raise ValueError(f"unknown bulk policy {policy!r}")
        self.policy = policy

    def current(self) -> str:
        """The policy bulk work gets right now."""
        if self.policy == "idle" and self.boost:
            return "batch"
        return self.policy

    def executor(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The pool for bulk work now (None: anyio's ordinary worker threads)."""
        name = self.current()
        if name == "normal":
            return None
        with self._lock:
            pool = self._pools.get(name)
            if pool is None:
                pool = self._pools[name] = concurrent.futures.ThreadPoolExecutor(
                    BULK_THREADS, thread_name_prefix=f"bulk-{name}",
                    initializer=_enter_policy, initargs=(name,))
            return pool

    async def run(self, fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False,
                  stop: threading.Event | None = None) -> T:
        """``fn(*args)`` in a bulk thread; like ``anyio.to_thread.run_sync``, a cancelled
        caller waits for the thread's call to end unless ``abandon_on_cancel``. ``stop``:
        set when the caller is cancelled, for a call that watches it to end early."""
        pool = self.executor()
        call = functools.partial(fn, *args)
        with self._lock:
            self.inflight += 1
        try:
            if pool is None and stop is None:
                return await anyio.to_thread.run_sync(call,
                                                      abandon_on_cancel=abandon_on_cancel)
            fut = asyncio.get_running_loop().run_in_executor(pool or self._normal(), call)
            if abandon_on_cancel:
                return await fut
            if stop is not None:
                try:
                    return await asyncio.shield(fut)
                except asyncio.CancelledError:
                    stop.set()
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await fut
                    raise
            with anyio.CancelScope(shield=True):
                result = await fut
            return result
        finally:
            with self._lock:
                self.inflight -= 1

    def _normal(self) -> concurrent.futures.ThreadPoolExecutor:
        """A pool of ordinary threads (for calls that need a future of their own)."""
        with self._lock:
            pool = self._pools.get("normal")
            if pool is None:
                pool = self._pools["normal"] = concurrent.futures.ThreadPoolExecutor(
                    BULK_THREADS, thread_name_prefix="bulk-normal")
            return pool

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """For code that runs on a plain executor (the local server's storage)."""
        pool = self.executor() or self._normal()
        with self._lock:
            self.inflight += 1
        fut = pool.submit(fn, *args)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self.inflight -= 1

    def shutdown(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)


BULK = BulkThreads()
"""The process's bulk threads (one policy per process: the daemon and its embedded server
share them)."""


async def run_bulk(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False,
                   stop: threading.Event | None = None) -> T:
    return await BULK.run(fn, *args, abandon_on_cancel=abandon_on_cancel, stop=stop)


class BulkExecutor(concurrent.futures.Executor):
    """An executor that hands every call to the bulk threads of the moment (the local
    server's storage I/O: hashing and writing what it receives)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[T]:
        return BULK.submit(functools.partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # the pools belong to the process


def hash_step(f: Any, h: Any, view: memoryview, limit: int = -1) -> int:
    """Up to :data:`HASH_STEP_BYTES` (and at most ``limit`` when >= 0) more bytes of the
    open file ``f`` into the hash ``h``, through ``view``; how many (0 at the end)."""
    want = HASH_STEP_BYTES if limit < 0 else min(limit, HASH_STEP_BYTES)
    done = 0
    while done < want:
        n = f.readinto(view[: min(len(view), want - done)])
        if not n:
            break
        h.update(view[:n])
        done += n
    return done


def thread_policy(tid: int, pid: int | None = None) -> str:
    """The scheduling policy of a thread, by name (from /proc: tests and status)."""
    path = f"/proc/{pid or os.getpid()}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    policy = int(fields[38])  # field 41 of stat(5), counted after the command's ")"
    names = {v: k for k, v in BULK_POLICIES.items()}
    return names.get(policy, str(policy))
