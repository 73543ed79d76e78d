"""Uploads and downloads made with the caller's own Chronicle credentials.

A caller (``Run(token=…)``, the CLI with ``CHRONICLE_AGENT_CHRONICLE__TOKEN``) sends its
token with its socket calls; the daemon registers, finalizes and downloads with that token, so
``created_by`` is the researcher, who can then manage the asset. The token lives only in the
queue database (0600, in the 0700 state dir) while work needs it, and never in a log line, a
job, or any other file. A real daemon on its embedded server, a second principal added to that
server's tokens file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import Run
from agent.client import SocketClient
from agent.errors import ApiError, ChronicleError
from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_e2e import chronicle_for, socket_call
from tests.support.helpers_server import add_principal
from tests.support.helpers_watch import wait_until, watch_daemon, writer_env

ALICE = "user_alice"
MIB = 1 << 20


def server_info(daemon: DaemonProc) -> dict[str, str]:
    info: dict[str, str] = json.loads(
        (daemon.state_dir / "server" / "endpoint.json").read_text())
    return info


def alice_token(daemon: DaemonProc) -> str:
    return add_principal(Path(server_info(daemon)["tokens_file"]), ALICE)


def credentials(daemon: DaemonProc) -> list[tuple[str, int, str | None]]:
    """(cred_id, uid, principal) of every credential the daemon holds, read from its file."""
    db = sqlite3.connect(f"file:{daemon.state_dir / 'queue.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT cred_id, uid, principal_id FROM credentials").fetchall()
    finally:
        db.close()


def upload(run: Run, path: Path, **extra: str) -> dict[str, Any]:
    """Upload a file through the daemon as ``run``'s caller; the job once it ends."""
    job = run.client.request("POST", "/v1/uploads", {
        "path": str(path), "asset_type": "checkpoint", "run_id": run.run_id, **extra})
    return run.client.wait_job(job["job_id"], 60)


def files_holding(root: Path, needle: bytes, skip: tuple[str, ...] = ()) -> list[Path]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name not in skip:
            try:
                if needle in p.read_bytes():
                    found.append(p)
            except OSError:
                pass
    return found


def test_an_upload_with_the_callers_token_is_the_callers(daemon: DaemonProc,
                                                         tmp_path: Path) -> None:
    token = alice_token(daemon)
    f = tmp_path / "model.bin"
    f.write_bytes(os.urandom(300_000))
    with Run("run_alice", socket_path=daemon.socket_path, token=token) as run:
        job = upload(run, f)
        inline = run.upload_asset("metrics", {"loss": 0.1}).wait(60)
    assert job["state"] == "done" and inline["state"] == "done", (job, inline)
    alice = chronicle_for(daemon, token)
    for asset_id in (job["asset_id"], inline["asset_id"]):
        assert alice.assets.get(asset_id).created_by == ALICE
    # … so alice manages it herself, with her own credentials
    alice.assets.deprecate(job["asset_id"], reason="superseded")
    assert alice.assets.get(job["asset_id"]).deprecated
    # a caller that sends no token gets the daemon's: created by the daemon's principal
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x" * 1000)
    other = Run("run_plain", socket_path=daemon.socket_path, token="")
    mine = upload(other, plain)
    other.finish()
    daemon_principal = chronicle_for(daemon).me.scopes().principal_id
    assert daemon_principal != ALICE
    assert chronicle_for(daemon).assets.get(mine["asset_id"]).created_by == daemon_principal
    # nothing in the job objects, the log, or any file but the queue database holds the token
    assert token not in json.dumps(daemon.client().list_jobs())
    assert token not in daemon.log_text()
    assert files_holding(daemon.root, token.encode(),
                         skip=("queue.db", "queue.db-wal", "tokens.json")) == []


