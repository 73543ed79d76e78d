"""Start a real ``chronicle-agent daemon`` process for tests.

Everything lives in one short temp dir (AF_UNIX paths are limited to 107 bytes)::

    /tmp/ca-XXXX/agent.sock         the socket (CHRONICLE_AGENT_SOCKET)
    /tmp/ca-XXXX/state/             agent.state_dir (the embedded server under state/server)
    /tmp/ca-XXXX/cfg/chronicle-agent/config.toml   XDG_CONFIG_HOME: no user config leaks in
    /tmp/ca-XXXX/daemon.log         the daemon's stdout and stderr (appended across restarts)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from agent.client import SocketClient
from agent.errors import ApiError, DaemonUnreachable

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_LEAKY_ENV = ("CHRONICLE_AGENT_", "METHODIC_RUN_ID", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET",
              "WATCHDOG_", "LISTEN_")


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without anything that would point a child at another daemon."""
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key.startswith(_LEAKY_ENV):
            del env[key]
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


class DaemonProc:
    """A daemon process and its directories. A context manager: stops and cleans up."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        # the environment's paths (a test may move them), else the usual ones under root
        self.socket_path = Path(env.get("CHRONICLE_AGENT_SOCKET") or root / "agent.sock")
        self.state_dir = Path(env.get("CHRONICLE_AGENT_AGENT__STATE_DIR") or root / "state")
        self.config_dir = Path(env.get("XDG_CONFIG_HOME") or root / "cfg") / "chronicle-agent"
        self.log_path = root / "daemon.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.wrap: list[str] = []
        """A command the daemon runs under (e.g. setpriv with the unit's capabilities)."""
        self.python = sys.executable

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<DaemonProc pid={pid} root={self.root}>"

    # ---- process control ------------------------------------------------------------

    def start(self, timeout_s: float = START_TIMEOUT_S) -> DaemonProc:
        if self.running:
            raise RuntimeError(f"daemon already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrap, self.python, "-m", "agent", "daemon"],
                env=self.env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_healthy(timeout_s)
        return self

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
        client = self.client(timeout_s=2)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode} during start:\n{self.log_tail()}"
                )
            try:
                return client.health()
            except (DaemonUnreachable, ApiError):
                pass
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"daemon did not answer /v1/health within {timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM and wait (SIGKILL if it does not stop in time); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(
                    f"daemon ignored SIGTERM for {timeout_s:g} s:\n{self.log_tail()}"
                ) from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, for recovery tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> DaemonProc:
        """Start again with the same directories (stopping it first if it runs)."""
        if self.running:
            self.stop()
        return self.start(timeout_s)

    # ---- talking to it --------------------------------------------------------------

    def client(self, timeout_s: float = 30) -> SocketClient:
        return SocketClient(self.socket_path, timeout_s=timeout_s)

    def run_cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """``python -m agent ARGS`` as a subprocess pointed at this daemon."""
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- cleanup --------------------------------------------------------------------

    def close(self, remove: bool = True) -> None:
        try:
            self.stop()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.kill()
            if remove:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DaemonProc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
            if exc_type is None:  # a failing test's own error comes first
                self.assert_no_secrets_logged()
        finally:
            self.close()

    def secrets_known(self) -> list[str]:
        """Tokens this daemon could have seen: the embedded server's tokens file (every
        principal a test added), the token in its environment."""
        found = [self.env.get("CHRONICLE_AGENT_CHRONICLE__TOKEN", "")]
        with contextlib.suppress(OSError, ValueError, KeyError):
            found += json.loads((self.state_dir / "server" / "tokens.json").read_text())["tokens"]
        return [t for t in found if len(t) >= 8]

    def assert_no_secrets_logged(self) -> None:
        """The daemon's whole log (at debug level, the default here) holds no token and no
        part of a presigned URL's signature, whatever path the test took."""
        log = self.log_text()
        for pattern in SECRET_PATTERNS:
            m = re.search(pattern, log)
            assert m is None, f"the daemon logged a secret ({pattern}): {m[0][:60]!r}"
        for token in self.secrets_known():
            assert token not in log, "the daemon logged a Chronicle token"


