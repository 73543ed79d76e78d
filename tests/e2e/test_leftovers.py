"""An interrupted test session leaves no process behind: a small pytest session
in a subprocess starts SeaweedFS (``weed``, in a session of its own) and a daemon, and is
then interrupted (SIGINT) or killed outright (SIGKILL, no teardown at all); afterwards none
of the processes it started, nor anything else carrying its session token, is alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support.helpers_daemon import REPO_ROOT, clean_env
from tests.support.procguard import SESSION_ENV, marked, tokens_of

INNER = '''
import json, os, time
from pathlib import Path

def test_hold(seaweed, daemon):
    Path(os.environ["LEFTOVERS_MARK"]).write_text(
        json.dumps({"weed": seaweed.proc.pid, "daemon": daemon.pid}))
    time.sleep(3600)
'''
START_TIMEOUT_S = 180.0
GONE_TIMEOUT_S = 90.0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_session_leaves_no_process(sig: signal.Signals, tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    mark = tmp_path / "started.json"
    env = clean_env()
    env["LEFTOVERS_MARK"] = str(mark)
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(tmp_path), "-q", str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not mark.exists():
            if inner.poll() is not None or time.monotonic() > deadline:
                inner.kill()
                out = inner.communicate()[0].decode(errors="replace")
                raise AssertionError(f"the inner session did not start its processes:\n{out}")
            time.sleep(0.2)
        started = json.loads(mark.read_text())
        children = psutil.Process(inner.pid).children(recursive=True)
        pids = {p.pid for p in children}
        assert {started["weed"], started["daemon"]} <= pids, (started, pids)
        token = tokens_of(started["daemon"])[-1]
        assert token in tokens_of(started["weed"])  # weed, in its own session, carries it
        assert token not in (os.environ.get(SESSION_ENV) or "").split(":")

        os.kill(inner.pid, sig)
        inner.communicate(timeout=GONE_TIMEOUT_S)
        _gone, alive = psutil.wait_procs(children, timeout=GONE_TIMEOUT_S)
        assert alive == [], [(p.pid, p.cmdline()) for p in alive]
        assert marked(token) == []
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()


def test_the_guard_sweeps_what_a_session_leaves(tmp_path: Path) -> None:
    """The guard alone: a process that escaped into its own session, carrying the token,
    is stopped when the pipe closes; one without the token is left alone."""
    env = clean_env()
    env.pop(SESSION_ENV, None)
    script = ("import subprocess, sys, time; from tests.support import procguard as g; "
              "guard = g.install(); "
              "marked = subprocess.Popen(['sleep', '600'], start_new_session=True); "
              "print(marked.pid, flush=True); time.sleep(600)")
    other = subprocess.Popen(["sleep", "600"], env=env, start_new_session=True)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        escaped = psutil.Process(int(proc.stdout.readline()))
        proc.kill()  # no teardown, no finish(): only the guard
        proc.wait()
        escaped.wait(GONE_TIMEOUT_S)
        assert not escaped.is_running()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