def test_the_three_step_flow_with_the_callers_token(daemon: DaemonProc,
                                                    tmp_path: Path) -> None:
    token = alice_token(daemon)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(50_000))
    b.write_bytes(os.urandom(70_000))
    run = Run("run_flow", socket_path=daemon.socket_path, token=token)
    up = run.create_asset_presigned("checkpoint", ["a.bin", "b.bin"])
    for name, path in (("a.bin", a), ("b.bin", b)):
        run.upload_component(local_path=path, name=name, asset_id=up.asset_id)
    final = run.finalize_asset(up.asset_id).wait(60)
    run.finish()
    assert final["state"] == "done", final
    asset = chronicle_for(daemon, token).assets.get(up.asset_id)
    assert asset.created_by == ALICE and asset.state == "ready"


def test_a_download_with_the_callers_token_reads_what_only_they_may(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    token = alice_token(daemon)
    f = tmp_path / "private.bin"
    f.write_bytes(os.urandom(200_000))
    run = Run("run_private", socket_path=daemon.socket_path, token=token)
    done = upload(run, f, visibility="private")
    run.finish()
    asset_id = done["asset_id"]
    # the daemon's own principal may not read alice's private asset …
    with pytest.raises(ChronicleError):
        chronicle_for(daemon).assets.get(asset_id)
    plain = SocketClient(daemon.socket_path)
    job = plain.request("POST", "/v1/downloads",
                        {"asset_id": asset_id, "dest": str(tmp_path / "no")})
    refused = plain.wait_job(job["job_id"], 60)
    assert refused["state"] == "failed", refused
    assert not (tmp_path / "no").exists()
    # … alice may, and the daemon downloads it for her with her token
    mine = SocketClient(daemon.socket_path, token=token)
    job = mine.request("POST", "/v1/downloads",
                       {"asset_id": asset_id, "dest": str(tmp_path / "yes")})
    got = mine.wait_job(job["job_id"], 60)
    assert got["state"] == "done", got
    assert (tmp_path / "yes" / "private.bin").read_bytes() == f.read_bytes()


def test_a_token_chronicle_refuses_is_refused_at_once(daemon: DaemonProc,
                                                      tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    bad = SocketClient(daemon.socket_path, token="not-a-token-chronicle-knows")
    with pytest.raises(ApiError) as e:
        bad.request("POST", "/v1/uploads", {"path": str(f), "asset_type": "checkpoint"})
    assert e.value.status == 401 and e.value.code == "unauthenticated", e.value
    assert "not-a-token" not in e.value.message
    body = json.dumps({"path": str(f), "asset_type": "checkpoint"}).encode()
    status, raw = socket_call(daemon.socket_path, "POST", "/v1/uploads", body,
                              {"Authorization": "Basic dXNlcjpwYXNz"})
    assert status == 400 and json.loads(raw)["error"]["code"] == "unauthenticated", raw
    assert bad.health()["version"]  # reads need no credential and ignore a bad one
    assert daemon.client().list_jobs() == []  # nothing was queued …
    assert credentials(daemon) == []  # … nor kept
    assert "not-a-token" not in daemon.log_text()


def test_credentials_rest_only_in_the_private_queue_file_while_needed(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    token = alice_token(daemon)
    assert stat.S_IMODE(daemon.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((daemon.state_dir / "queue.db").stat().st_mode) == 0o600
    client = SocketClient(daemon.socket_path, token=token)
    # a job that fails keeps its token: `retry` runs it as alice again
    job = client.request("POST", "/v1/downloads", {"asset_id": "ast_nonexistent",
                                                   "dest": str(tmp_path / "d")})
    failed = client.wait_job(job["job_id"], 60)
    assert failed["state"] == "failed", failed
    assert [(uid, p) for _c, uid, p in credentials(daemon)] == [(os.getuid(), ALICE)]
    assert token not in json.dumps(failed)


CHILD = """
import os, sys
d = os.path.join(sys.argv[1], "step-1")
os.makedirs(d)
with open(os.path.join(d, "w.bin"), "wb") as f:
    f.write(os.urandom(100_000))
open(os.path.join(d, "_SUCCESS"), "w").close()
"""


def test_the_cli_and_exec_use_the_callers_token(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with watch_daemon() as d:
        token = alice_token(d)
        env = {**writer_env(d), "CHRONICLE_AGENT_CHRONICLE__TOKEN": token}
        res = subprocess.run(
            [sys.executable, "-m", "agent", "exec", "--run", "run_exec_alice", "--watch",
             str(out), "--type", "checkpoint", "--seal", "marker", "--", sys.executable,
             "-c", CHILD, str(out)], env=env, capture_output=True, text=True, timeout=120,
            check=False)
        assert res.returncode == 0, res.stderr

        def uploaded() -> dict[str, Any] | None:
            jobs = [j for j in d.client().list_jobs(run_id="run_exec_alice")
                    if j["kind"] == "upload" and j["state"] == "done"]
            return jobs[0] if jobs else None
        done = wait_until(uploaded, 30, "the checkpoint uploaded")
        alice = chronicle_for(d, token)
        assert alice.assets.get(str(done["asset_id"])).created_by == ALICE
        f = tmp_path / "cli.bin"
        f.write_bytes(b"y" * 2048)
        res = subprocess.run([sys.executable, "-m", "agent", "upload", str(f), "--type",
                              "checkpoint", "--wait", "--json"], env=env, capture_output=True,
                             text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        assert alice.assets.get(json.loads(res.stdout)["asset_id"]).created_by == ALICE
        assert token not in res.stdout + res.stderr + d.log_text()


def test_a_retry_with_another_token_runs_as_that_caller(daemon: DaemonProc,
                                                        tmp_path: Path) -> None:
    """A job refused under one token (bob may not read alice's private asset) is retried
    with the token sent along with the retry (alice's), and succeeds."""
    tokens = Path(server_info(daemon)["tokens_file"])
    alice, bob = add_principal(tokens, ALICE), add_principal(tokens, "user_bob")
    f = tmp_path / "alices.bin"
    f.write_bytes(os.urandom(20_000))
    run = Run("run_retry", socket_path=daemon.socket_path, token=alice)
    asset_id = upload(run, f, visibility="private")["asset_id"]
    run.finish()
    as_bob = SocketClient(daemon.socket_path, token=bob)
    job = as_bob.request("POST", "/v1/downloads",
                         {"asset_id": asset_id, "dest": str(tmp_path / "dl")})
    failed = as_bob.wait_job(job["job_id"], 60)
    assert failed["state"] == "failed", failed
    assert not (tmp_path / "dl").exists()
    SocketClient(daemon.socket_path, token=alice).retry_job(job["job_id"])
    done = as_bob.wait_job(job["job_id"], 60)
    assert done["state"] == "done", done
    assert (tmp_path / "dl" / "alices.bin").read_bytes() == f.read_bytes()


def test_a_job_whose_token_is_gone_fails_and_never_uses_the_daemons(tmp_path: Path) -> None:
    """The daemon stops mid-upload; the caller's token is taken out of its queue database
    meanwhile; after the restart the job fails with credential_gone instead of finishing
    with the daemon's own token, and a retry that sends the token again completes it."""
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(8 * MIB))
    env = {"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(2 * MIB)}
    with start_daemon(env) as d:
        token = alice_token(d)
        mine = SocketClient(d.socket_path, token=token)
        job = mine.request("POST", "/v1/uploads", {"path": str(f), "asset_type": "checkpoint"})
        wait_until(lambda: mine.get_job(job["job_id"])["bytes_done"] > 0, 30, "it runs")
        assert d.stop() == 0
        db = sqlite3.connect(d.state_dir / "queue.db")
        with db:
            assert db.execute("DELETE FROM credentials").rowcount == 1
        db.close()
        d.start()
        failed = mine.wait_job(job["job_id"], 60)
        assert failed["state"] == "failed", failed
        assert failed["error"]["code"] == "credential_gone", failed
        mine.retry_job(job["job_id"])
        done = mine.wait_job(job["job_id"], 60)
        assert done["state"] == "done", done
        assert chronicle_for(d, token).assets.get(done["asset_id"]).created_by == ALICE
