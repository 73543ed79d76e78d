"""``chronicle-agent exec``: run a training command as a child, as one run.

1. The daemon must answer before the child starts (else exit 3, and the command never runs).
2. The child runs with ``METHODIC_RUN_ID`` and ``CHRONICLE_AGENT_SOCKET`` in its
   environment, so that ``Run()`` inside it joins this run and finds this daemon.
3. The run is registered with the child's pid and the ``--watch`` rules; the daemon follows
   the child's life with a pidfd (and knows this wrapper reports the exit status).
4. When the child exits, the run is finished with its status (exit 0 → ``finished``,
   another code → ``failed``, killed by a signal → ``crashed``) and the wrapper exits at once
   with the child's code (128 + N for signal N): uploads go on in the daemon.

Signals: SIGTERM, SIGHUP, SIGUSR1, SIGUSR2 (and SIGINT when not from a terminal, which
sends it to the child itself) are passed on to the child.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

from agent.client import SocketClient, path_segment
from agent.errors import AgentError, ApiError, DaemonUnreachable, UsageError
from agent.paths import SOCKET_ENV
from agent.termsafe import visible

RUN_ID_ENV = "METHODIC_RUN_ID"
FINISH_RETRY_S = 5.0
_GLOB = re.compile(r"[*?\[]")
_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def watch_glob(path: str) -> str:
    """``--watch DIR``: every entry of DIR is a checkpoint (a glob is taken as it is)."""
    p = os.path.abspath(os.path.expanduser(path))
    return p if _GLOB.search(p) else p.rstrip("/") + "/*"


def rules_from_args(dirs: list[str], types: list[str], extra: dict[str, Any]) -> list[
        dict[str, Any]]:
    if types and len(types) not in (1, len(dirs)):
        raise UsageError(f"give one --type for every --watch ({len(dirs)}), or a single one "
                         "for all")
    out = []
    for i, d in enumerate(dirs):
        t = types[i] if len(types) == len(dirs) else (types[0] if types else "checkpoint")
        out.append({"path": watch_glob(d), "asset_type": t, **extra})
    return out


def _from_terminal() -> bool:
    try:
        return os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def run_exec(client: SocketClient, command: list[str], *, run_id: str | None,
             rules: list[dict[str, Any]], on_exit: str | None, err: TextIO) -> int:
    if not command:
        raise UsageError("exec needs a command: chronicle-agent exec [options] -- COMMAND…")
    client.health(timeout_s=10)  # DaemonUnreachable → exit 3, before the child starts
    rid = run_id or os.environ.get(RUN_ID_ENV)
    if rid:
        _refuse_ended(client, rid)
    else:
        rid = f"run_{secrets.token_hex(8)}"
    env = dict(os.environ)
    env[RUN_ID_ENV] = rid
    env[SOCKET_ENV] = str(client.socket_path.absolute())
    try:
        child = subprocess.Popen(command, env=env)
    except FileNotFoundError:
        print(visible(f"chronicle-agent: exec: command not found: {command[0]}"), file=err)
        return 127
    except PermissionError:
        print(visible(f"chronicle-agent: exec: permission denied: {command[0]}"), file=err)
        return 126

    def forward(signum: int, _frame: FrameType | None) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    old: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _FORWARDED:
            old[sig] = signal.signal(sig, forward)
        old[signal.SIGINT] = signal.signal(
            signal.SIGINT, signal.SIG_IGN if _from_terminal() else forward)
    stop = threading.Event()
    try:
        body: dict[str, Any] = {"run_id": rid, "pid": child.pid, "exec": True,
                                "watch": rules}
        if on_exit:
            body["on_exit"] = on_exit
        try:
            info = client.request("POST", "/v1/runs", body)
        except AgentError as e:
            print(visible(f"chronicle-agent: exec: warning: could not register run {rid}: {e}; "
                          "the command runs anyway"), file=err)
            info = {}
        if info.get("liveness") == "lease":  # the daemon cannot see our pids
            lease = float(info.get("lease_s") or 60)
            threading.Thread(target=_heartbeats, args=(client, rid, lease / 3, stop),
                             daemon=True).start()
        code = child.wait()
    finally:
        stop.set()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    status = "finished" if code == 0 else ("crashed" if code < 0 else "failed")
    exit_code = code if code >= 0 else 128 - code
    if info:
        _finish(client, rid, status, exit_code, err)
    return exit_code


def _refuse_ended(client: SocketClient, rid: str) -> None:
    """A run id of a run that has ended is a usage error before the command starts."""
    try:
        run = client.request("GET", f"/v1/runs/{path_segment(rid)}", timeout_s=10)
    except ApiError as e:
        if e.status == 404:  # a new run
            return
        raise
    if run.get("state") != "running":
        how = f"{run.get('status') or 'crashed'}, state {run.get('state')}"
        raise UsageError(f"run {rid} has already ended ({how}); the command was not started: "
                         "give --run (or METHODIC_RUN_ID) a new id, or none", code="run_ended")


def _heartbeats(client: SocketClient, rid: str, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            client.request("POST", f"/v1/runs/{path_segment(rid)}/heartbeat", {})
        except AgentError:
            pass


def _finish(client: SocketClient, rid: str, status: str, exit_code: int, err: TextIO) -> None:
    """Report the end; ride out a daemon restart briefly, never hold the exit for long."""
    deadline = time.monotonic() + FINISH_RETRY_S
    while True:
        try:
            client.request("POST", f"/v1/runs/{path_segment(rid)}/finish",
                           {"status": status, "exit_code": exit_code}, timeout_s=5)
            return
        except DaemonUnreachable as e:
            if time.monotonic() >= deadline:
                print(visible(f"chronicle-agent: exec: warning: could not finish run {rid}: "
                              f"{e}"), file=err)
                return
            time.sleep(0.25)
        except AgentError as e:
            print(visible(f"chronicle-agent: exec: warning: could not finish run {rid}: {e}"),
                  file=err)
            return
