"""Two real users against one daemon running as root: the confused-deputy guard, roots and
symlinks, download destinations, and jobs that belong to the uid that made them.

The test creates a system user (``useradd``) and runs the training-side client as that user
with the system Python (``runuser``), importing the agent from a world-readable copy: the
test's own virtual environment lives under a directory the second user may not traverse.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_e2e import chronicle_for
from tests.support.helpers_server import add_principal
from tests.support.procguard import session_env

USER = "ca-tester"
REPO = Path(__file__).resolve().parents[2]
PY = "/usr/bin/python3"  # the system Python: any user may run it
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


@pytest.fixture(scope="module")
def tester() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.fail("the two-user tests need root (to create a user and run the daemon)")
    if not os.access(PY, os.X_OK):
        pytest.fail(f"{PY} is missing: the second user needs a system Python "
                    "(Debian's python3; .ci/run installs it)")
    created = False
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run([useradd, "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", USER], check=True)
        created = True
        pw = pwd.getpwnam(USER)
    yield pw
    if created:
        subprocess.run([shutil.which("userdel") or "/usr/sbin/userdel", USER], check=False)


@pytest.fixture(scope="module")
def world(tester: pwd.struct_passwd) -> Iterator[Path]:
    """A world-traversable dir with a copy of the agent package and the users' files."""
    root = Path(tempfile.mkdtemp(prefix="ca-2u-", dir="/tmp"))
    root.chmod(0o755)
    shutil.copytree(REPO / "agent", root / "lib" / "agent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for p in (root / "lib").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (root / "lib").chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon2(tester: pwd.struct_passwd, world: Path) -> Iterator[DaemonProc]:
    group = subprocess.run(["id", "-gn", USER], capture_output=True, text=True,
                           check=True).stdout.strip()
    env = {"CHRONICLE_AGENT_AGENT__SOCKET_GROUP": group,
           "CHRONICLE_AGENT_AGENT__ROOTS": json.dumps([str(world / "served")])}
    (world / "served").mkdir(exist_ok=True, mode=0o755)
    with start_daemon(env) as d:
        d.root.chmod(0o755)  # the socket's directory: traversable; the socket: 0660 + group
        yield d


def as_tester(daemon: DaemonProc, world: Path, method: str, path: str,
              body: dict[str, Any] | None = None, token: str | None = None
              ) -> tuple[int, Any]:
    """One socket call made by the test user (with its own Chronicle ``token``, if
    given); (HTTP status or 0, the answer)."""
    code = f"""
import json, sys
sys.path.insert(0, {str(world / 'lib')!r})
from agent.client import SocketClient
from agent.errors import ApiError
try:
    out = SocketClient({str(daemon.socket_path)!r}, token=sys.stdin.read() or None).request(
        {method!r}, {path!r}, {body!r})
    print(json.dumps([200, out]))
except ApiError as e:
    print(json.dumps([e.status, {{"code": e.code, "message": e.message}}]))
"""
    res = subprocess.run([RUNUSER, "-u", USER, "--", PY, "-c", code], capture_output=True,
                         text=True, timeout=60, check=False,
                         env={"PATH": "/usr/bin:/bin", **session_env()},
                         input=token or "")
    assert res.returncode == 0, res.stderr
    status, answer = json.loads(res.stdout)
    return int(status), answer


def owned_by_tester(path: Path, tester: pwd.struct_passwd, mode: int) -> Path:
    os.chown(path, tester.pw_uid, tester.pw_gid)
    path.chmod(mode)
    return path


def test_the_socket_is_group_shared_and_the_tester_uploads_its_own_file(
    daemon2: DaemonProc, world: Path, tester: pwd.struct_passwd
) -> None:
    st = daemon2.socket_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == tester.pw_gid
    f = world / "served" / "mine.bin"
    f.write_bytes(os.urandom(4096))
    owned_by_tester(f, tester, 0o600)
    status, job = as_tester(daemon2, world, "POST", "/v1/uploads",
                            {"path": str(f), "asset_type": "checkpoint"})
    assert status == 200, job
    final = daemon2.client().wait_job(job["job_id"], 60)
    assert final["state"] == "done", final


def test_confused_deputy_a_file_only_root_can_read_is_refused(
    daemon2: DaemonProc, world: Path
) -> None:
    secret = world / "served" / "root-only.key"
    secret.write_bytes(b"root's secret")
    secret.chmod(0o600)  # owned by root, the daemon's user
    status, err = as_tester(daemon2, world, "POST", "/v1/uploads",
                            {"path": str(secret), "asset_type": "checkpoint"})
    assert status == 403 and err["code"] == "forbidden", err
    assert "cannot read" in err["message"]
    # … nor as a component of a three-step flow
    status, info = as_tester(daemon2, world, "POST", "/v1/assets/presigned",
                             {"asset_type": "checkpoint", "components": ["k"]})
    assert status == 200, info
    status, err = as_tester(daemon2, world, "POST", f"/v1/assets/{info['asset_id']}/components",
                            {"name": "k", "path": str(secret)})
    assert status == 403 and "cannot read" in err["message"], err


def test_a_directory_with_one_unreadable_file_does_not_upload(
    daemon2: DaemonProc, world: Path, tester: pwd.struct_passwd
) -> None:
    d = world / "served" / "ckpt"
    d.mkdir()
    owned_by_tester(d, tester, 0o755)
    (d / "ok.bin").write_bytes(b"fine")
    (d / "ok.bin").chmod(0o644)
    (d / "private.bin").write_bytes(b"root only")
    (d / "private.bin").chmod(0o600)
    status, job = as_tester(daemon2, world, "POST", "/v1/uploads",
                            {"path": str(d), "asset_type": "checkpoint"})
    assert status == 200, job
    final = daemon2.client().wait_job(job["job_id"], 60)
    assert final["state"] == "failed" and final["error"]["code"] == "forbidden", final
    assert "private.bin" in final["error"]["message"]


def test_roots_and_symlinks_that_leave_them(daemon2: DaemonProc, world: Path,
                                            tester: pwd.struct_passwd) -> None:
    outside = world / "outside.bin"
    outside.write_bytes(b"x")
    owned_by_tester(outside, tester, 0o644)
    status, err = as_tester(daemon2, world, "POST", "/v1/uploads",
                            {"path": str(outside), "asset_type": "checkpoint"})
    assert status == 403 and "outside" in err["message"], err
    link = world / "served" / "sneaky.bin"
    link.symlink_to(outside)
    status, err = as_tester(daemon2, world, "POST", "/v1/uploads",
                            {"path": str(link), "asset_type": "checkpoint"})
    assert status == 403 and "outside" in err["message"], err


def test_download_destination_must_be_writable_by_the_caller(
    daemon2: DaemonProc, world: Path
) -> None:
    locked = world / "served" / "locked"
    locked.mkdir(mode=0o755)  # root's, not writable by the tester
    status, err = as_tester(daemon2, world, "POST", "/v1/downloads",
                            {"asset_id": "ast_x", "dest": str(locked / "dl")})
    assert status == 403 and "cannot write" in err["message"], err


def test_jobs_belong_to_the_uid_that_made_them(daemon2: DaemonProc, world: Path) -> None:
    f = world / "served" / "roots.bin"
    f.write_bytes(b"root's upload")
    job = daemon2.client().request("POST", "/v1/uploads",
                                   {"path": str(f), "asset_type": "checkpoint"})
    for method, path in (("GET", f"/v1/jobs/{job['job_id']}"),
                         ("POST", f"/v1/jobs/{job['job_id']}/cancel"),
                         ("POST", f"/v1/jobs/{job['job_id']}/retry")):
        status, err = as_tester(daemon2, world, method, path)
        assert status == 404 and err["code"] == "not_found", (method, path, err)
    status, listed = as_tester(daemon2, world, "GET", "/v1/jobs")
    assert status == 200 and job["job_id"] not in {j["job_id"] for j in listed["jobs"]}
    # root sees it, and every job
    assert daemon2.client().get_job(job["job_id"])["job_id"] == job["job_id"]


def test_python_used_for_the_second_user_is_not_the_venv() -> None:
    assert not PY.startswith(sys.prefix), "the second user cannot run the test venv"


def uploaded_by_root(daemon: DaemonProc, src: Path) -> str:
    """``src`` (a directory root made) uploaded through the daemon: the asset id."""
    job = daemon.client().request("POST", "/v1/uploads",
                                  {"path": str(src), "asset_type": "checkpoint"})
    final = daemon.client().wait_job(job["job_id"], 60)
    assert final["state"] == "done", final
    return str(final["asset_id"])


def dir_of_tester(path: Path, tester: pwd.struct_passwd) -> Path:
    """A new directory the tester owns (0755)."""
    path.mkdir()
    return owned_by_tester(path, tester, 0o755)


def test_downloads_belong_to_the_caller(
    daemon2: DaemonProc, world: Path, tester: pwd.struct_passwd
) -> None:
    src = world / "served" / "model"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(100_000))
    (src / "sub").mkdir()
    (src / "sub" / "cfg.json").write_text("{}")
    asset_id = uploaded_by_root(daemon2, src)
    home = dir_of_tester(world / "served" / "tester-home", tester)
    status, dl = as_tester(daemon2, world, "POST", "/v1/downloads",
                           {"asset_id": asset_id, "dest": str(home / "restored")})
    assert status == 200, dl
    final = daemon2.client().wait_job(dl["job_id"], 60)
    assert final["state"] == "done", final
    for p in [home / "restored", *(home / "restored").rglob("*")]:
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (tester.pw_uid, tester.pw_gid), p


