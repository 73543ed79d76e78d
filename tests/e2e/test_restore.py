"""What a restarted job needs, for real: ``download --latest`` (the newest ready asset of a
run and type), ``--include`` / ``--exclude`` (one rank's shards), destinations whose parents
do not exist yet, ``Run.restore()`` with and without a daemon, ``Chronicle().assets.latest``,
the socket API's refusals, and a ``latest`` download that a daemon restart resumes with the
asset it chose, even once a newer one is ready.

Real parts only: daemons as processes, their embedded Chronicle or a local server on
loopback, real files.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import Run
from agent.chronicle import contract
from agent.chronicle import models as m
from agent.chronicle.sdk import Chronicle
from agent.cli import cli
from agent.errors import ApiError
from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_e2e import MiB, assert_same_tree, chronicle_for, write_random
from tests.support.helpers_standalone import Standalone, standalone_server

WAIT_S = 90
RUN = "run_restore_a"


# ---- helpers -------------------------------------------------------------------------------


def upload(daemon: DaemonProc, src: Path, run_id: str | None = RUN,
           asset_type: str = "checkpoint") -> str:
    client = daemon.client()
    body: dict[str, Any] = {"path": str(src), "asset_type": asset_type}
    if run_id:
        body["run_id"] = run_id
    final = client.wait_job(client.request("POST", "/v1/uploads", body)["job_id"], WAIT_S)
    assert final["state"] == "done", (final, daemon.log_tail())
    return str(final["asset_id"])


def ckpt(root: Path, tag: str) -> Path:
    """A small checkpoint directory whose files say which one it is."""
    root.mkdir(parents=True)
    (root / "model.bin").write_bytes(tag.encode() * 1000)
    (root / "meta").mkdir()
    (root / "meta" / "step.txt").write_text(tag)
    return root


def dcp(root: Path, ranks: int = 4) -> Path:
    """A torch.distributed.checkpoint-like directory: one shard per rank, .metadata, and
    per-rank optimizer state under a subdirectory."""
    root.mkdir(parents=True)
    (root / ".metadata").write_bytes(os.urandom(3000))
    for r in range(ranks):
        (root / f"__{r}_0.distcp").write_bytes(os.urandom(20_000 + r))
    (root / "optim").mkdir()
    for r in range(2):
        (root / "optim" / f"rank_{r}.pt").write_bytes(os.urandom(5000 + r))
    return root


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def download_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli("download", *args)
    out = capsys.readouterr()
    return code, out.out, out.err


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_asset(ch: Chronicle, run_id: str, files: dict[str, bytes],
              asset_type: str = "checkpoint") -> str:
    """Register, upload and finalize an asset straight on Chronicle (no daemon)."""
    ch.send(contract.create_run(run_id))
    plan = ch.send(contract.register(
        asset_type, [{"name": n, "size": len(b)} for n, b in files.items()], output_of=run_id,
        idempotency_key=f"put:{os.urandom(8).hex()}"))
    for name, data in files.items():
        req = urllib.request.Request(plan.upload_urls[name], data=data, method="PUT",
                                     headers={"Content-Length": str(len(data))})
        urllib.request.urlopen(req, timeout=60).close()
    ch.send(contract.finalize(plan.asset_id, {
        n: m.FinalizeComponent(size=len(b), sha256=sha256(b)) for n, b in files.items()}))
    return plan.asset_id


@pytest.fixture
def alice_server(tmp_path: Path) -> Iterator[Standalone]:
    """A local Chronicle on its own (no daemon), one principal; single-URL uploads."""
    with standalone_server(tmp_path / "srv", {"user_alice": []},
                           multipart_threshold_bytes=1 << 30) as srv:
        yield srv


# ---- download --latest ---------------------------------------------------------------------


def test_latest_takes_the_newest_ready_asset_of_the_run_and_type(
    daemon_env: DaemonProc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = daemon_env
    ch = chronicle_for(d)
    a = upload(d, ckpt(tmp_path / "A", "A"))
    b = upload(d, ckpt(tmp_path / "B", "B"))
    c = upload(d, ckpt(tmp_path / "C", "C"))
    ch.assets.deprecate(b, reason="superseded by the lr sweep")
    ch.assets.invalidate(c, reason="NaN in layer 3")
    registered = [str(d.client().request("POST", "/v1/assets/presigned", {
        "asset_type": "checkpoint", "components": ["model.bin"], "run_id": RUN})["asset_id"])
        for _ in range(2)]  # newer than all, but one stays pending and one is abandoned
    ch.send(contract.abandon(registered[1], "test: given up"))
    upload(d, ckpt(tmp_path / "F", "F"), asset_type="eval_report")  # another type
    upload(d, ckpt(tmp_path / "G", "G"), run_id="run_restore_other")  # another run
    states = {x.asset_id: x.state for x in ch.assets.list(output_of=RUN)}
    assert sorted(states.values()) == ["abandoned", "pending", "ready", "ready", "ready",
                                       "ready"], states

    # the newest ready checkpoint of the run is B: deprecated, so taken with a warning
    code, out, err = download_cli(capsys, "--run", RUN, "--type", "checkpoint", "--latest",
                                  str(tmp_path / "got-b"), "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["asset_id"] == b and got["selected"]["asset_id"] == b
    assert got["selected"]["created_at"] == ch.assets.get(b).created_at
    assert "deprecated: superseded by the lr sweep" in err
    assert_same_tree(tmp_path / "B", tmp_path / "got-b")

    # --allow-invalid: the invalidated C (newer) may be chosen
    code, out, err = download_cli(capsys, "--latest", "--run", RUN, "--type", "checkpoint",
                                  "--allow-invalid", str(tmp_path / "got-c"), "--json")
    assert code == 0, err
    assert json.loads(out)["selected"]["asset_id"] == c and "NaN in layer 3" in err
    assert (tmp_path / "got-c" / "meta" / "step.txt").read_text() == "C"

    # once B is invalidated too, A is the latest one that is not
    ch.assets.invalidate(b, reason="same bug")
    code, out, err = download_cli(capsys, "--latest", "--run", RUN, "--type", "checkpoint",
                                  str(tmp_path / "got-a"))
    assert code == 0, err
    assert f"latest ready checkpoint of run {RUN}: {a}" in out
    assert (tmp_path / "got-a" / "meta" / "step.txt").read_text() == "A"

    # the other type, the other run, the SDK and the socket API agree
    assert ch.assets.latest(RUN, "eval_report") is not None
    assert ch.assets.latest(RUN, "checkpoint").asset_id == a  # type: ignore[union-attr]
    assert ch.assets.latest(RUN, "checkpoint", allow_invalid=True).asset_id == c  # type: ignore[union-attr]
    found = d.client().request("GET", f"/v1/assets/latest?run_id={RUN}&asset_type=checkpoint")
    assert found["selected"]["asset_id"] == a and found["asset"]["asset_id"] == a

    # no ready asset of that run and type: a clear error naming both, nothing downloaded
    code, _out, err = download_cli(capsys, "--latest", "--run", "run_restore_none", "--type",
                                   "checkpoint", str(tmp_path / "none"))
    assert code == 1
    assert "no_ready_asset" in err and "run_restore_none" in err and "'checkpoint'" in err
    assert not (tmp_path / "none").exists()
    assert ch.assets.latest("run_restore_none", "checkpoint") is None
    with pytest.raises(ApiError) as e:
        d.client().request("GET", "/v1/assets/latest?run_id=run_restore_none"
                                  "&asset_type=checkpoint")
    assert e.value.status == 404 and e.value.code == "no_ready_asset"
    # all invalidated: the error says so
    only = upload(d, ckpt(tmp_path / "H", "H"), run_id="run_restore_bad")
    ch.assets.invalidate(only, reason="bad data")
    code, _out, err = download_cli(capsys, "--latest", "--run", "run_restore_bad", "--type",
                                   "checkpoint", str(tmp_path / "bad"))
    assert code == 1 and "invalidated" in err and only in err


def test_download_usage_errors_exit_2_before_any_daemon(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = str(isolated_env / "d")
    for args, needle in (
        (("ast_1", "--latest", "--run", "r", "--type", "t", dest), "not both"),
        (("--latest", "--type", "t", dest), "--latest needs --run"),
        (("--latest", dest), "--run and --type"),
        (("ast_1", "--run", "r", dest), "only with --latest"),
        ((dest,), "give ASSET_ID"),
    ):
        code, _out, err = download_cli(capsys, *args)
        assert code == 2, (args, err)
        assert needle in err, (args, err)


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No daemon anywhere: a socket path where nothing listens."""
    for key in list(os.environ):
        if key.startswith(("CHRONICLE_AGENT_", "METHODIC_RUN_ID")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CHRONICLE_AGENT_SOCKET", str(tmp_path / "none.sock"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    return tmp_path


# ---- include / exclude, nested destinations ------------------------------------------------


def test_include_exclude_fetch_only_the_selected_components(
    daemon_env: DaemonProc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = daemon_env
    src = dcp(tmp_path / "step-100")
    aid = upload(d, src)

    # rank 1 of 4: its shard and .metadata; into a/b/c, which does not exist yet
    dest = tmp_path / "restore" / "a" / "b" / "c"
    code, out, err = download_cli(capsys, aid, str(dest), "--include", "__1_*.distcp",
                                  "--include", ".metadata", "--json")
    assert code == 0, err
    assert files_under(dest) == {"__1_0.distcp", ".metadata"}
    assert {f["name"] for f in json.loads(out)["files"]} == {"__1_0.distcp", ".metadata"}
    for rel in ("__1_0.distcp", ".metadata"):
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
    for p in (tmp_path / "restore", tmp_path / "restore" / "a", dest.parent, dest):
        st = p.stat()
        assert p.is_dir() and st.st_uid == os.getuid(), p  # the caller's
    assert (dest.parent.stat().st_mode & 0o777) == 0o700
    assert "selected" not in json.loads(out)  # only --latest says what it chose

    # exclude after include; '*' matches '/' too
    dest2 = tmp_path / "restore" / "opt"
    code, _out, err = download_cli(capsys, aid, str(dest2), "--include", "optim/*",
                                   "--exclude", "*_1.pt")
    assert code == 0, err
    assert files_under(dest2) == {"optim/rank_0.pt"}
    code, _out, err = download_cli(capsys, aid, str(tmp_path / "restore" / "no-shards"),
                                   "--exclude", "*.distcp")
    assert code == 0, err
    assert files_under(tmp_path / "restore" / "no-shards") == {
        ".metadata", "optim/rank_0.pt", "optim/rank_1.pt"}

    # the node cache's entry holds what the filtered downloads selected, and only that; a
    # whole download then fetches only the rest, and a selection it holds fetches nothing
    cache = d.state_dir / "cache"
    held = {".metadata", "__1_0.distcp", "optim/rank_0.pt", "optim/rank_1.pt"}
    assert files_under(cache / "objects" / aid) == held
    assert not (cache / "fill" / aid).exists()
    full = d.client().wait_job(d.client().request("POST", "/v1/downloads", {
        "asset_id": aid, "dest": str(tmp_path / "full")})["job_id"], WAIT_S)
    res = final_ok(full, d)["result"]
    rest = files_under(src) - held
    assert res["cached"] is False and res["fetched"] == len(rest), res
    assert res["fetched_bytes"] == sum((src / n).stat().st_size for n in rest), res
    assert_same_tree(src, tmp_path / "full")
    assert files_under(cache / "objects" / aid) == files_under(src)
    code, out, err = download_cli(capsys, aid, str(tmp_path / "restore" / "again"),
                                  "--include", "__0_*", "--json")
    assert code == 0, err
    assert json.loads(out)["cached"] is True and json.loads(out)["fetched"] == 0, out
    assert files_under(tmp_path / "restore" / "again") == {"__0_0.distcp"}

    # selecting nothing is an error naming the patterns, not an empty download
    code, _out, err = download_cli(capsys, aid, str(tmp_path / "restore" / "empty"),
                                   "--include", "__9_*", "--exclude", "x")
    assert code == 1
    assert "nothing_selected" in err and "'__9_*'" in err and "'x'" in err
    assert not (tmp_path / "restore" / "empty").exists()
    assert not [p for p in (tmp_path / "restore").iterdir() if "chronicle-partial" in p.name]

    # the SDK, through the daemon, takes the same patterns
    got = chronicle_for(d).assets.download(aid, tmp_path / "sdk" / "r0",
                                           include=["__0_*", ".metadata"])
    assert got["job_id"] is not None
    assert files_under(tmp_path / "sdk" / "r0") == {"__0_0.distcp", ".metadata"}


def final_ok(job: dict[str, Any], d: DaemonProc) -> dict[str, Any]:
    assert job["state"] == "done", (job, d.log_tail())
    return job


def test_latest_with_filters_through_the_socket_api(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    upload(daemon, dcp(tmp_path / "old"))
    src = dcp(tmp_path / "new")
    newest = upload(daemon, src)
    client = daemon.client()
    job = client.request("POST", "/v1/downloads", {
        "run_id": RUN, "asset_type": "checkpoint", "latest": True,
        "dest": str(tmp_path / "x" / "y"), "include": ["__2_*", ".metadata"]})
    assert job["latest"] is True and job["include"] == ["__2_*", ".metadata"]
    final = final_ok(client.wait_job(job["job_id"], WAIT_S), daemon)
    assert final["asset_id"] == newest and final["selected"]["asset_id"] == newest
    assert final["result"]["selected"]["asset_id"] == newest
    assert files_under(tmp_path / "x" / "y") == {"__2_0.distcp", ".metadata"}
    assert final["bytes_total"] == sum((src / n).stat().st_size
                                       for n in ("__2_0.distcp", ".metadata"))


# ---- the socket API's refusals -------------------------------------------------------------


def test_bad_download_requests_are_400_and_queue_nothing(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    client = daemon.client()
    dest = str(tmp_path / "not" / "made" / "d")
    for body, needle in (
        ({"dest": dest}, "give asset_id"),
        ({"asset_id": "ast_1", "latest": True, "run_id": "r", "asset_type": "t",
          "dest": dest}, "both choose the asset"),
        ({"latest": True, "run_id": "r", "dest": dest}, "needs asset_type"),
        ({"latest": True, "dest": dest}, "needs run_id and asset_type"),
        ({"asset_id": "ast_1", "run_id": "r", "dest": dest}, "only with latest"),
        ({"asset_id": "ast_1", "dest": dest, "include": "*.bin"}, "include"),
        ({"asset_id": "ast_1", "dest": dest, "include": [""]}, "include"),
        ({"asset_id": "ast_1", "dest": dest, "exclude": ["a\x00b"]}, "exclude"),
        ({"asset_id": "ast_1", "dest": dest, "exclude": [7]}, "exclude"),
        ({"asset_id": "ast_1", "dest": dest, "include": ["*"] * 300}, "at most 256"),
        ({"asset_id": "ast_1", "dest": dest, "filters": ["*"]}, "filters"),
        ({"latest": True, "run_id": "r\n", "asset_type": "t", "dest": dest}, "run_id"),
        ({"latest": True, "run_id": "r", "asset_type": "t", "dest": "rel/d"}, "absolute"),
    ):
        with pytest.raises(ApiError) as e:
            client.request("POST", "/v1/downloads", body)
        assert e.value.status == 400, (body, e.value)
        assert e.value.code == "invalid_request", (body, e.value)
        assert needle in e.value.message, (body, e.value.message)
    for query, needle in (("asset_type=t", "run_id"), ("run_id=r", "asset_type"),
                          ("run_id=r&asset_type=t&allow_invalid=maybe", "allow_invalid")):
        with pytest.raises(ApiError) as e:
            client.request("GET", f"/v1/assets/latest?{query}")
        assert e.value.status == 400 and needle in e.value.message, (query, e.value)
    assert client.list_jobs() == []  # nothing queued
    assert not (tmp_path / "not").exists()  # nor any parent made for a refused request


# ---- Run.restore() -------------------------------------------------------------------------


def test_run_restore_with_a_daemon(
    daemon_env: DaemonProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    run = Run("run_restore_d", heartbeat_interval_s=None)
    assert run.restore() is None  # nothing yet: a fresh start
    assert run.jobs() == [] and daemon_env.client().list_jobs() == []  # and no failed job

    src = dcp(tmp_path / "step-1")
    run.upload_directory_async(src).wait(WAIT_S)
    path = run.restore()
    assert path is not None
    aid = run.jobs()[0]["asset_id"]
    assert path == tmp_path / "xdg-cache" / "chronicle-agent" / "restore" / run.run_id / aid
    assert_same_tree(src, path)

    # restarted again on this node: the same directory, no second download
    downloads = [j for j in daemon_env.client().list_jobs() if j["kind"] == "download"]
    assert run.restore() == path
    assert [j for j in daemon_env.client().list_jobs() if j["kind"] == "download"] == downloads

    # one rank's part, in a directory of its own; an explicit, nested dest
    part = run.restore(include=["__3_*", ".metadata"])
    assert part is not None and part != path and part.parent == path.parent
    assert files_under(part) == {"__3_0.distcp", ".metadata"}
    mine = run.restore(dest=tmp_path / "mine" / "deep" / "ckpt", exclude=["optim/*"])
    assert mine == tmp_path / "mine" / "deep" / "ckpt"
    assert files_under(mine) == files_under(src) - {"optim/rank_0.pt", "optim/rank_1.pt"}
    assert run.restore("eval_report") is None  # another type: none
    run.finish()


def test_run_restore_without_a_daemon(
    alice_server: Standalone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith(("CHRONICLE_AGENT_", "METHODIC_RUN_ID")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CHRONICLE_AGENT_SOCKET", str(tmp_path / "no-daemon.sock"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("CHRONICLE_AGENT_AGENT__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CHRONICLE_AGENT_CHRONICLE__URL", alice_server.url)
    monkeypatch.setenv("CHRONICLE_AGENT_CHRONICLE__TOKEN", alice_server.tokens["user_alice"])
    monkeypatch.setenv("CHRONICLE_AGENT_DOWNLOAD__RESTORE_DIR", str(tmp_path / "restores"))

    run = Run("run_restore_nd", register=False)
    assert run.restore() is None
    ch = alice_server.client("user_alice")
    files = {".metadata": os.urandom(500), "__0_0.distcp": os.urandom(70_000),
             "__1_0.distcp": os.urandom(70_001)}
    first = put_asset(ch, run.run_id, files)
    newer = {k: os.urandom(len(v)) for k, v in files.items()}
    second = put_asset(ch, run.run_id, newer)
    put_asset(ch, "run_restore_other", files)
    assert ch.assets.latest(run.run_id, "checkpoint").asset_id == second  # type: ignore[union-attr]
    assert first != second

    path = run.restore()
    assert path == tmp_path / "restores" / run.run_id / second
    assert {p: (path / p).read_bytes() for p in files_under(path)} == newer
    assert run.restore() == path  # already there
    part = run.restore(include=["__1_*"], exclude=[".metadata"])
    assert part is not None and files_under(part) == {"__1_0.distcp"}
    assert (part / "__1_0.distcp").read_bytes() == newer["__1_0.distcp"]
    nested = run.restore(dest=tmp_path / "n" / "e" / "s", include=[".metadata"])
    assert nested is not None and files_under(nested) == {".metadata"}
    assert (tmp_path / "n").stat().st_mode & 0o777 == 0o700
    assert run.restore("eval_report") is None


# ---- a restart resumes the same choice -----------------------------------------------------


def test_a_latest_download_resumes_its_choice_after_a_daemon_restart(
    alice_server: Standalone, tmp_path: Path
) -> None:
    """The daemon dies mid-download; a newer checkpoint is finalized meanwhile; the
    restarted daemon finishes the asset it had chosen, with the same filters."""
    ch = alice_server.client("user_alice")
    big = tmp_path / "big.bin"
    write_random(big, 24 * MiB)
    v1 = {"big.bin": big.read_bytes(), ".metadata": os.urandom(900),
          "other.bin": os.urandom(MiB)}
    first = put_asset(ch, RUN, v1)
    env = {"CHRONICLE_AGENT_CHRONICLE__URL": alice_server.url,
           "CHRONICLE_AGENT_CHRONICLE__TOKEN": alice_server.tokens["user_alice"],
           "CHRONICLE_AGENT_DEBUG__CRASH_POINT": f"mid_download:{4 * MiB}@1",
           "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(40 * MiB)}
    with start_daemon(env) as d:
        dest = tmp_path / "dl" / "deep" / "ckpt"
        job = d.client().request("POST", "/v1/downloads", {
            "run_id": RUN, "asset_type": "checkpoint", "latest": True, "dest": str(dest),
            "include": ["*.bin"], "exclude": ["other*"]})
        assert d.proc is not None
        d.proc.wait(60)  # it kills itself 4 MiB into big.bin
        assert d.proc.returncode == -9, d.log_tail()
        assert not dest.exists()
        second = put_asset(ch, RUN, {k: os.urandom(len(v)) for k, v in v1.items()})
        assert ch.assets.latest(RUN, "checkpoint").asset_id == second  # type: ignore[union-attr]
        d.start()
        final = final_ok(d.client().wait_job(job["job_id"], WAIT_S), d)
        assert final["attempts"] == 2
        assert final["asset_id"] == first and final["selected"]["asset_id"] == first
        assert final["include"] == ["*.bin"] and final["exclude"] == ["other*"]
        assert files_under(dest) == {"big.bin"}
        assert (dest / "big.bin").read_bytes() == v1["big.bin"]
        assert "resuming from byte" in d.log_text()

