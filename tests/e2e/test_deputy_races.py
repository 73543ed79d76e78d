"""A second real user attacks the root daemon with swap loops, at every entry point where a
path of theirs reaches it: an upload of a file and of a directory, a component of the
three-step flow, a watched run directory, and a download's staging directory. None may
read a byte that user could not read, or create or change anything outside that user's own
reach. The daemon runs as plain root and under the shipped unit's capability set.

The attacker is one process of the second user (``runuser``, the system Python, the agent
imported from a world-readable copy): it flips symlinks or renames directories in a loop
while it makes its requests and for a while after, so that the daemon's worker and watcher
meet the swapped paths long after the request was accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_two_users import PY, RUNUSER, USER, owned_by_tester, tester, world
from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_e2e import chronicle_for
from tests.support.procguard import session_env

__all__ = ["tester", "world"]  # fixtures of the two-user tests, used here by name

SIZE = 64 * 1024
SECRET = (b"ROOT-ONLY-SECRET-" * (SIZE // 17 + 1))[:SIZE]
MINE = (b"the-testers-own-" * (SIZE // 16 + 1))[:SIZE]
HARDENED = ["setpriv", "--bounding-set=-all,+setuid,+setgid,+dac_read_search,+chown",
            "--inh-caps=-all", "--no-new-privs", "--"]
"""The shipped system unit's capabilities (systemd/chronicle-agent.service)."""


def _guarded(world: Path, caps: str, cache_bytes: int) -> Iterator[DaemonProc]:
    group = subprocess.run(["id", "-gn", USER], capture_output=True, text=True,
                           check=True).stdout.strip()
    served = world / "served"
    if served.exists():
        shutil.rmtree(served)
    served.mkdir(mode=0o755)
    env = {"CHRONICLE_AGENT_AGENT__SOCKET_GROUP": group,
           "CHRONICLE_AGENT_AGENT__ROOTS": json.dumps([str(served)]),
           "CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES": str(cache_bytes)}
    wrap = HARDENED if caps != "root" else None
    with start_daemon(env, wrap=wrap) as d:
        d.root.chmod(0o755)
        yield d


@pytest.fixture(params=["root", "hardened-unit-caps"])
def guarded(request: pytest.FixtureRequest, tester: pwd.struct_passwd,
            world: Path) -> Iterator[DaemonProc]:
    yield from _guarded(world, request.param, 0)


@pytest.fixture(params=[(caps, cache) for caps in ("root", "hardened-unit-caps")
                        for cache in ("no-cache", "node-cache")],
                ids=lambda p: "-".join(p))
def guarded_dl(request: pytest.FixtureRequest, tester: pwd.struct_passwd,
               world: Path) -> Iterator[DaemonProc]:
    """For downloads: straight into staging, and materialized from the node-local cache."""
    caps, cache = request.param
    yield from _guarded(world, caps, 0 if cache == "no-cache" else 1 << 30)


@pytest.fixture
def secrets_(world: Path) -> Path:
    """A root-only directory, inside agent.roots (roots do not stop a deputy), holding a
    file the size of the tester's own, and a marker."""
    d = world / "served" / "rootonly"
    d.mkdir(mode=0o700)
    for name in ("w.bin", "ckpt.bin", "tokens.json"):
        (d / name).write_bytes(SECRET)
        (d / name).chmod(0o600)
    (d / "_SUCCESS").write_bytes(b"")
    return d


