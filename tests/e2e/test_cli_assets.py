"""``chronicle-agent assets …`` and ``chronicle-agent me``, called in-process as ``cli(*args)``
against a real standalone local server (configured URL and token), and against a daemon's
embedded server found with no configuration at all."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import cli
from tests.support.helpers_daemon import DaemonProc
from tests.support.helpers_standalone import Standalone, standalone_server

PRINCIPALS = {"user_alice": ["org_1", "team_9"], "user_bob": []}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standalone]:
    with standalone_server(tmp_path_factory.mktemp("cli"), PRINCIPALS) as s:
        yield s


@pytest.fixture
def as_user(srv: Standalone, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``as_user("user_bob")``: point the CLI's configuration at the server as that user."""
    for key in list(os.environ):
        if key.startswith("CHRONICLE_AGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("CHRONICLE_AGENT_AGENT__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CHRONICLE_AGENT_SOCKET", str(tmp_path / "no-daemon.sock"))

    def use(principal: str) -> None:
        monkeypatch.setenv("CHRONICLE_AGENT_CHRONICLE__URL", srv.url)
        monkeypatch.setenv("CHRONICLE_AGENT_CHRONICLE__TOKEN", srv.tokens[principal])

    use("user_alice")
    return use


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli(*args)
    out, err = capsys.readouterr()
    return code, out, err


def new_asset(srv: Standalone) -> str:
    return srv.client("user_alice").assets.create_inline(
        asset_type="dataset", content="some bytes").asset_id


def test_get_prints_no_url_unless_presigned(
    srv: Standalone, as_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = new_asset(srv)
    code, out, _ = run(capsys, "assets", "get", aid, "--json")
    assert code == 0
    asset = json.loads(out)
    assert asset["asset_id"] == aid and asset["state"] == "ready"
    assert "download_urls" not in asset and "/storage/" not in out
    code, out, _ = run(capsys, "assets", "get", aid)
    assert code == 0 and f"asset:        {aid}" in out and "/storage/" not in out
    code, out, _ = run(capsys, "assets", "get", aid, "--presigned", "--json")
    assert code == 0
    urls = json.loads(out)["download_urls"]
    assert set(urls) == {"content"} and "Signature=" in urls["content"]
    code, out, _ = run(capsys, "assets", "get", aid, "--presigned")
    assert code == 0 and "url content: http" in out
    for text in (out, _):
        assert srv.tokens["user_alice"] not in text


def test_flags_grants_visibility_move_delete(
    srv: Standalone, as_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = new_asset(srv)
    code, out, _ = run(capsys, "assets", "deprecate", aid, "--reason", "superseded", "--json")
    assert code == 0 and json.loads(out)["deprecated"]["reason"] == "superseded"
    code, out, _ = run(capsys, "assets", "invalidate", aid, "--reason", "bad labels")
    assert code == 0 and "invalidated:  bad labels" in out
    code, out, _ = run(capsys, "assets", "grant", aid, "--principal", "user_bob",
                       "--action", "write", "--json")
    assert code == 0 and json.loads(out) == {
        "grants": [{"principal_id": "user_bob", "action": "write"}]}
    code, out, _ = run(capsys, "assets", "share", aid, "--scope", "team_9", "--json")
    assert json.loads(out)["grants"] == [{"principal_id": "team_9", "action": "read"},
                                         {"principal_id": "user_bob", "action": "write"}]
    code, out, _ = run(capsys, "assets", "revoke", aid, "--principal", "user_bob",
                       "--action", "write", "--json")
    assert json.loads(out)["grants"] == [{"principal_id": "team_9", "action": "read"}]
    code, out, _ = run(capsys, "assets", "access", aid)
    assert code == 0 and out.strip() == "team_9  read"
    code, out, _ = run(capsys, "assets", "visibility", aid, "public", "--json")
    assert code == 0 and json.loads(out)["visibility"] == "public"
    code, out, _ = run(capsys, "assets", "move", aid, "--org", "org_1", "--visibility",
                       "organization", "--json")
    moved = json.loads(out)
    assert (moved["organization_id"], moved["visibility"], moved["created_by"]) == (
        "org_1", "organization", "user_alice")
    code, out, _ = run(capsys, "assets", "delete", aid, "--json")
    assert code == 0 and json.loads(out) == {"asset_id": aid, "deleted": True}
    code, out, err = run(capsys, "assets", "get", aid)
    assert code == 1 and f"not_found: asset {aid} not found" in err


def test_refusals_exit_1_with_chronicles_code_and_message(
    srv: Standalone, as_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    aid = new_asset(srv)
    alice = srv.client("user_alice")
    exp = alice.experiments.create("e")
    alice.experiments.add_variation(exp.experiment_id, "v", inputs=[aid])
    code, _, err = run(capsys, "assets", "delete", aid)
    assert code == 1 and "asset_linked: " in err and "referenced" in err
    code, _, err = run(capsys, "assets", "move", aid, "--org", "org_elsewhere")
    assert code == 1 and "forbidden: " in err
    as_user("user_bob")
    code, _, err = run(capsys, "assets", "deprecate", aid, "--reason", "x")
    assert code == 1 and "not_found: " in err  # bob cannot read it: not even its existence
    alice.assets.grant_access(aid, principal_id="user_bob", action="read")
    code, _, err = run(capsys, "assets", "deprecate", aid, "--reason", "x")
    assert code == 1 and "forbidden: write access" in err
    code, _, err = run(capsys, "assets", "grant", aid, "--principal", "user_bob",
                       "--action", "administer")
    assert code == 1 and "forbidden: administer access" in err
    assert srv.tokens["user_bob"] not in err
    code, _, err = run(capsys, "assets", "visibility", aid, "secret")
    assert code == 2  # a usage error, not a refusal


def test_me(srv: Standalone, as_user: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "me", "--json")
    assert code == 0 and json.loads(out) == {
        "principal_id": "user_alice",
        "scopes": [{"id": "org_1", "kind": "organization", "name": "Org 1"},
                   {"id": "team_9", "kind": "team", "name": "Team 9"}]}
    code, out, _ = run(capsys, "me")
    assert code == 0 and "principal: user_alice" in out and "team_9" in out


def test_no_url_and_no_daemon_exits_3(
    as_user: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CHRONICLE_AGENT_CHRONICLE__URL")
    code, _, err = run(capsys, "me")
    assert code == 3 and "chronicle-agent daemon" in err


def test_the_daemons_embedded_server_is_found_unconfigured(
    daemon_env: DaemonProc, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "me", "--json")
    assert code == 0 and json.loads(out)["principal_id"].startswith("user_")
    daemon_env.client().request("POST", "/v1/assets/inline",
                                {"asset_type": "notes", "content": "hi"})
    jobs = daemon_env.client().list_jobs()
    final = daemon_env.client().wait_job(jobs[-1]["job_id"], 30)
    code, out, _ = run(capsys, "assets", "get", final["asset_id"], "--json")
    assert code == 0 and json.loads(out)["asset_type"] == "notes"
    daemon_env.kill()  # endpoint.json is left behind by a killed daemon
    code, _, err = run(capsys, "me")
    assert code == 3 and "does not answer" in err


def test_search_prints_a_table_or_json_of_what_you_may_read(
    srv: Standalone, as_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = srv.client("user_alice").assets
    mine = alice.create_inline(asset_type="report", content="# Zebrafish ablation\n\nresults",
                               content_type="text/markdown").asset_id
    alice.invalidate(mine, reason="wrong split")
    shown = alice.create_inline(asset_type="note", content="zebrafish \x1b[31mred\x1b[0m",
                                visibility="public").asset_id
    code, out, _ = run(capsys, "assets", "search", "zebrafish")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ASSET", "TYPE", "STATE", "FLAGS", "CREATED",
                                              "TEXT"]
    row = next(ln for ln in lines if ln.startswith(mine))
    assert "report" in row and "invalidated" in row and row.endswith("# Zebrafish ablation")
    assert "\x1b" not in out and any(ln.startswith(shown) for ln in lines)
    code, out, _ = run(capsys, "assets", "search", "zebra", "--type", "report", "--json")
    hits = json.loads(out)["assets"]
    assert code == 0 and [h["asset_id"] for h in hits] == [mine]
    assert hits[0]["invalidated"]["reason"] == "wrong split" and "[Zebrafish]" in hits[0][
        "snippet"]
    as_user("user_bob")  # may read only the public one
    code, out, err = run(capsys, "assets", "search", "zebrafish", "--json")
    assert [h["asset_id"] for h in json.loads(out)["assets"]] == [shown]
    code, out, err = run(capsys, "assets", "search", "ablation")
    assert code == 0 and out == "" and "no asset you may read matches" in err


def test_search_against_a_server_without_it_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with standalone_server(tmp_path / "s", PRINCIPALS, search=False) as s:
        monkeypatch.setenv("CHRONICLE_AGENT_CHRONICLE__URL", s.url)
        monkeypatch.setenv("CHRONICLE_AGENT_CHRONICLE__TOKEN", s.tokens["user_alice"])
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
        code, out, err = run(capsys, "assets", "search", "anything")
        assert code == 1 and "does not offer search" in err, (out, err)
        with pytest.raises(Exception, match="does not offer search"):
            s.client("user_alice").assets.search("anything")
