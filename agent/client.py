"""The socket client: HTTP/1.1 + JSON over the daemon's Unix socket, standard library only.

Used by the CLI and by :class:`agent.Run` inside training processes, so it must stay cheap to
import: no aiohttp, no pydantic, no event loop. Every call opens its own connection (a Unix
socket connect costs microseconds, and a daemon restarted between two calls is then no
special case).

Errors: a socket that is missing, refuses, or breaks before answering →
:class:`~agent.errors.DaemonUnreachable` (naming the socket and what to do); a non-2xx answer →
:class:`~agent.errors.ApiError` built from the body ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from agent.errors import ApiError, DaemonUnreachable, RunEnded, UsageError
from agent.paths import SOCKET_ENV, fallback_socket_path

log = logging.getLogger(__name__)


TERMINAL_STATES = frozenset({"done", "failed", "cancelled", "abandoned", "lost"})
SERVER_WAIT_S = 30.0
"""Longest single ``/wait`` call; longer waits loop over several."""
UNREACHABLE_GRACE_S = 10.0
"""How long :meth:`SocketClient.wait_job` rides out a daemon restart before giving up."""


def default_socket_path() -> Path:
    """The socket, resolved as :func:`agent.config.resolve_socket_path` does, without importing
    pydantic: ``$CHRONICLE_AGENT_SOCKET`` > ``agent.socket_path`` (environment, then the TOML
    file) > ``/run/chronicle-agent/agent.sock`` for root >
    ``$XDG_RUNTIME_DIR/chronicle-agent/agent.sock`` > ``/tmp/chronicle-agent-$UID/agent.sock``."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    configured = os.environ.get("CHRONICLE_AGENT_AGENT__SOCKET_PATH") or _socket_from_toml()
    if configured:
        return Path(configured)
    return fallback_socket_path()


def caller_token() -> str | None:
    """This process's own Chronicle token, as the CLI finds it (without pydantic):
    ``$CHRONICLE_AGENT_CHRONICLE__TOKEN`` > ``chronicle.token_file`` (environment, then the
    TOML file); None when neither is set (the daemon then uses its own token)."""
    token = os.environ.get("CHRONICLE_AGENT_CHRONICLE__TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("CHRONICLE_AGENT_CHRONICLE__TOKEN_FILE") or _from_toml(
        "chronicle", "token_file")
    if not path:
        return None
    try:
        return Path(path).expanduser().read_text("utf-8").strip() or None
    except OSError as e:
        raise UsageError(f"chronicle.token_file = {path!r}: cannot read it ({e.strerror})"
                         ) from None


def _socket_from_toml() -> str | None:
    return _from_toml("agent", "socket_path")


def _from_toml(section_name: str, key: str) -> str | None:
    env = os.environ.get("CHRONICLE_AGENT_CONFIG")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/etc/chronicle-agent/config.toml")
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        path = Path(base) / "chronicle-agent" / "config.toml"
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None  # the daemon and the CLI report a broken file; a client just falls back
    section = data.get(section_name)
    value = section.get(key) if isinstance(section, dict) else None
    return value if isinstance(value, str) and value else None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _ConnectFailed(Exception):
    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.exc = exc


