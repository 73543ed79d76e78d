"""Every process a test session starts dies with the session, however the session ends.

Ctrl-C (SIGINT) lets pytest tear its fixtures down, which stops what they started; SIGTERM
and SIGKILL of pytest (or pytest-timeout's hard exit) run no teardown at all, and ``weed``
(SeaweedFS) runs in a session of its own, so not even a signal to pytest's process group
reaches it. So, at the start of a session, :func:`install`

- marks this process's environment with a session token (``CHRONICLE_TEST_SESSIONS``, a
  ``:``-separated list, so a session started inside another carries both), which every
  process the tests start inherits, and their children, and theirs (daemons, servers, weed,
  fault proxies, ``exec`` children, CLI runs);
- starts a guard: this file as a script, in its own session, reading a pipe from pytest.

When the pipe closes (at the end of the session, through :func:`finish`, or because pytest
died in any way at all) the guard sends SIGTERM to every process whose environment carries
the token, gives them a few seconds, and SIGKILLs the rest, until none is left. It reads the
environments from ``/proc/<pid>/environ``, which a process's own user (or root) can read, and
that also finds processes that changed their credentials (no parent-death signal survives
that). Standard library only: it runs as a plain script.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

SESSION_ENV = "CHRONICLE_TEST_SESSIONS"
TERM_GRACE_S = 3.0
FINISH_TIMEOUT_S = 60.0


def install() -> subprocess.Popen[bytes]:
    """Mark this session's environment and start its guard; returns the guard."""
    token = secrets.token_hex(8)
    outer = os.environ.get(SESSION_ENV, "")
    env = dict(os.environ)  # the guard carries the outer sessions' tokens, not its own
    if not outer:
        env.pop(SESSION_ENV, None)
    guard = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), token],
                             stdin=subprocess.PIPE, env=env, start_new_session=True,
                             close_fds=True)
    os.environ[SESSION_ENV] = f"{outer}:{token}" if outer else token
    return guard


def session_env() -> dict[str, str]:
    """The session mark, for a child given an environment built from scratch."""
    value = os.environ.get(SESSION_ENV)
    return {SESSION_ENV: value} if value else {}


def finish(guard: subprocess.Popen[bytes]) -> None:
    """The session ends: the guard sweeps what is left, and this waits for it."""
    if guard.stdin is not None:
        guard.stdin.close()
    try:
        guard.wait(FINISH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        guard.kill()
        guard.wait()


def tokens_of(pid: int) -> list[str]:
    """The session tokens in a process's environment (none: not ours, gone, or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return []
    prefix = SESSION_ENV.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace").split(":")
    return []


def marked(token: str) -> list[int]:
    """The live processes that carry ``token``."""
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and int(p) != me and token in tokens_of(int(p))]


def sweep(token: str) -> int:
    """SIGTERM everything that carries ``token``, then SIGKILL what is left, until nothing
    is; returns how many processes were found."""
    found: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGKILL):
        pids = marked(token)
        if not pids:
            break
        found.update(pids)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + TERM_GRACE_S
        while marked(token) and time.monotonic() < deadline:
            time.sleep(0.05)
    return len(found)


def main(token: str) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # outlive the session
        signal.signal(sig, signal.SIG_IGN)
    while sys.stdin.buffer.read(65536):
        pass
    n = sweep(token)
    if n:
        print(f"procguard: stopped {n} process(es) the test session left behind",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
