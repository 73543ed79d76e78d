"""The daemon: start order, stop order.

Start: state dir (0700 and ours, else one line and exit 2: agent/statedir.py) and its
lock (one daemon per state dir) → queue (jobs left running
by a dead daemon go back to the queue) → Chronicle (the embedded local server when no URL
is configured) → HTTP sessions and the transfer engine → socket → workers → runs of the
previous daemon (rules restored; which died meanwhile) → the watcher's first scan → run
liveness (pidfds, leases; the dead are settled). Under systemd (docs/systemd.md) the socket
may come from socket activation, and READY=1 is sent once it listens (the queue is open).

Stop (SIGTERM/SIGINT): stop claiming work, cancel in-flight transfers (every acknowledged
part is already recorded, so the restart resumes them), close the socket, the sessions, the
embedded server and the queue.
"""

from __future__ import annotations

import fcntl
import grp
import logging
import os
import signal
import socket
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.to_thread
from aiohttp import web

from agent.chronicle.aio import AsyncChronicle
from agent.config import Settings
from agent.crashpoints import CrashPoints, from_settings
from agent.errors import AgentError, ConfigError
from agent.metrics import Metrics, watch_loop_lag
from agent.priority import BULK, lower_priority, set_cpus
from agent.queue.aqueue import AsyncQueue
from agent.queue.store import new_id
from agent.runs.registry import RunRegistry
from agent.sdnotify import Notifier, listen_socket, watchdog_interval_s
from agent.statedir import prepare_state_dir, private_umask
from agent.transfer.limits import Limits
from agent.transfer.retry import RetryPolicy
from agent.transfer.upload import Engine
from agent.transfer.worker import Workers
from agent.watch.watcher import Watcher
from agent.yielding import Yielder

log = logging.getLogger(__name__)


