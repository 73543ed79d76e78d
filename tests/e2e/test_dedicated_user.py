"""The daemon as the dedicated-user drop-in runs it (systemd/dedicated-user.conf): a system
user of its own, holding CAP_SETUID and CAP_SETGID as ambient capabilities and nothing
else. It serves a second real user end to end (upload of that user's private file, a
download into that user's directory, owned by that user), refuses what that user cannot
read, and reads nothing of anyone's with rights of its own.

Neither user can run the test's virtual environment (it lives under a directory they may
not traverse, and its Python is root's), so the daemon runs on the system Python with a
world-readable copy of the agent and of its runtime dependencies (the installed files of
every distribution ``chronicle-agent`` requires, found from their metadata).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.e2e.test_two_users import PY, USER, as_tester, owned_by_tester, tester, world
from tests.support.helpers_daemon import DaemonProc, start_daemon

__all__ = ["tester", "world"]  # fixtures of the two-user tests, used here by name

DAEMON_USER = "ca-daemon"
CAPS = "+setuid,+setgid"


def copy_runtime_deps(dest: Path) -> None:
    """The installed files of every distribution the agent needs at run time (no extras),
    copied under ``dest``, world-readable."""
    seen: set[str] = set()
    todo = [str(r) for r in metadata.distribution("chronicle-agent").requires or []]
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)
        for f in dist.files or []:
            if str(f).startswith("..") or "__pycache__" in f.parts:
                continue
            src = Path(str(f.locate()))
            if src.is_file():
                out = dest / f
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out)
        todo += [str(r) for r in dist.requires or []]
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture(scope="module")
def daemon_user(tester: pwd.struct_passwd) -> Iterator[pwd.struct_passwd]:
    group = subprocess.run(["id", "-gn", USER], capture_output=True, text=True,
                           check=True).stdout.strip()
    created = False
    try:
        pw = pwd.getpwnam(DAEMON_USER)
    except KeyError:
        subprocess.run([shutil.which("useradd") or "/usr/sbin/useradd", "--system",
                        "--no-create-home", "--shell", "/usr/sbin/nologin", DAEMON_USER],
                       check=True)
        created = True
        pw = pwd.getpwnam(DAEMON_USER)
    # the socket's group: the daemon's user is a member, as `SupplementaryGroups=` would do
    subprocess.run([shutil.which("usermod") or "/usr/sbin/usermod", "-a", "-G", group,
                    DAEMON_USER], check=True)
    yield pw
    if created:
        subprocess.run([shutil.which("userdel") or "/usr/sbin/userdel", DAEMON_USER],
                       check=False)


@pytest.fixture(scope="module")
def deps(world: Path) -> Path:
    d = world / "deps"
    if not d.exists():
        copy_runtime_deps(d)
    return d


@pytest.fixture
def dedicated(daemon_user: pwd.struct_passwd, tester: pwd.struct_passwd, world: Path,
              deps: Path) -> Iterator[DaemonProc]:
    group = subprocess.run(["id", "-gn", USER], capture_output=True, text=True,
                           check=True).stdout.strip()
    home = world / "daemon-home"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(mode=0o755)
    os.chown(home, daemon_user.pw_uid, daemon_user.pw_gid)
    served = world / "served"
    served.mkdir(exist_ok=True, mode=0o755)
    env = {"CHRONICLE_AGENT_AGENT__STATE_DIR": str(home / "state"),
           "CHRONICLE_AGENT_SOCKET": str(home / "agent.sock"),
           "XDG_CONFIG_HOME": str(home / "cfg"),
           "HOME": str(home),
           "PYTHONPATH": f"{world / 'lib'}:{deps}",
           "CHRONICLE_AGENT_AGENT__SOCKET_GROUP": group,
           "CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES": "0"}
    wrap = ["setpriv", f"--reuid={DAEMON_USER}", f"--regid={DAEMON_USER}", "--init-groups",
            f"--inh-caps=-all,{CAPS}", f"--ambient-caps=-all,{CAPS}",
            f"--bounding-set=-all,{CAPS}", "--no-new-privs", "--"]
    with start_daemon(env, wrap=wrap, python=PY) as d:
        d.root.chmod(0o755)
        yield d


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_runs_as_its_own_user_with_only_setuid_and_setgid(
    dedicated: DaemonProc, daemon_user: pwd.struct_passwd
) -> None:
    assert dedicated.pid is not None
    st = status_of(dedicated.pid)
    assert st["Uid"].split()[1] == str(daemon_user.pw_uid)  # effective uid
    cap_eff = int(st["CapEff"], 16)
    assert cap_eff == (1 << 6) | (1 << 7), hex(cap_eff)  # CAP_SETGID, CAP_SETUID alone
    state = Path(dedicated.env["CHRONICLE_AGENT_AGENT__STATE_DIR"])
    assert state.stat().st_uid == daemon_user.pw_uid


def test_serves_another_user_end_to_end_as_that_user(
    dedicated: DaemonProc, world: Path, tester: pwd.struct_passwd
) -> None:
    mine = world / "served" / "ded-mine"
    mine.mkdir()
    owned_by_tester(mine, tester, 0o700)  # not even the daemon's user may look inside
    f = mine / "w.bin"
    f.write_bytes(os.urandom(300_000))
    owned_by_tester(f, tester, 0o600)
    status, job = as_tester(dedicated, world, "POST", "/v1/uploads",
                            {"path": str(mine), "asset_type": "checkpoint"})
    assert status == 200, job
    done = dedicated.client().wait_job(job["job_id"], 60)
    assert done["state"] == "done", (done, dedicated.log_tail())
    status, dl = as_tester(dedicated, world, "POST", "/v1/downloads",
                           {"asset_id": done["asset_id"], "dest": str(mine / "restored")})
    assert status == 200, dl
    final = dedicated.client().wait_job(dl["job_id"], 60)
    assert final["state"] == "done", (final, dedicated.log_tail())
    got = mine / "restored" / "w.bin"
    assert got.read_bytes() == f.read_bytes()
    for p in [mine / "restored", got]:
        assert p.lstat().st_uid == tester.pw_uid, p


def test_reads_nothing_with_rights_of_its_own(
    dedicated: DaemonProc, world: Path, tester: pwd.struct_passwd,
    daemon_user: pwd.struct_passwd
) -> None:
    """A file the daemon's own user may read, and the tester may not, is still refused."""
    theirs = world / "served" / "daemon-readable.bin"
    theirs.write_bytes(b"for the daemon's user only")
    os.chown(theirs, daemon_user.pw_uid, daemon_user.pw_gid)
    theirs.chmod(0o600)
    status, err = as_tester(dedicated, world, "POST", "/v1/uploads",
                            {"path": str(theirs), "asset_type": "checkpoint"})
    assert status == 403 and err["code"] == "forbidden", err
    assert "Traceback" not in dedicated.log_text()