def test_missing_parents_are_made_as_the_caller_never_through_a_symlink(
    daemon2: DaemonProc, world: Path, tester: pwd.struct_passwd
) -> None:
    """A destination whose parents do not exist: they are made as the caller (theirs, 0700),
    never as root, never outside agent.roots, never through a symlink."""
    src = world / "served" / "nested-src"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(50_000))
    aid = uploaded_by_root(daemon2, src)
    home = dir_of_tester(world / "served" / "nest-home", tester)

    status, dl = as_tester(daemon2, world, "POST", "/v1/downloads",
                           {"asset_id": aid, "dest": str(home / "a" / "b" / "c")})
    assert status == 200, dl
    assert daemon2.client().wait_job(dl["job_id"], 60)["state"] == "done"
    for p in (home / "a", home / "a" / "b", home / "a" / "b" / "c",
              home / "a" / "b" / "c" / "w.bin"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (tester.pw_uid, tester.pw_gid), p
    assert stat.S_IMODE((home / "a").stat().st_mode) == 0o700

    # where the tester may not create anything: refused, nothing made (root could have)
    locked = world / "served" / "nest-locked"
    locked.mkdir(mode=0o755)
    status, err = as_tester(daemon2, world, "POST", "/v1/downloads",
                            {"asset_id": aid, "dest": str(locked / "x" / "y")})
    assert status == 403 and "cannot create" in err["message"], err
    assert not (locked / "x").exists()

    # a symlink out of agent.roots, to a directory the tester could write: refused as such
    outside = dir_of_tester(world / "nest-outside", tester)
    (home / "out").symlink_to(outside)
    status, err = as_tester(daemon2, world, "POST", "/v1/downloads",
                            {"asset_id": aid, "dest": str(home / "out" / "p" / "q")})
    assert status == 403 and "outside" in err["message"], err
    assert list(outside.iterdir()) == []

    # a dangling symlink where a missing parent is to be made: never followed
    (home / "dangling").symlink_to(world / "served" / "nest-target")
    status, err = as_tester(daemon2, world, "POST", "/v1/downloads",
                            {"asset_id": aid, "dest": str(home / "dangling" / "q" / "r")})
    assert status == 400 and "symlink" in err["message"], err
    assert not (world / "served" / "nest-target").exists()
    assert daemon2.client().list_jobs(state="queued") == []


def test_runs_belong_to_the_uid_that_made_them(daemon2: DaemonProc, world: Path) -> None:
    daemon2.client().request("POST", "/v1/runs", {"run_id": "run_of_root", "lease": True})
    for method, path, body in (("GET", "/v1/runs/run_of_root", None),
                               ("POST", "/v1/runs/run_of_root/heartbeat", None),
                               ("POST", "/v1/runs/run_of_root/finish", {"status": "failed"})):
        status, err = as_tester(daemon2, world, method, path, body)
        assert status == 404 and err["code"] == "not_found", (method, path, err)
    status, err = as_tester(daemon2, world, "POST", "/v1/runs",
                            {"run_id": "run_of_root", "lease": True})
    assert status == 403 and err["code"] == "forbidden", err
    status, mine = as_tester(daemon2, world, "POST", "/v1/runs",
                             {"run_id": "run_of_tester", "lease": True})
    assert status == 200 and mine["state"] == "running", mine
    status, listed = as_tester(daemon2, world, "GET", "/v1/runs")
    assert [r["run_id"] for r in listed["runs"]] == ["run_of_tester"]
    assert daemon2.client().request("GET", "/v1/runs/run_of_root")["state"] == "running"
    # root sees every run and may end any
    everyone = {r["run_id"] for r in daemon2.client().request("GET", "/v1/runs")["runs"]}
    assert {"run_of_root", "run_of_tester"} <= everyone
    ended = daemon2.client().request("POST", "/v1/runs/run_of_tester/finish",
                                     {"status": "finished"})
    assert ended["state"] in ("ending", "ended"), ended


def test_a_user_uploads_with_their_own_chronicle_token(
    daemon2: DaemonProc, world: Path, tester: pwd.struct_passwd
) -> None:
    """The daemon runs as root with its own token; the tester sends theirs, so the asset
    is created by (and manageable by) the tester's principal, and the daemon keeps the
    token only in its 0600 queue database."""
    info = json.loads((daemon2.state_dir / "server" / "endpoint.json").read_text())
    token = add_principal(Path(info["tokens_file"]), f"user_{USER}")
    f = world / "served" / "theirs.bin"
    f.write_bytes(os.urandom(10_000))
    owned_by_tester(f, tester, 0o600)
    status, job = as_tester(daemon2, world, "POST", "/v1/uploads",
                            {"path": str(f), "asset_type": "checkpoint"}, token=token)
    assert status == 200, job
    final = daemon2.client().wait_job(job["job_id"], 60)
    assert final["state"] == "done", final
    theirs = chronicle_for(daemon2, token)
    asset = theirs.assets.get(str(final["asset_id"]))
    assert asset.created_by == f"user_{USER}"
    theirs.assets.deprecate(asset.asset_id, reason="the tester manages their own asset")
    queue_db = daemon2.state_dir / "queue.db"
    assert stat.S_IMODE(queue_db.stat().st_mode) == 0o600 and queue_db.stat().st_uid == 0
    assert token not in daemon2.log_text()
