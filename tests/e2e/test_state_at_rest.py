"""The daemon's state at rest: a private state dir (tightened when it was left 0755), every
file in it private from its creation (the queue's -wal and -shm included, which hold callers'
tokens), a second real user reading none of it; a state dir that cannot be used, or a queue
database that is empty or not SQLite, stops the start with one line."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import SocketClient
from tests.e2e.test_credentials import alice_token
from tests.e2e.test_two_users import RUNUSER, USER, tester  # noqa: F401  (the fixture)
from tests.support.helpers_daemon import DaemonProc, clean_env, start_daemon


def walk(root: Path) -> list[Path]:
    out = [root]
    for dirpath, dirs, files in os.walk(root):
        out += [Path(dirpath) / n for n in dirs + files]
    return out


def test_state_files_are_private_and_a_second_user_reads_none(
    tester: object, tmp_path: Path,  # noqa: F811
) -> None:
    state = Path(tempfile.mkdtemp(prefix="ca-st-", dir="/tmp")) / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # as an operator's `mkdir` (umask 022) would leave it
    state.parent.chmod(0o755)  # the second user may reach the state dir itself
    f = tmp_path / "ckpt.bin"
    f.write_bytes(os.urandom(100_000))
    try:
        with start_daemon({"CHRONICLE_AGENT_AGENT__STATE_DIR": str(state)}) as d:
            d.state_dir = state
            token = alice_token(d)
            # the helper rewrote the tokens file with the test's own umask: as an operator
            # editing it would, put its mode back (the server creates it 0600)
            (state / "server" / "tokens.json").chmod(0o600)
            client = SocketClient(d.socket_path, token=token)
            job = client.request("POST", "/v1/uploads",
                                 {"path": str(f), "asset_type": "checkpoint"})
            assert client.wait_job(job["job_id"], 60)["state"] == "done"
            wal = state / "queue.db-wal"
            assert wal.exists() and (state / "queue.db-shm").exists()
            held = b"".join(p.read_bytes() for p in (state / "queue.db", wal))
            assert token.encode() in held  # the secret this is about is in these files
            assert (state / "server" / "server.db-wal").exists()
            loose = [f"{p} {stat.S_IMODE(p.lstat().st_mode):04o}" for p in walk(state)
                     if stat.S_IMODE(p.lstat().st_mode) & 0o077]
            assert not loose, loose
            assert stat.S_IMODE(state.stat().st_mode) == 0o700
            for p in walk(state):  # a second real user opens none of them
                probe = (["test", "-r", str(p)] if p.is_file() else ["ls", str(p)])
                res = subprocess.run([RUNUSER, "-u", USER, "--", *probe],
                                     capture_output=True, check=False)
                assert res.returncode != 0, f"{USER} can read {p}"
    finally:
        shutil.rmtree(state.parent, ignore_errors=True)


def test_a_state_dir_owned_by_another_user_is_refused_in_one_line(
    tester: object, tmp_path: Path,  # noqa: F811
) -> None:
    import pwd

    state = tmp_path / "theirs"
    state.mkdir(mode=0o700)
    pw = pwd.getpwnam(USER)
    os.chown(state, pw.pw_uid, pw.pw_gid)
    res = run_daemon_cli(tmp_path, state)
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert str(state) in line and f"owned by uid {pw.pw_uid}" in line, line


# ---- cannot start ---------------------------------------------------------------------------


def run_daemon_cli(root: Path, state: Path, *args: str,
                   command: str = "daemon") -> subprocess.CompletedProcess[str]:
    env = clean_env()
    env.update({"CHRONICLE_AGENT_AGENT__STATE_DIR": str(state),
                "CHRONICLE_AGENT_SOCKET": str(root / "agent.sock"),
                "XDG_CONFIG_HOME": str(root / "cfg"),
                "CHRONICLE_AGENT_AGENT__NICE": "0",
                "CHRONICLE_AGENT_AGENT__IO_CLASS": "unchanged"})
    return subprocess.run([sys.executable, "-m", "agent", command, *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines()
             if " ERROR " in ln or ln.startswith("chronicle-agent")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def read_only_dir() -> Iterator[Path]:
    """An empty directory on a read-only bind mount (root ignores chmod 0500)."""
    where = Path(tempfile.mkdtemp(prefix="ca-ro-", dir="/tmp"))
    for cmd in (["mount", "--bind", str(where), str(where)],
                ["mount", "-o", "remount,ro,bind", str(where)]):
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", str(where)], check=False, capture_output=True)
            where.rmdir()
            pytest.fail(f"cannot make a read-only bind mount (needs root): {res.stderr}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def test_a_read_only_state_dir_stops_the_daemon_with_one_line(
    read_only_dir: Path, tmp_path: Path
) -> None:
    res = run_daemon_cli(tmp_path, read_only_dir)
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert str(read_only_dir) in line and "read-only" in line, line
    # a state dir to create under a read-only directory: the same
    res = run_daemon_cli(tmp_path, read_only_dir / "sub" / "state")
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert str(read_only_dir / "sub" / "state") in line and "read-only" in line, line


def test_a_read_only_state_dir_stops_the_standalone_server_with_one_line(
    read_only_dir: Path, tmp_path: Path
) -> None:
    res = run_daemon_cli(tmp_path, tmp_path / "unused", "--state-dir", str(read_only_dir),
                         "--listen", "127.0.0.1:0", command="server")
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert str(read_only_dir) in line and "read-only" in line, line


def test_the_standalone_server_keeps_its_state_private(tmp_path: Path) -> None:
    state = tmp_path / "srv"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    env = clean_env()
    env["XDG_CONFIG_HOME"] = str(tmp_path / "cfg")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "server", "--state-dir", str(state), "--listen",
         "127.0.0.1:0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(50):  # it prints its URL and tokens file once it serves
            if "tokens" in proc.stdout.readline():
                break
        assert (state / "server.db").exists()
        loose = [f"{p} {stat.S_IMODE(p.lstat().st_mode):04o}" for p in walk(state)
                 if stat.S_IMODE(p.lstat().st_mode) & 0o077]
        assert not loose, loose
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("content, says", [
    (b"", "is empty (0 bytes)"),
    (b"these are not the rows you are looking for\n" * 200, "is not an SQLite database"),
])
def test_an_empty_or_foreign_queue_db_is_refused_and_kept(
    tmp_path: Path, content: bytes, says: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "queue.db").write_bytes(content)
    res = run_daemon_cli(tmp_path, state)
    assert res.returncode == 1, res.stderr
    line = one_error_line(res.stderr)
    assert says in line and "move" in line and str(state / "queue.db") in line, line
    assert (state / "queue.db").read_bytes() == content  # not replaced by an empty queue


def test_a_restart_on_a_good_queue_still_starts(tmp_path: Path) -> None:
    """The refusals above are not refusing our own database: stop and start again."""
    with start_daemon() as d:
        d.stop()
        d.start()
        assert isinstance(d, DaemonProc) and d.running


def test_under_the_daemons_umask_shared_claims_keep_their_modes(tmp_path: Path) -> None:
    """The daemon's umask 077 makes its own files private; the staging claims other agents
    read under a watched root keep 0755 directories and 0644 files."""
    from agent.statedir import PRIVATE_UMASK
    from agent.watch.staging import Staging

    (tmp_path / "state").mkdir()
    old = os.umask(PRIVATE_UMASK)
    try:
        staging = Staging(tmp_path / "state", max_bytes=0)
        base = tmp_path / "root" / ".chronicle-staging"
        assert staging.claim(str(base), "watch:r:/p@v1", "/p") is None
    finally:
        os.umask(old)
    claim = next((base / "claims").iterdir())
    assert stat.S_IMODE(claim.stat().st_mode) == 0o644
    for d in (base, base / "claims"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    assert stat.S_IMODE((tmp_path / "state" / "agent_id").stat().st_mode) == 0o600