ATTACKER = """
import json, os, sys, threading, time
sys.path.insert(0, {lib!r})
from agent.client import SocketClient
from agent.errors import ApiError
cfg = json.loads(sys.argv[1])
c = SocketClient({sock!r})
stop = threading.Event()
flips = [0]

def flip(link, good, bad, make=os.symlink):
    # make=os.link: hardlinks, where protected_hardlinks lets a user link someone else's file
    while not stop.is_set():
        for target in (good, bad):
            tmp = link + ".tmp"
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            make(target, tmp)
            os.rename(tmp, link)
            flips[0] += 1
            time.sleep(0.0005)

def flip_dir(path, bad):
    away = path + ".away"
    while not stop.is_set():
        try:
            os.rename(path, away)
            os.symlink(bad, path)
            time.sleep(0.0005)
            os.unlink(path)
            os.rename(away, path)
            flips[0] += 1
            time.sleep(0.001)
        except OSError:
            pass

dls = []

def plant(parent, bad):
    # the staging names the daemon will use, learnt from the 202s: planted, and planted
    # again whenever something else takes their place
    while not stop.is_set():
        for i, jid in list(dls):
            p = os.path.join(parent, ".dest-" + str(i) + ".chronicle-partial-" + jid)
            try:
                if os.path.islink(p):
                    continue
                if os.path.isdir(p):
                    os.rename(p, p + ".moved-" + str(flips[0]))
                os.symlink(bad, p)
                flips[0] += 1
            except OSError:
                pass
        time.sleep(0.0005)

jobs, refused = [], []
def ask(method, path, body):
    try:
        out = c.request(method, path, body)
        if isinstance(out, dict) and out.get("job_id"):
            jobs.append(out["job_id"])
        return out
    except ApiError as e:
        refused.append(e.code)
        return None

mode = cfg["mode"]
if mode == "run":
    ask("POST", "/v1/runs", cfg["run"])
    os.makedirs(cfg["ckpt"])
    with open(os.path.join(cfg["ckpt"], "w.bin"), "wb") as f:
        f.write(cfg["mine"].encode() * 1)
    open(os.path.join(cfg["ckpt"], "_SUCCESS"), "wb").close()
    t = threading.Thread(target=flip_dir, args=(cfg["ckpt"], cfg["bad"]))
elif mode == "download":
    t = threading.Thread(target=plant, args=(cfg["parent"], cfg["bad"]))
elif cfg.get("hard"):
    t = threading.Thread(target=flip, args=(cfg["path"], cfg["good"], cfg["bad"], os.link))
elif cfg.get("dir"):
    t = threading.Thread(target=flip_dir, args=(cfg["path"], cfg["bad"]))
else:
    t = threading.Thread(target=flip, args=(cfg["path"], cfg["good"], cfg["bad"]))
t.start()
for i in range(cfg["n"]):
    if mode == "download":
        out = ask("POST", "/v1/downloads", {{"asset_id": cfg["asset_id"],
                                            "dest": os.path.join(cfg["parent"],
                                                                 "dest-" + str(i))}})
        if out:
            dls.append((i, out["job_id"]))
    elif mode == "component":
        info = ask("POST", "/v1/assets/presigned", {{"asset_type": "checkpoint",
                                                     "components": ["w.bin"]}})
        if info:
            ask("POST", "/v1/assets/" + info["asset_id"] + "/components",
                {{"name": "w.bin", "path": cfg["path"]}})
            ask("POST", "/v1/assets/" + info["asset_id"] + "/finalize", None)
    elif mode == "upload":
        ask("POST", "/v1/uploads", {{"path": cfg["path"], "asset_type": "checkpoint"}})
    time.sleep(0.02)
time.sleep(cfg["linger_s"])
stop.set()
t.join()
print(json.dumps({{"jobs": jobs, "refused": refused, "flips": flips[0]}}))
"""