class DaemonError(AgentError):
    code = "daemon_error"


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir()
        self.socket_path = settings.socket_path()
        self.metrics = Metrics()
        self.chronicle_url = ""
        self.inline_max_bytes = settings.server.inline_max_bytes
        self.queue: AsyncQueue
        self.engine: Engine
        self.yielder: Yielder
        self.workers: Workers
        self.runs: RunRegistry
        self.watcher: Watcher
        self._lock_fd: int | None = None
        self._server: Any = None
        self._stop = anyio.Event()
        # systemd (see docs/systemd.md): sd_notify, and a socket passed by socket activation
        self.notifier = Notifier()
        self._socket_activated = False

    def staging_bytes(self) -> int:
        """Bytes the watcher's staging area holds on its own (see agent/watch/staging.py)."""
        watcher = getattr(self, "watcher", None)
        return watcher.staging_bytes() if watcher is not None else 0

    def request_stop(self) -> None:
        self._stop.set()

    # ---- start pieces --------------------------------------------------------------------

    def _lock_state_dir(self) -> None:
        prepare_state_dir(self.state_dir)  # 0700 and ours, or one line and exit 2
        fd = os.open(self.state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(
                f"another chronicle-agent daemon is running with state dir {self.state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def _chronicle(self, crash: CrashPoints) -> tuple[str, str | None]:
        url = self.settings.chronicle.url
        if url:
            return url.rstrip("/"), self.settings.token()
        from agent.server.runner import start_server

        self._server = await start_server(self.settings, embedded=True, crash=crash)
        token = self._server.local_token
        log.info("embedded Chronicle at %s", self._server.url)
        return str(self._server.url), token

    def _bind_socket(self) -> socket.socket:
        path = self.socket_path
        # The daemon runs with umask 077: directories it creates for the socket get 0755
        # explicitly (callers must reach the socket; its own mode and group guard it).
        missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        for d in missing:
            os.chmod(d, 0o755)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale, from a daemon that died
            else:
                raise DaemonError(f"socket {path} is in use by another daemon")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, self.settings.agent.socket_mode)
        group = self.settings.agent.socket_group
        if group:
            try:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            except KeyError:
                raise ConfigError(f"agent.socket_group = {group!r}: no such group") from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    # ---- main ----------------------------------------------------------------------------

    async def run(self) -> None:
        self._lock_state_dir()
        lower_priority(self.settings.agent.nice, self.settings.agent.io_class)
        set_cpus(self.settings.agent.cpus)
        BULK.configure(self.settings.agent.bulk_policy)
        crash = from_settings(self.settings.debug.crash_point, str(self.state_dir),
                              self.settings.debug.block_loop)
        self.queue = await AsyncQueue.open(self.state_dir / "queue.db")
        requeued = await self.queue.do(self.queue.s.recover)
        if requeued:
            log.info("resuming %d job(s) left running by the previous daemon", requeued)
        up = self.settings.upload
        try:
            self.chronicle_url, token = await self._chronicle(crash)
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
            storage = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=up.connect_timeout_s),
                auto_decompress=False,
            )
            # Our retry policy owns retries: aiohttp's own silent resend of an idempotent
            # request could replay a half-consumed streaming body.
            storage._retry_connection = False
            api_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=self.settings.chronicle.request_timeout_s,
                sock_connect=up.connect_timeout_s))
            try:
                chronicle = AsyncChronicle(
                    api_session, self.chronicle_url, token,
                    RetryPolicy(up.max_attempts, up.backoff_base_s, up.backoff_max_s),
                    self.settings.chronicle.request_timeout_s,
                )
                limits = Limits(up.concurrency, up.bandwidth_limit_bytes_per_s)
                self.yielder = Yielder(self.settings.agent, limits, self.metrics,
                                       active=lambda: (limits.slots.borrowed_tokens > 0
                                                       or BULK.inflight > 0))
                self.engine = Engine(self.settings, self.queue, chronicle, storage, limits,
                                     self.metrics, crash)
                self.workers = Workers(self.engine, owner=new_id("daemon"),
                                       job_max_attempts=up.job_max_attempts)
                # each part gets the narrow things it uses; the watcher asks the runs how
                # to seal, a run's end asks the watcher what is still unsealed
                self.runs = RunRegistry(self.queue, self.settings, self.engine, self.workers)
                self.watcher = Watcher(self.queue, self.settings, self.state_dir, self.metrics,
                                       self.runs, self.workers)
                self.runs.attach(self.watcher)
                await self._serve()
            finally:
                with anyio.CancelScope(shield=True):
                    if hasattr(self, "engine"):
                        self.engine.pool.close()
                    await storage.close()
                    await api_session.close()
        finally:
            with anyio.CancelScope(shield=True):
                if self._server is not None:
                    await self._server.stop()
                await self.queue.close()
                BULK.shutdown()
                if self._lock_fd is not None:
                    os.close(self._lock_fd)

    async def _serve(self) -> None:
        from agent.api.app import Api

        sock = self._activated_socket() or self._bind_socket()
        runner = web.AppRunner(Api(self).app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, sock, shutdown_timeout=2.0)
        metrics_runner = await self._metrics_over_tcp()
        try:
            async with anyio.create_task_group() as tg:
                # SIGTERM handled before anyone can see us answer (a stop right after start
                # must not kill the process with the default action)
                await tg.start(self._signals, tg.cancel_scope)
                await site.start()
                log.info("listening on %s (chronicle %s, state %s)", self.socket_path,
                         self.chronicle_url, self.state_dir)
                # systemd: the socket listens and the queue is open
                if self.notifier.enabled:
                    self.notifier.ready(await self._status_line())
                tg.start_soon(self._systemd_status)
                tg.start_soon(self._systemd_watchdog)
                self.runs.bind(tg)
                await tg.start(self.workers.run, self.settings.agent.workers)
                # runs of the previous daemon first (which died meanwhile), then the
                # watcher's first scan, then the runs' liveness
                await self.runs.restore()
                await tg.start(self.watcher.run)
                await tg.start(self.runs.run)
                tg.start_soon(watch_loop_lag, self.metrics)
                tg.start_soon(self.yielder.run)
                await self._stop.wait()
                self.notifier.stopping("stopping")
                log.info("stopping: no new work is claimed; in-flight transfers resume at "
                         "the next start")
                self.workers.stop_claiming()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
                if metrics_runner is not None:
                    await metrics_runner.cleanup()
                if not self._socket_activated:  # systemd's .socket unit owns that one
                    try:
                        self.socket_path.unlink()
                    except FileNotFoundError:
                        pass
                self.notifier.close()

    async def _metrics_over_tcp(self) -> web.AppRunner | None:
        """``agent.metrics_listen``: /metrics (only) on a loopback TCP port, for Prometheus."""
        listen = self.settings.agent.metrics_listen
        if not listen:
            return None
        from agent.api.app import Api

        host, _, port = listen.rpartition(":")
        if host not in ("127.0.0.1", "::1", "localhost", "[::1]"):
            raise ConfigError(f"agent.metrics_listen = {listen!r}: must be a loopback address")
        app = web.Application()
        app.router.add_get("/metrics", Api(self).metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, host.strip("[]"), int(port)).start()
        log.info("metrics on http://%s/metrics", listen)
        return runner

    # ---- systemd (agent/sdnotify.py, docs/systemd.md) --------------------------------------

    def _activated_socket(self) -> socket.socket | None:
        """The listening socket systemd passed (LISTEN_PID/LISTEN_FDS), if any: it is used
        as is (mode and group come from the .socket unit) and never unlinked by us."""
        sock = listen_socket()
        if sock is None:
            return None
        self._socket_activated = True
        name = sock.getsockname()
        if isinstance(name, str) and name.startswith("/"):
            if name != str(self.socket_path):
                log.info("socket activation: listening on %s (configured: %s)", name,
                         self.socket_path)
            self.socket_path = type(self.socket_path)(name)
        return sock

    async def _status_line(self) -> str:
        counts = await self.queue.do(self.queue.s.counts)
        up_mb_s = self.metrics.rate_up.per_s() / 1e6
        return (f"{counts.get('queued', 0)} queued, {counts.get('running', 0)} running, "
                f"{up_mb_s:.1f} MB/s up")

    async def _systemd_status(self, every_s: float = 5.0) -> None:
        if not self.notifier.enabled:
            return
        while True:
            self.notifier.status(await self._status_line())
            await anyio.sleep(every_s)

    async def _systemd_watchdog(self) -> None:
        """WATCHDOG=1 every WATCHDOG_USEC/2, from the event loop: a blocked loop stops the
        pings and systemd restarts the daemon."""
        interval_s = watchdog_interval_s()
        if interval_s is None or not self.notifier.enabled:
            return
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval_s)

    async def _signals(self, scope: anyio.CancelScope, *,
                       task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                       ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for sig in signals:
                log.info("received %s", signal.Signals(sig).name)
                self.request_stop()
                return


def run_daemon(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code. Every file the daemon
    creates is private unless given a mode (umask 077, see agent/statedir.py)."""
    private_umask()
    try:
        anyio.run(Daemon(settings).run)
    except ConfigError as e:
        log.error("%s", e.message)
        return 2
    except AgentError as e:
        log.error("%s", e.message)
        return 1
    return 0
