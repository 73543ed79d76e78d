"""``chronicle-agent exec``: run a training command as a child, as one run.

1. The daemon must answer before the child starts (else exit 3, and the command never runs).
2. The command runs with ``METHODIC_RUN_ID`` and ``CHRONICLE_AGENT_SOCKET`` in its
   environment, so that ``Run()`` inside it joins this run and finds this daemon. The
   wrapper prints ``chronicle-agent: run <id>`` on stderr first.
3. Three processes: the **wrapper** (what the user started and may kill) forks the
   **reporter**, which starts the **command** as its own child. The reporter registers the
   run with the command's pid and the ``--watch`` rules (the daemon follows the command's
   life with a pidfd, and knows that the reporter reports the exit status).
4. When the command exits, the reporter (its parent: the one process that learns its exit
   status) finishes the run with it (exit 0 → ``finished``, another code → ``failed``,
   killed by a signal → ``crashed``) and exits with its code (128 + N for signal N). The
   wrapper, which only waited for the reporter, waits (at most ``SUMMARY_WAIT_S``) for the
   daemon's end-of-run processing, prints a one-line summary of the run's checkpoints and
   exits with that code: uploads go on in the daemon.

A wrapper killed outright (SIGKILL) takes nothing with it: the reporter and the command
go on, and the run still ends with the command's real status.

Signals: SIGTERM, SIGHUP, SIGUSR1, SIGUSR2 (and SIGINT when not from a terminal, which
sends it to the command itself) are passed on, wrapper → reporter → command; each passes
them only to its own child, whose pid cannot be reused before it is reaped.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
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
SUMMARY_WAIT_S = 5.0
"""How long the wrapper waits for the daemon's end-of-run processing before its summary."""
_GLOB = re.compile(r"[*?\[]")
_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_PASSED = (*_FORWARDED, signal.SIGINT)


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
             rules: list[dict[str, Any]], on_exit: str | None, err: TextIO,
             quiet: bool = False) -> int:
    """The wrapper: start the reporter (which starts the command), pass signals on to it,
    wait for it, print the run's summary, exit with the command's code."""
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
    if not quiet:
        _say(err, f"chronicle-agent: run {rid}")
    signals = threading.current_thread() is threading.main_thread()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _PASSED) if signals else set()
    for stream in (err, sys.stdout, sys.stderr):  # nothing buffered is written twice
        stream.flush()
    reporter = os.fork()
    if reporter == 0:  # the reporter: never returns into the caller's code
        code = 70
        try:
            code = _report(client, command, env, rid, rules, on_exit, err, signals, mask)
        except BaseException as e:  # noqa: BLE001 — whatever it is, exit with a code
            _say(err, f"chronicle-agent: exec: reporter: {type(e).__name__}: {e}")
        finally:
            for stream in (err, sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(reporter, signum)  # our child until we reap it: never another process

    old: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    try:
        if signals:
            for sig in _FORWARDED:
                old[sig] = signal.signal(sig, forward)
            old[signal.SIGINT] = signal.signal(
                signal.SIGINT, signal.SIG_IGN if _from_terminal() else forward)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _pid, status = os.waitpid(reporter, 0)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if signals:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    code = os.waitstatus_to_exitcode(status)
    exit_code = code if code >= 0 else 128 - code
    if not quiet:
        _summary(client, rid, exit_code, err)
    return exit_code


def _report(client: SocketClient, command: list[str], env: dict[str, str], rid: str,
            rules: list[dict[str, Any]], on_exit: str | None, err: TextIO, signals: bool,
            mask: set[int | signal.Signals]) -> int:
    """The reporter, in its own process: the command's parent, so that it learns the
    command's exit status (a pidfd does not give it to the daemon), and outlives a wrapper
    that is killed. Registers the run with the command's pid, keeps a lease alive,
    finishes the run with the status, exits with the command's code."""
    holder: list[subprocess.Popen[bytes]] = []
    early: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if not holder:
            early.append(signum)  # before the command exists: sent once it does
            return
        with contextlib.suppress(ProcessLookupError):
            holder[0].send_signal(signum)  # nothing once it is reaped

    def ignore(_signum: int, _frame: FrameType | None) -> None:
        """SIGINT from the terminal went to the command too; a handler, not SIG_IGN,
        which the command would inherit."""

    if signals:
        for sig in _FORWARDED:
            signal.signal(sig, forward)
        signal.signal(signal.SIGINT, ignore if _from_terminal() else forward)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        holder.append(subprocess.Popen(command, env=env))
    except FileNotFoundError:
        _say(err, f"chronicle-agent: exec: command not found: {command[0]}")
        return 127
    except PermissionError:
        _say(err, f"chronicle-agent: exec: permission denied: {command[0]}")
        return 126
    child = holder[0]
    for signum in early:
        forward(signum, None)
    stop = threading.Event()
    body: dict[str, Any] = {"run_id": rid, "pid": child.pid, "exec": True, "watch": rules}
    if on_exit:
        body["on_exit"] = on_exit
    try:
        info = client.request("POST", "/v1/runs", body)
    except AgentError as e:
        _say(err, f"chronicle-agent: exec: warning: could not register run {rid}: {e}; the "
             "command runs anyway")
        info = {}
    if info.get("liveness") == "lease":  # the daemon cannot see our pids
        lease = float(info.get("lease_s") or 60)
        threading.Thread(target=_heartbeats, args=(client, rid, lease / 3, stop),
                         daemon=True).start()
    try:
        code = child.wait()
    finally:
        stop.set()
    status = "finished" if code == 0 else ("crashed" if code < 0 else "failed")
    exit_code = code if code >= 0 else 128 - code
    if info:
        _finish(client, rid, status, exit_code, err)
    return exit_code


def _refuse_ended(client: SocketClient, rid: str) -> None:
    """A run id of a run that has ended is a usage error before the command starts."""
    from agent.cli_runs import get_run

    try:
        run = get_run(client, rid, timeout_s=10)
    except ApiError as e:
        if e.status == 404:  # a new run
            return
        raise
    if run.get("state") != "running":
        how = f"{run.get('status') or 'crashed'}, state {run.get('state')}"
        raise UsageError(f"run {rid} has already ended ({how}); the command was not started: "
                         "give --run (or METHODIC_RUN_ID) a new id, or none", code="run_ended")


def _say(err: TextIO, text: str) -> None:
    """One line on stderr; a reader that went away (a killed wrapper's pipe) is no error."""
    with contextlib.suppress(OSError, ValueError):
        print(visible(text), file=err, flush=True)


def _summary(client: SocketClient, rid: str, exit_code: int, err: TextIO) -> None:
    """Once the daemon has done the run's end-of-run processing (its final scan; bounded
    by SUMMARY_WAIT_S, uploads are never waited for): one line of what became of its
    checkpoints."""
    from agent.cli_runs import get_run, summary

    deadline = time.monotonic() + SUMMARY_WAIT_S
    try:
        while True:
            run = get_run(client, rid, timeout_s=5)
            if run.get("settled") or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    except AgentError:
        return  # never registered, or the daemon is gone: the warnings said so
    status = run.get("status") or f"exited {exit_code}"
    _say(err, f"chronicle-agent: run {rid} {status}: {summary(run.get('checkpoint_counts') or {})}")


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
