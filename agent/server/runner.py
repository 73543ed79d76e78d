"""Starting and stopping the local Chronicle: embedded in the daemon or on its own.

Start order: state dir, tokens file, signing secret (in a thread); storage and database;
bind the socket (so the real port is known before any URL is made); storage start (its URLs
point at the bound address or ``public_url``); serve; write ``endpoint.json``. Stop order is
the reverse.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from agent.config import Settings
from agent.crashpoints import CrashPoints, from_settings
from agent.errors import ConfigError
from agent.priority import BulkExecutor
from agent.statedir import prepare_state_dir

from .app import Core, make_app
from .assets import expire_idle, index_inline_texts
from .auth import TokenStore, ensure_tokens_file, local_principal_id
from .db import Database
from .gc import housekeeping
from .guard import ConnectionGuard, ServerLogger
from .http import AccessLogger
from .signing import Signer
from .storage import open_storage

log = logging.getLogger(__name__)

DEFAULT_STANDALONE_LISTEN = "127.0.0.1:8470"
READ_BUFSIZE = 1024 * 1024
"""aiohttp's per-connection receive buffer: large reads keep 1 GiB PUTs near disk speed."""
IO_THREADS = 16


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; a bare port means 127.0.0.1)."""
    host, sep, port_s = value.rpartition(":")
    if not sep:
        host, port_s = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_s)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"server.listen = {value!r}: expected HOST:PORT") from None
    return host, port


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=512)


def _bind_again(host: str, memo: Path) -> socket.socket:
    """The embedded server takes the port it had last time when it is free, so that URLs
    handed out before a daemon restart still reach it; else any free port."""
    try:
        sock = _bind(host, int(memo.read_text()))
    except (OSError, ValueError):
        sock = _bind(host, 0)
    memo.write_text(str(sock.getsockname()[1]))
    return sock


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("chronicle-agent")
    except importlib.metadata.PackageNotFoundError:
        import agent

        return str(getattr(agent, "__version__", "0+unknown"))


def _write_private_json(path: Path, data: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.write("\n")
    os.replace(tmp, path)


def _remove_if_ours(path: Path, url: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("url") == url:
            path.unlink()


@dataclass
class LocalServer:
    """A running local Chronicle."""

    url: str
    """Where this server listens, e.g. ``http://127.0.0.1:43123``."""
    tokens_file: Path
    state_dir: Path
    public_url: str
    """The base of its presigned disk-store URLs (``server.public_url`` or ``url``)."""
    local_token: str | None
    """The local user's token from the tokens file (what the daemon uses); if the file has
    none for ``user_<login>``, its first token."""
    _runner: web.AppRunner = field(repr=False)
    _listener: asyncio.Server = field(repr=False)
    _guard: ConnectionGuard = field(repr=False)
    _core: Core = field(repr=False)
    _pool: concurrent.futures.Executor = field(repr=False)
    _sweeper: asyncio.Task[None] = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def endpoint_file(self) -> Path:
        return self.state_dir / "endpoint.json"

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        self._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper
        try:
            self._listener.close()
            await self._runner.cleanup()
            self._guard.events.close()
        finally:
            await self._core.storage.close()
            await self._core.db.close()
            await loop.run_in_executor(self._pool, _remove_if_ours, self.endpoint_file, self.url)
            await asyncio.to_thread(self._pool.shutdown, True)


def _make_runner(core: Core) -> tuple[web.AppRunner, ConnectionGuard]:
    """The aiohttp runner and, in front of its protocol, the connection guard (cap, header
    timeout, rate-limited logging of refusals and malformed requests)."""
    cfg = core.config
    runner: web.AppRunner | None = None

    def protocol() -> asyncio.Protocol:
        assert runner is not None and runner.server is not None
        return runner.server()

    guard = ConnectionGuard(
        protocol,
        max_connections=cfg.max_connections,
        header_timeout_s=cfg.header_timeout_s,
        log_interval_s=cfg.log_interval_s,
    )
    runner = web.AppRunner(
        make_app(core),
        access_log_class=AccessLogger,
        access_log=logging.getLogger("agent.server.access"),
        logger=ServerLogger(guard.events),
        read_bufsize=READ_BUFSIZE,
        keepalive_timeout=cfg.keepalive_timeout_s,
        shutdown_timeout=2.0,
    )
    return runner, guard


