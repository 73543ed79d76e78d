"""``chronicle-agent doctor``: every check against a real daemon, and a clear failure when
the daemon is down."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.helpers_daemon import DaemonProc
from tests.support.helpers_server import add_principal


def test_doctor_passes_against_a_running_daemon(any_daemon: DaemonProc) -> None:
    res = any_daemon.run_cli("doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    names = [line.split()[1] for line in res.stdout.splitlines()]
    assert names == ["config", "socket", "chronicle", "clock", "storage", "queue", "disk",
                     "inotify"]
    assert "credentials are user_" in res.stdout
    assert "use the daemon's own token" in res.stdout  # no token of the caller's own
    assert "FAIL" not in res.stdout
    storage = next(line for line in res.stdout.splitlines() if line.split()[1] == "storage")
    assert storage.startswith("ok"), storage  # the disk store, or SeaweedFS reached


def test_doctor_json_and_failure_when_the_daemon_is_down(daemon: DaemonProc) -> None:
    daemon.stop()
    res = daemon.run_cli("doctor", "--json")
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert report["ok"] is False
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["socket"]["status"] == "FAIL"
    assert "chronicle-agent daemon" in by_name["socket"]["detail"]
    # the embedded Chronicle stopped with its daemon: nothing to reach either
    assert by_name["chronicle"]["status"] == "FAIL"


def test_doctor_says_whose_credentials_uploads_use(daemon: DaemonProc) -> None:
    info = json.loads((daemon.state_dir / "server" / "endpoint.json").read_text())
    token = add_principal(Path(info["tokens_file"]), "user_alice")
    res = subprocess.run([sys.executable, "-m", "agent", "doctor"], capture_output=True,
                         text=True, timeout=120, check=False,
                         env={**daemon.env, "CHRONICLE_AGENT_CHRONICLE__TOKEN": token})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "uploads through the daemon are made as user_alice" in res.stdout
    assert token not in res.stdout + res.stderr


def test_doctor_checks_the_queue_database(daemon: DaemonProc) -> None:
    res = daemon.run_cli("doctor", "--json")
    queue = {c["name"]: c for c in json.loads(res.stdout)["checks"]}["queue"]
    assert queue["status"] == "ok", queue
    assert queue["path"] == str(daemon.state_dir / "queue.db")
    assert queue["quick_check"] == "ok" and queue["private"] is True
    assert queue["schema"] >= 4 and queue["size_bytes"] > 0
    line = next(ln for ln in daemon.run_cli("doctor").stdout.splitlines()
                if ln.split()[1] == "queue")
    assert line.startswith("ok") and "quick_check ok, private" in line, line
    daemon.stop()
    db = daemon.state_dir / "queue.db"
    db.chmod(0o644)  # as an older agent left it
    res = daemon.run_cli("doctor")
    line = next(ln for ln in res.stdout.splitlines() if ln.split()[1] == "queue")
    assert line.startswith("FAIL") and "readable by others: queue.db 0644" in line, line
    db.chmod(0o600)
    with open(db, "r+b") as f:  # a damaged page: past the header, into the tables
        f.seek(4096)
        f.write(b"\xff" * 8192)
    res = daemon.run_cli("doctor", "--json")
    queue = {c["name"]: c for c in json.loads(res.stdout)["checks"]}["queue"]
    assert res.returncode == 1 and queue["status"] == "FAIL", queue
    db.write_bytes(b"")
    res = daemon.run_cli("doctor")
    line = next(ln for ln in res.stdout.splitlines() if ln.split()[1] == "queue")
    assert line.startswith("FAIL") and "empty (0 bytes)" in line and "move" in line, line
