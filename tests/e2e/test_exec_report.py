"""``chronicle-agent exec`` says what happened: the run id at the start, a summary of the
run's checkpoints at the end, and the command's real exit status even when the wrapper
itself is killed. Real daemon, real wrapper, real child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from agent.errors import ApiError
from tests.e2e.test_exec import CHILD, exec_cli
from tests.support.helpers_daemon import DaemonProc
from tests.support.helpers_watch import daemon_run, script, wait_until, watch_daemon, writer_env


def test_exec_quiet_prints_neither_the_run_id_nor_the_summary(tmp_path: Path) -> None:
    """(Both lines are checked in tests/e2e/test_runs_view.py, with the run's fates.)"""
    child = script(tmp_path, "train.py", CHILD)
    with watch_daemon() as d:
        def args(out: Path) -> tuple[str, ...]:
            return ("--watch", str(out), "--seal", "marker", "--quiescence-s", "1", "--",
                    sys.executable, str(child), str(out), str(tmp_path / "seen.json"), "0")
        quiet = exec_cli(writer_env(d), "--run", "run_quiet", "--quiet", *args(tmp_path / "o1"))
        assert quiet.returncode == 0
        assert "run_quiet" not in quiet.stderr, quiet.stderr
        assert daemon_run(d, "run_quiet")["status"] == "finished"
        said = exec_cli(writer_env(d), "--run", "run_said", *args(tmp_path / "o2"))
        assert said.returncode == 0
        lines = said.stderr.splitlines()
        assert lines[0] == "chronicle-agent: run run_said"
        assert lines[-1].startswith("chronicle-agent: run run_said finished: 2 checkpoints "
                                    "sealed"), said.stderr


SLEEPER = """
    import json, os, signal, sys, time
    seen, go = sys.argv[1], sys.argv[2]
    caught = []
    def note(signum, frame):
        caught.append(signal.Signals(signum).name)
        with open(seen + ".signals.tmp", "w") as f:
            json.dump(caught, f)
        os.replace(seen + ".signals.tmp", seen + ".signals")
        if signum == signal.SIGTERM:
            sys.exit(7)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(s, note)
    with open(seen + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid()}, f)
    os.replace(seen + ".tmp", seen)
    while not os.path.exists(go):
        time.sleep(0.05)
    sys.exit(int(open(go).read()))
"""


def _spawn_exec(env: dict[str, str], tmp: Path, run_id: str, child: Path
                ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    seen, go = tmp / f"{run_id}.json", tmp / f"{run_id}.go"
    log = open(tmp / f"{run_id}.log", "wb")  # noqa: SIM115 — the wrapper's stderr, a file:
    with log:                                # the reporter outlives it and may still write
        wrapper = subprocess.Popen(
            [sys.executable, "-m", "agent", "exec", "--run", run_id, "--", sys.executable,
             str(child), str(seen), str(go)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    return wrapper, seen, go


def _registered(d: DaemonProc, run_id: str) -> int | None:
    """The pid the run was registered with, None while it is not registered."""
    try:
        return int(daemon_run(d, run_id)["pid"])
    except ApiError:
        return None


def test_a_killed_wrapper_still_ends_the_run_with_the_commands_real_status(
        tmp_path: Path) -> None:
    child = script(tmp_path, "train.py", SLEEPER)
    with watch_daemon() as d:
        env = writer_env(d)
        started = {rid: _spawn_exec(env, tmp_path, rid, child)
                   for rid in ("run_k_ok", "run_k_fail", "run_k_sig")}
        pids: dict[str, int] = {}
        try:
            for rid, (wrapper, seen, _go) in started.items():
                wait_until(seen.exists, 30, f"{rid}'s command started")
                info = json.loads(seen.read_text())
                pids[rid] = info["pid"]
                assert info["ppid"] != wrapper.pid  # the reporter is its parent
                wait_until(lambda rid=rid: _registered(d, rid) == pids[rid], 30,
                           f"{rid} registered")
                wrapper.kill()  # SIGKILL: no handler, no last word
                assert wrapper.wait(timeout=30) == -signal.SIGKILL
            for rid in started:  # the wrapper's death is not the run's
                assert daemon_run(d, rid)["state"] == "running", daemon_run(d, rid)
            started["run_k_ok"][2].write_text("0")
            started["run_k_fail"][2].write_text("3")
            os.kill(pids["run_k_sig"], signal.SIGKILL)

            def ended(rid: str) -> dict[str, object] | None:
                run = daemon_run(d, rid)
                return run if run["state"] in ("ending", "ended") else None
            ok = wait_until(lambda: ended("run_k_ok"), 30, "run_k_ok ended")
            assert (ok["status"], ok["exit_code"]) == ("finished", 0)
            failed = wait_until(lambda: ended("run_k_fail"), 30, "run_k_fail ended")
            assert (failed["status"], failed["exit_code"]) == ("failed", 3)
            crashed = wait_until(lambda: ended("run_k_sig"), 30, "run_k_sig ended")
            assert (crashed["status"], crashed["exit_code"]) == ("crashed", 128 + 9)
        finally:
            for _wrapper, _seen, go in started.values():
                go.write_text("0")  # nothing is left running
            for wrapper, _seen, _go in started.values():
                if wrapper.poll() is None:
                    wrapper.kill()
                    wrapper.wait()


def test_signals_to_the_wrapper_reach_the_command(tmp_path: Path) -> None:
    child = script(tmp_path, "train.py", SLEEPER)
    with watch_daemon() as d:
        wrapper, seen, go = _spawn_exec(writer_env(d), tmp_path, "run_sigs", child)
        try:
            wait_until(seen.exists, 30, "the command started")
            got = Path(str(seen) + ".signals")
            for sig in (signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
                wrapper.send_signal(sig)
                wait_until(lambda sig=sig: got.exists() and sig.name in json.loads(
                    got.read_text()), 30, f"{sig.name} passed on")
            wrapper.send_signal(signal.SIGTERM)
            assert wrapper.wait(timeout=30) == 7  # the command's code, through both
            assert json.loads(got.read_text()) == ["SIGUSR1", "SIGINT", "SIGHUP", "SIGTERM"]
            run = wait_until(lambda: (r := daemon_run(d, "run_sigs"))["status"] and r, 30,
                             "run_sigs ended")
            assert (run["status"], run["exit_code"]) == ("failed", 7)
        finally:
            go.write_text("0")
            if wrapper.poll() is None:
                wrapper.kill()
                wrapper.wait()