SECRET_PATTERNS = (
    r"(?i)Signature=[0-9a-z%]{8,}",  # the disk store's and S3's query-string signatures
    r"(?i)X-Amz-Credential=[0-9a-z%]",
    r"(?i)Authorization: *Bearer +[^\s*<]{8,}",
)
"""What a presigned URL's or a request's credentials look like in a log line; redacted
forms (``Signature=<redacted>``, a token's first characters) do not match."""


def start_daemon(
    extra_env: dict[str, str] | None = None,
    config_toml: str | None = None,
    *,
    timeout_s: float = START_TIMEOUT_S,
    wrap: list[str] | None = None,
    python: str | None = None,
) -> DaemonProc:
    """Start a daemon in a fresh short temp dir and wait until ``/v1/health`` answers."""
    root = Path(tempfile.mkdtemp(prefix="ca-", dir="/tmp"))
    env = clean_env()
    env.update(
        {
            "CHRONICLE_AGENT_AGENT__STATE_DIR": str(root / "state"),
            "CHRONICLE_AGENT_SOCKET": str(root / "agent.sock"),
            "XDG_CONFIG_HOME": str(root / "cfg"),
            # Test daemons keep the runner's priority: an idle I/O class behind a busy CI
            # machine's other writers would only make timings noisy (test_priority.py
            # checks the defaults).
            "CHRONICLE_AGENT_AGENT__NICE": "0",
            "CHRONICLE_AGENT_AGENT__IO_CLASS": "unchanged",
            # nor do they hold back for the other processes of a test (a storage server,
            # a writer, a second daemon): test_yield.py turns it on where it is the point
            "CHRONICLE_AGENT_AGENT__BUSY_CPU_FRACTION": "0",
            # every line it can write, for the check of its log at the end (__exit__)
            "CHRONICLE_AGENT_LOG__LEVEL": "debug",
        }
    )
    env.update(extra_env or {})
    d = DaemonProc(root, env)
    d.wrap = list(wrap or [])
    d.python = python or sys.executable
    d.config_dir.mkdir(parents=True)
    if config_toml is not None:
        (d.config_dir / "config.toml").write_text(config_toml)
    try:
        return d.start(timeout_s)
    except BaseException:
        d.close()
        raise


# ---- a scripted stand-in, for the client's own unit tests -----------------------------------

Route = Callable[["Request"], tuple[int, Any]]


@dataclass
class Request:
    method: str
    path: str
    """Without the query string."""
    query: dict[str, str]
    body: Any


class FakeDaemon:
    """A real HTTP/1.1 server on a real Unix socket that answers from a table of routes, for
    testing what the client sends and how it maps answers (the real daemon cannot be made to
    answer a 500 with an HTML body on demand). Routes map ``(method, path)`` to
    ``(status, body)`` or to a function of the :class:`Request` returning one; ``body`` is
    JSON-encoded unless it is ``bytes``. Unknown routes answer 404 ``not_found``."""

    def __init__(self, routes: dict[tuple[str, str], tuple[int, Any] | Route] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="ca-", dir="/tmp"))
        self.socket_path = self.root / "fake.sock"
        self.routes: dict[tuple[str, str], tuple[int, Any] | Route] = dict(routes or {})
        self.requests: list[Request] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _handle(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                req = Request(
                    self.command,
                    split.path,
                    dict(parse_qsl(split.query)),
                    json.loads(raw) if raw else None,
                )
                fake.requests.append(req)
                route = fake.routes.get((req.method, req.path))
                if route is None:
                    answer: tuple[int, Any] = (
                        404, {"error": {"code": "not_found", "message": f"no route {req.path}"}}
                    )
                elif callable(route):
                    answer = route(req)
                else:
                    answer = route
                status, body = answer
                if status == 0:  # hang up without answering
                    self.close_connection = True
                    return
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                ctype = "text/html" if isinstance(body, bytes) else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True
            block_on_close = False

        self._server = Server(str(self.socket_path), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def client(self, timeout_s: float = 5) -> SocketClient:
        return SocketClient(self.socket_path, timeout_s=timeout_s)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FakeDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