def attack(d: DaemonProc, world: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    code = textwrap.dedent(ATTACKER).format(lib=str(world / "lib"), sock=str(d.socket_path))
    res = subprocess.run([RUNUSER, "-u", USER, "--", PY, "-c", code, json.dumps(cfg)],
                         capture_output=True, text=True, timeout=180,
                         env={"PATH": "/usr/bin:/bin", **session_env()}, check=False)
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    # the swaps really ran while the daemon worked (a download's staging names: each planted)
    assert out["flips"] >= (len(out["jobs"]) if cfg["mode"] == "download" else 50), out
    return out


def settle(d: DaemonProc, job_ids: list[str]) -> list[dict[str, Any]]:
    return [d.client().wait_job(j, 120) for j in job_ids]


def assert_no_secret_uploaded(d: DaemonProc, jobs: list[dict[str, Any]]) -> int:
    """No asset any job made holds the secret's bytes (by Chronicle's own digests); the
    number of assets that were made."""
    secret_sha = hashlib.sha256(SECRET).hexdigest()
    ch = chronicle_for(d)
    made = 0
    for j in jobs:
        aid = j.get("asset_id")
        if not aid or j["state"] != "done":
            continue
        made += 1
        for comp in ch.assets.get(str(aid)).components:
            assert comp.sha256 != secret_sha, (j, comp)
    for j in jobs:
        if j["state"] == "failed":
            assert j["error"]["code"] != "internal_error", j["error"]
    return made


def make_tester_dir(world: Path, tester: pwd.struct_passwd, name: str) -> Path:
    p = world / "served" / name
    p.mkdir()
    owned_by_tester(p, tester, 0o755)
    return p


def mine_file(p: Path, tester: pwd.struct_passwd) -> Path:
    p.write_bytes(MINE)
    return owned_by_tester(p, tester, 0o644)


def test_single_file_symlink_swapped_after_the_request(
    guarded: DaemonProc, world: Path, tester: pwd.struct_passwd, secrets_: Path
) -> None:
    home = make_tester_dir(world, tester, "atk-file")
    good = mine_file(home / "mine.bin", tester)
    out = attack(guarded, world, {"mode": "upload", "path": str(home / "ckpt.bin"),
                                  "good": str(good), "bad": str(secrets_ / "ckpt.bin"),
                                  "n": 25, "linger_s": 3})
    jobs = settle(guarded, out["jobs"])
    assert jobs, out  # some requests got through while the link pointed at the tester's
    assert_no_secret_uploaded(guarded, jobs)


@pytest.fixture
def hardlinks_allowed() -> Iterator[None]:
    """fs.protected_hardlinks off for the test (a machine-wide setting, restored after):
    then a user may hardlink a root-only file into a directory of their own."""
    knob = Path("/proc/sys/fs/protected_hardlinks")
    before = knob.read_text().strip()
    knob.write_text("0")
    try:
        yield
    finally:
        knob.write_text(before)


def test_single_file_hardlinked_to_a_root_only_file(
    guarded: DaemonProc, world: Path, tester: pwd.struct_passwd, secrets_: Path,
    hardlinks_allowed: None
) -> None:
    home = make_tester_dir(world, tester, "atk-hard")
    good = mine_file(home / "mine.bin", tester)
    secret = world / "served" / "root-only.bin"  # its directory is searchable, it is not
    shutil.copyfile(secrets_ / "ckpt.bin", secret)
    secret.chmod(0o600)
    out = attack(guarded, world, {"mode": "upload", "hard": True, "path": str(home / "ckpt.bin"),
                                  "good": str(good), "bad": str(secret),
                                  "n": 25, "linger_s": 3})
    jobs = settle(guarded, out["jobs"])
    assert jobs, out
    assert_no_secret_uploaded(guarded, jobs)


def test_directory_renamed_away_for_a_link_to_a_root_only_directory(
    guarded: DaemonProc, world: Path, tester: pwd.struct_passwd, secrets_: Path
) -> None:
    home = make_tester_dir(world, tester, "atk-dir")
    ckpt = make_tester_dir(world, tester, "atk-dir/step-1")
    mine_file(ckpt / "w.bin", tester)
    out = attack(guarded, world, {"mode": "upload", "dir": True, "path": str(ckpt),
                                  "bad": str(secrets_), "n": 25, "linger_s": 3})
    assert home.is_dir()
    jobs = settle(guarded, out["jobs"])
    assert jobs, out
    assert_no_secret_uploaded(guarded, jobs)


def test_three_step_component_swapped_after_the_request(
    guarded: DaemonProc, world: Path, tester: pwd.struct_passwd, secrets_: Path
) -> None:
    home = make_tester_dir(world, tester, "atk-comp")
    good = mine_file(home / "mine.bin", tester)
    out = attack(guarded, world, {"mode": "component", "path": str(home / "w.bin"),
                                  "good": str(good), "bad": str(secrets_ / "w.bin"),
                                  "n": 12, "linger_s": 3})
    jobs = settle(guarded, out["jobs"])
    assert jobs, out
    # a finalized asset holds only what its component job read
    assert_no_secret_uploaded(guarded, jobs)


def test_watched_checkpoint_directory_swapped_after_its_seal(
    guarded: DaemonProc, world: Path, tester: pwd.struct_passwd, secrets_: Path
) -> None:
    runs = make_tester_dir(world, tester, "atk-run")
    rule = {"path": f"{runs}/step-*", "asset_type": "checkpoint", "seal": ["marker"]}
    out = attack(guarded, world, {
        "mode": "run", "run": {"run_id": "run_attack", "watch": [rule], "lease": True},
        "ckpt": str(runs / "step-1"), "mine": MINE.decode(), "bad": str(secrets_),
        "n": 0, "linger_s": 4})
    assert out["refused"] == [], out

    def jobs_of_run() -> list[dict[str, Any]]:
        return [j for j in guarded.client().request("GET", "/v1/jobs")["jobs"]
                if j.get("run_id") == "run_attack"]

    deadline = time.monotonic() + 30
    while not jobs_of_run() and time.monotonic() < deadline:
        time.sleep(0.2)
    jobs = settle(guarded, [j["job_id"] for j in jobs_of_run()])
    assert jobs, guarded.log_tail()
    assert_no_secret_uploaded(guarded, jobs)


def test_download_staging_name_planted_by_the_caller(
    guarded_dl: DaemonProc, world: Path, tester: pwd.struct_passwd, secrets_: Path
) -> None:
    """The staging directory's name is learnt from the 202: a symlink planted there (and
    planted again over whatever the daemon makes) must not make the daemon write into the
    root-only directory, nor hand anything there to the tester."""
    src = world / "served" / "model"
    src.mkdir()
    (src / "tokens.json").write_text('{"tokens": {"forged": {"principal_id": "user_x"}}}')
    (src / "w.bin").write_bytes(os.urandom(SIZE))
    job = guarded_dl.client().request("POST", "/v1/uploads",
                                   {"path": str(src), "asset_type": "checkpoint"})
    aid = guarded_dl.client().wait_job(job["job_id"], 60)["asset_id"]
    before = {p.name: (p.stat().st_uid, p.read_bytes()) for p in secrets_.iterdir()}
    parent = make_tester_dir(world, tester, "atk-dl")
    out = attack(guarded_dl, world, {"mode": "download", "asset_id": aid, "parent": str(parent),
                                  "bad": str(secrets_), "n": 15, "linger_s": 3})
    jobs = settle(guarded_dl, out["jobs"])
    after = {p.name: (p.stat().st_uid, p.read_bytes()) for p in secrets_.iterdir()}
    assert after == before  # nothing written, replaced or handed over in there
    assert all(j["state"] in ("done", "failed") for j in jobs), jobs
    assert all(j["error"]["code"] != "internal_error" for j in jobs if j["state"] == "failed")
    for p in parent.rglob("*"):  # whatever landed in the tester's tree is the tester's
        if not p.is_symlink():
            assert p.lstat().st_uid == tester.pw_uid, p