async def start_server(settings: Settings, *, embedded: bool,
                       crash: CrashPoints | None = None) -> LocalServer:
    """Start the local Chronicle on the event loop that calls this.

    ``embedded``: listen on ``server.listen`` or an ephemeral loopback port; else the default
    is 127.0.0.1:8470. Either way state lives in ``settings.server_state_dir()`` and
    ``<state_dir>/endpoint.json`` (0600) tells clients where the server is. ``crash``: the
    embedding daemon's crash points (else ``debug.crash_point``'s, read here)."""
    cfg = settings.server
    state_dir = settings.server_state_dir()
    host, port = parse_listen(
        cfg.listen or ("127.0.0.1:0" if embedded else DEFAULT_STANDALONE_LISTEN)
    )
    tokens_file = cfg.tokens_file or state_dir / "tokens.json"
    # embedded: the ingest's hashing and writing run in the daemon's bulk threads (idle by
    # default, agent.bulk_policy); on its own, in ordinary threads
    pool: concurrent.futures.Executor = (
        BulkExecutor() if embedded
        else concurrent.futures.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="server-io"))
    loop = asyncio.get_running_loop()
    cleanup: contextlib.AsyncExitStack = contextlib.AsyncExitStack()
    cleanup.callback(pool.shutdown, False)
    try:

        def prepare() -> tuple[TokenStore, Signer, str]:
            prepare_state_dir(state_dir, "server state dir")  # 0700 and ours, or exit 2
            ensure_tokens_file(tokens_file)
            tokens = TokenStore(tokens_file)
            tokens.load()
            return tokens, Signer.load_or_create(state_dir / "signing.key"), _version()

        tokens, signer, version = await loop.run_in_executor(pool, prepare)
        storage = open_storage(cfg.storage, state_dir, signer, pool)
        database = Database(state_dir / "server.db")
        await database.open()
        cleanup.push_async_callback(database.close)
        if embedded and not cfg.listen:
            sock = await loop.run_in_executor(pool, _bind_again, host, state_dir / "last_port")
        else:
            sock = await loop.run_in_executor(pool, _bind, host, port)
        cleanup.callback(sock.close)
        url = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
        public_url = cfg.public_url.rstrip("/") or url
        await storage.start(public_url)
        cleanup.push_async_callback(storage.close)
        core = Core(cfg, database, storage, tokens, version, public_url,
                    server_id=signer.identity,
                    crash=crash or from_settings(settings.debug.crash_point, str(state_dir)))
        others = await storage.claim(core.server_id)
        if others:
            log.warning("%s is also used by %d other local server(s) (%s): the storage sweep "
                        "will not run on it (it would remove their objects); give each server "
                        "its own bucket or directory", storage.description, len(others),
                        ", ".join(others))
        await index_inline_texts(core)
        await expire_idle(core)  # a server that was down: before any uploader touches them
        runner, guard = _make_runner(core)
        await runner.setup()
        cleanup.push_async_callback(runner.cleanup)
        listener = await loop.create_server(guard, sock=sock, backlog=512)
        cleanup.callback(listener.close)
        await loop.run_in_executor(
            pool,
            _write_private_json,
            state_dir / "endpoint.json",
            {"url": url, "tokens_file": str(tokens_file)},
        )
    except BaseException:
        await cleanup.aclose()
        raise
    cleanup.pop_all()
    log.info("local Chronicle listening on %s (storage %s)", url, storage.description)
    sweeper = asyncio.create_task(housekeeping(core, state_dir), name="chronicle-sweep")
    return LocalServer(
        url=url,
        tokens_file=tokens_file,
        state_dir=state_dir,
        public_url=public_url,
        local_token=tokens.token_for(local_principal_id()) or tokens.first_token(),
        _runner=runner,
        _listener=listener,
        _guard=guard,
        _core=core,
        _pool=pool,
        _sweeper=sweeper,
    )


async def _serve(settings: Settings) -> int:
    server = await start_server(settings, embedded=False)
    print(f"url: {server.url}", flush=True)
    print(f"tokens_file: {server.tokens_file}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    return 0


def serve_forever(settings: Settings) -> int:
    """``chronicle-agent server``: run until SIGINT/SIGTERM. Exit code 0 on a clean stop,
    2 on a configuration error, 1 if the server cannot start (e.g. the port is taken)."""
    try:
        return asyncio.run(_serve(settings))
    except ConfigError as e:
        print(f"chronicle-agent server: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"chronicle-agent server: cannot start: {e}", file=sys.stderr)
        return 1
