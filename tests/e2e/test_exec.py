"""``chronicle-agent exec``: a real child script under a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.helpers_e2e import chronicle_for
from tests.support.helpers_watch import (
    by_checkpoint,
    daemon_run,
    run_status,
    script,
    wait_until,
    watch_daemon,
    writer_env,
)

CHILD = """
    import json, os, random, sys, time
    out, seen, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(seen, "w") as f:
        json.dump({k: os.environ.get(k) for k in ("METHODIC_RUN_ID", "CHRONICLE_AGENT_SOCKET")}
                  | {"pid": os.getpid()}, f)
    for step in (1, 2, 3):
        d = os.path.join(out, f"step-{step}")
        os.makedirs(d)
        with open(os.path.join(d, "w.bin"), "wb") as f:
            f.write(random.Random(step).randbytes(400_000))
        if step < 3:  # step 3 is left half written
            open(os.path.join(d, "_SUCCESS"), "w").close()
        time.sleep(0.2)
    if code < 0:
        os.kill(os.getpid(), -code)
    sys.exit(code)
"""


def exec_cli(d_env: dict[str, str], *args: str, timeout_s: float = 60
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "exec", *args], env=d_env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def test_exec_child_fails_and_its_sealed_checkpoints_are_ready(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = script(tmp_path, "train.py", CHILD)
    seen = tmp_path / "seen.json"
    with watch_daemon() as d:
        env = writer_env(d)
        t0 = time.monotonic()
        r = exec_cli(env, "--run", "run_exec", "--watch", str(out), "--type", "checkpoint",
                     "--seal", "marker", "--", sys.executable, str(child), str(out), str(seen),
                     "3")
        assert r.returncode == 3, (r.stdout, r.stderr)  # the child's exit code
        assert time.monotonic() - t0 < 8
        env_seen = json.loads(seen.read_text())
        assert env_seen["METHODIC_RUN_ID"] == "run_exec"
        assert env_seen["CHRONICLE_AGENT_SOCKET"] == str(d.socket_path)
        run = daemon_run(d, "run_exec")
        assert run["pid"] == env_seen["pid"] and run["status"] == "failed"
        assert run["exit_code"] == 3

        def settled() -> dict[str, list[dict[str, object]]] | None:
            per = by_checkpoint(d, "run_exec")
            if len(per) == 3 and all(v[0]["state"] in ("done", "abandoned")
                                     for v in per.values()):
                return per
            return None
        per = wait_until(settled, 30, "three checkpoints settled")
        assert [per[str(out / f"step-{i}")][0]["state"] for i in (1, 2, 3)] == [
            "done", "done", "abandoned"]
        chron = chronicle_for(d)
        wait_until(lambda: run_status(chron, "run_exec") == "failed", 10, "run ended failed")
        assert sorted(a.state for a in chron.assets.list(output_of="run_exec")) == [
            "ready", "ready"]


def test_exec_exit_status_and_signals(tmp_path: Path) -> None:
    child = script(tmp_path, "train.py", CHILD)
    with watch_daemon() as d:
        env = writer_env(d)
        ok = exec_cli(env, "--run", "run_ok", "--", sys.executable, str(child),
                      str(tmp_path / "o1"), str(tmp_path / "s1"), "0")
        assert ok.returncode == 0, ok.stderr
        killed = exec_cli(env, "--run", "run_sig", "--", sys.executable, str(child),
                          str(tmp_path / "o2"), str(tmp_path / "s2"), "-9")
        assert killed.returncode == 128 + 9, killed.stderr
        chron = chronicle_for(d)
        wait_until(lambda: run_status(chron, "run_ok") == "finished", 10, "run_ok finished")
        wait_until(lambda: run_status(chron, "run_sig") == "crashed", 10, "run_sig crashed")
        missing = exec_cli(env, "--", str(tmp_path / "no-such-command"))
        assert missing.returncode == 127 and "not found" in missing.stderr
        usage = exec_cli(env, "--watch", "a", "--watch", "b", "--type", "x", "--type", "y",
                         "--type", "z", "--", "true")
        assert usage.returncode == 2


def test_exec_with_no_daemon_exits_3_and_never_starts_the_child(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    env = writer_env(CHRONICLE_AGENT_SOCKET=str(tmp_path / "nobody.sock"),
                     XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    r = exec_cli(env, "--", sys.executable, "-c",
                 f"open({str(marker)!r}, 'w').close()")
    assert r.returncode == 3, r.stderr
    assert "daemon" in r.stderr
    assert not os.path.exists(marker)