class SocketClient:
    """Synchronous client of the daemon's socket API."""

    def __init__(self, socket_path: Path | str | None = None, timeout_s: float = 30,
                 token: str | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path()
        self.timeout_s = timeout_s
        self._token = token
        """The caller's own Chronicle token, sent with every call: what the daemon does for
        this caller, it does as the caller (docs/security.md)."""

    def __repr__(self) -> str:
        return f"SocketClient({str(self.socket_path)!r})"

    # ---- the transport ---------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One call: JSON body in, decoded JSON object out. A daemon busy reading other
        callers' bodies (503 ``busy``) is asked again after its Retry-After, within the
        timeout."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._request_once(method, path, body, timeout)
            except ApiError as e:
                if e.status != 503 or e.code != "busy" or time.monotonic() + 1 > deadline:
                    raise
            time.sleep(0.5 + random.random())

    def _request_once(
        self, method: str, path: str, body: dict[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        try:
            payload = None if body is None else json.dumps(body, default=_placeholder)
            payload_bytes = payload.encode("utf-8") if payload is not None else None
        except (TypeError, ValueError) as e:
            raise UsageError(f"{method} {path}: the request is not JSON ({e})") from None
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if payload_bytes is not None:
            headers["Content-Type"] = "application/json"
        conn = _UnixConnection(self.socket_path, timeout)
        try:
            try:
                conn.connect()
            except OSError as e:
                raise _ConnectFailed(e) from e
            conn.request(method, path, body=payload_bytes, headers=headers)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read()
        except _ConnectFailed as e:
            raise self._unreachable(e.exc) from None
        except TimeoutError:
            raise DaemonUnreachable(
                f"the chronicle-agent daemon on {self.socket_path} did not answer "
                f"{method} {path} within {timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise DaemonUnreachable(
                f"the connection to the chronicle-agent daemon on {self.socket_path} broke "
                f"during {method} {path} ({type(e).__name__}: {e}); is the daemon restarting?"
            ) from None
        finally:
            conn.close()
        return _decode(status, raw, method, path)

    def _unreachable(self, exc: OSError) -> DaemonUnreachable:
        where = str(self.socket_path)
        if isinstance(exc, PermissionError):
            return DaemonUnreachable(
                f"permission denied on the chronicle-agent socket {where}: ask for membership "
                "of the socket's group, or point CHRONICLE_AGENT_SOCKET at a socket you can use"
            )
        if isinstance(exc, FileNotFoundError):
            what = "no chronicle-agent daemon socket at"
        elif isinstance(exc, ConnectionRefusedError):
            what = "no chronicle-agent daemon is listening on"
        else:
            what = f"cannot connect ({exc.strerror or exc}) to the chronicle-agent socket"
        return DaemonUnreachable(
            f"{what} {where}: start it with `chronicle-agent daemon` "
            "(or check CHRONICLE_AGENT_SOCKET)"
        )

    # ---- the API -----------------------------------------------------------------------

    def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.request("GET", "/v1/health", timeout_s=timeout_s)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{path_segment(job_id)}")

    def list_jobs(
        self, run_id: str | None = None, state: str | None = None
    ) -> list[dict[str, Any]]:
        query = {k: v for k, v in (("run_id", run_id), ("state", state)) if v}
        path = "/v1/jobs" + (f"?{urlencode(query)}" if query else "")
        jobs = self.request("GET", path).get("jobs", [])
        return list(jobs) if isinstance(jobs, list) else []

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{path_segment(job_id)}/cancel")

    def retry_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{path_segment(job_id)}/retry")

    def wait_job(
        self,
        job_id: str,
        timeout_s: float | None = None,
        *,
        unreachable_grace_s: float = UNREACHABLE_GRACE_S,
    ) -> dict[str, Any]:
        """Block until the job is terminal and return it; ``TimeoutError`` past ``timeout_s``
        (None = no limit). Loops over bounded server-side waits, and rides out a daemon that
        is briefly unreachable (a restart) for up to ``unreachable_grace_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        unreachable_since: float | None = None
        while True:
            wait_s = SERVER_WAIT_S
            if deadline is not None:
                wait_s = max(0.0, min(wait_s, deadline - time.monotonic()))
            try:
                job = self.request(
                    "GET",
                    f"/v1/jobs/{path_segment(job_id)}/wait?timeout_s={wait_s:.3f}",
                    timeout_s=wait_s + max(self.timeout_s, 10.0),
                )
                unreachable_since = None
            except DaemonUnreachable:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= unreachable_grace_s:
                    raise
                if deadline is not None and now >= deadline:
                    raise
                time.sleep(0.5)
                continue
            if job.get("state") in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {job_id} is still {job.get('state')} after {timeout_s:g} s"
                )


def _placeholder(value: Any) -> Any:
    """``...`` (the guide's ``"key_findings": [...]``) is sent as the string "..."; anything
    else that is not JSON stays an error."""
    if value is Ellipsis:
        return "..."
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def path_segment(value: str) -> str:
    """One URL path segment."""
    return quote(str(value), safe="")


def _decode(status: int, raw: bytes, method: str, path: str) -> dict[str, Any]:
    try:
        data: Any = json.loads(raw) if raw else {}
    except ValueError:
        data = None
    if 200 <= status < 300:
        if not isinstance(data, dict):
            raise ApiError(
                status, "bad_response", f"{method} {path}: the daemon answered non-JSON"
            )
        return data
    code, message = f"http_{status}", f"{method} {path}: the daemon answered HTTP {status}"
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        code = str(err.get("code") or code)
        message = str(err.get("message") or message)
    raise (RunEnded if code == RunEnded.code else ApiError)(status, code, message)
