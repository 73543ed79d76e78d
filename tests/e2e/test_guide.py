"""Every code sample of the assets guide (shared/seed/assets-guide.txt), in the guide's order,
run as written — only ids and paths filled in — against a real daemon and its embedded local
Chronicle. Each test quotes its sample between ``# --- sample ---`` lines; what follows them
checks the effect.

``chronicle`` is ``Chronicle()`` (found through the daemon's ``endpoint.json``) and ``run`` is
``Run()`` (its id from ``METHODIC_RUN_ID``), as a worker and a researcher would make them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import Chronicle, Run
from agent.chronicle import contract
from agent.errors import AssetInvalid, AssetLinked, NotFound
from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_e2e import assert_same_tree

WAIT_S = 60
RUN_ID = "run_guide"
state: dict[str, Any] = {}


@pytest.fixture(scope="module")
def guide_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    with start_daemon() as d:
        yield d


@pytest.fixture(autouse=True)
def env(guide_daemon: DaemonProc, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DaemonProc:
    """This process pointed at the module's daemon, in a fresh working directory."""
    for key in list(os.environ):
        if key.startswith("CHRONICLE_AGENT_") or key == "METHODIC_RUN_ID":
            monkeypatch.delenv(key)
    for key in ("CHRONICLE_AGENT_SOCKET", "CHRONICLE_AGENT_AGENT__STATE_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, guide_daemon.env[key])
    monkeypatch.setenv("METHODIC_RUN_ID", RUN_ID)
    monkeypatch.chdir(tmp_path)
    return guide_daemon


@pytest.fixture
def run() -> Run:
    return Run()


@pytest.fixture
def chronicle() -> Chronicle:
    return Chronicle()


def tokens_file(d: DaemonProc) -> Path:
    return Path(json.loads((d.state_dir / "server" / "endpoint.json").read_text())["tokens_file"])


def add_principal(d: DaemonProc, principal_id: str, scopes: list[dict[str, str]]) -> Chronicle:
    """Another principal on the daemon's embedded server (the server re-reads the file)."""
    path = tokens_file(d)
    data = json.loads(path.read_text())
    token = f"tok-{principal_id}"
    data["tokens"][token] = {"principal_id": principal_id, "scopes": scopes}
    path.write_text(json.dumps(data))
    return Chronicle(url=Chronicle().url, token=token)


def content_of(chronicle: Chronicle, asset_id: str, dest: Path) -> bytes:
    chronicle.assets.download(asset_id, dest)
    return (dest / "content").read_bytes()


# ---- Inline (small structured payloads) -------------------------------------------------------


def test_inline_worker_side(run: Run, chronicle: Chronicle, tmp_path: Path) -> None:
    # --- sample ---
    # Worker side — auto-populates output_of from the bound run
    handle = run.upload_asset(
        asset_type="takeaways_report",
        content={
            "summary": "Loss converged at step 12000",
            "key_findings": [...],
        },
    )
    # --- sample ---
    job = handle.wait(WAIT_S)
    asset = chronicle.assets.get(job["asset_id"])
    assert (asset.state, asset.asset_type, asset.output_of) == (
        "ready", "takeaways_report", RUN_ID)
    assert asset.content_type == "application/json"
    assert json.loads(content_of(chronicle, asset.asset_id, tmp_path / "dl")) == {
        "summary": "Loss converged at step 12000", "key_findings": ["..."]}


def test_inline_researcher_side(chronicle: Chronicle) -> None:
    # --- sample ---
    # Researcher side — explicit (no run context)
    asset = chronicle.assets.create_inline(
        asset_type="research_report",
        content={"notes": "..."},
    )
    # --- sample ---
    assert (asset.state, asset.output_of, asset.asset_type) == ("ready", None, "research_report")
    assert [c.name for c in asset.components] == ["content"]


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the sample leaves its file to the GC
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_markdown_plain_text(chronicle: Chronicle, tmp_path: Path) -> None:
    Path("hypothesis.md").write_text("# H1\n\nThe wake sheds vortices above Re=47.\n")
    # --- sample ---
    hypothesis = open("hypothesis.md").read()
    asset = chronicle.assets.create_inline(
        asset_type="hypothesis_report",
        content=hypothesis,
        content_type="text/markdown",
    )
    # --- sample ---
    assert asset.content_type == "text/markdown" and asset.state == "ready"
    assert content_of(chronicle, asset.asset_id, tmp_path / "dl").decode() == hypothesis


# ---- Binary (presigned URL flow) ------------------------------------------------------------


def test_binary_presigned_flow(run: Run, chronicle: Chronicle, tmp_path: Path) -> None:
    out = Path("out")
    out.mkdir()
    (out / "model.safetensors").write_bytes(os.urandom(3_000_000))
    (out / "optimizer.pt").write_bytes(os.urandom(1_000_000))
    (out / "metadata.json").write_text('{"step": 12000}')
    # --- sample ---
    # 1. Register the asset and get presigned URLs (one per component)
    upload_info = run.create_asset_presigned(
        asset_type="checkpoint",
        components=["model.safetensors", "optimizer.pt", "metadata.json"],
    )
    # 2. PUT each component to its presigned URL
    for filename, url in upload_info.upload_urls.items():
        run.upload_component(url, local_path=Path(f"./out/{filename}"), content_type="application/octet-stream")
    # 3. Finalize — asset transitions to `ready` and becomes immutable
    run.finalize_asset(upload_info.asset_id)
    # --- sample ---
    assert chronicle.assets.get(upload_info.asset_id).state in ("pending", "ready")
    jobs = run.jobs()
    for j in jobs:
        if j.get("asset_id") == upload_info.asset_id:
            assert run.job(j["job_id"]).wait(WAIT_S)["state"] == "done"
    asset = chronicle.assets.get(upload_info.asset_id)
    assert asset.state == "ready" and asset.output_of == RUN_ID
    assert {c.name: c.size for c in asset.components} == {
        "model.safetensors": 3_000_000, "optimizer.pt": 1_000_000, "metadata.json": 15}
    assert all(c.sha256 for c in asset.components)
    state["checkpoint"] = asset.asset_id
    state["checkpoint_src"] = out.absolute()


def test_upload_directory_async(run: Run, chronicle: Chronicle, tmp_path: Path) -> None:
    ckpt = tmp_path / "step-1000"
    (ckpt / "shards").mkdir(parents=True)
    (ckpt / "shards" / "0001.bin").write_bytes(os.urandom(500_000))
    (ckpt / "config.json").write_text("{}")
    # --- sample ---
    handle = run.upload_directory_async(ckpt)
    # --- sample ---
    job = handle.wait(WAIT_S)
    asset = chronicle.assets.get(job["asset_id"])
    assert asset.state == "ready" and asset.output_of == RUN_ID
    assert sorted(c.name for c in asset.components) == ["config.json", "shards/0001.bin"]


# ---- Asset states -----------------------------------------------------------------------------


def test_asset_states(chronicle: Chronicle) -> None:
    """pending → ready (finalize); pending → abandoned (the run failed before finalize)."""
    chronicle.send(contract.create_run("run_guide_states"))
    pending = chronicle.send(contract.register("checkpoint", ["a.bin"],
                                               output_of="run_guide_states"))
    assert chronicle.assets.get(pending.asset_id).state == "pending"
    chronicle.send(contract.end_run("run_guide_states", "failed"))
    assert chronicle.assets.get(pending.asset_id).state == "abandoned"
    assert chronicle.assets.get(state["checkpoint"]).state == "ready"


# ---- Validity flags ---------------------------------------------------------------------------


def test_validity_flags(chronicle: Chronicle) -> None:
    """deprecated: a soft warning, still usable; invalidated: refused as a new input unless
    allow_invalid_assets; a retracted experiment's outputs are invalidated."""
    old = chronicle.assets.create_inline(asset_type="dataset", content="v1").asset_id
    bad = chronicle.assets.create_inline(asset_type="dataset", content="v2").asset_id
    out = chronicle.assets.create_inline(asset_type="takeaways_report", content="r").asset_id
    chronicle.assets.deprecate(old, reason="superseded by v3")
    chronicle.assets.invalidate(bad, reason="labeling bug")
    exp = chronicle.experiments.create("cylinder wake")
    var = chronicle.experiments.add_variation(exp.experiment_id, "re100", inputs=[old])
    assert var.warnings and "superseded by v3" in var.warnings[0]["reason"]
    with pytest.raises(AssetInvalid) as e:
        chronicle.experiments.add_variation(exp.experiment_id, "re200", inputs=[bad])
    assert e.value.code == "asset_invalid" and e.value.status == 409
    var2 = chronicle.experiments.add_variation(exp.experiment_id, "re200", inputs=[bad],
                                               allow_invalid_assets=True)
    assert var2.inputs == [bad]
    chronicle.experiments.add_output(var.variation_id, out)
    retracted = chronicle.experiments.retract(exp.experiment_id, reason="wrong baseline")
    assert retracted.invalidated == [out]
    flagged = chronicle.assets.get(out)
    assert flagged.invalidated and "wrong baseline" in flagged.invalidated.reason
    assert flagged.state == "ready"  # flags are orthogonal to state
    state["linked"] = old


# ---- Downloading ------------------------------------------------------------------------------


def test_downloading(chronicle: Chronicle, tmp_path: Path) -> None:
    asset_id = state["checkpoint"]
    # --- sample ---
    asset = chronicle.assets.get(asset_id, include_presigned=True)
    # --- sample ---
    assert set(asset.download_urls or {}) == {"model.safetensors", "optimizer.pt",
                                              "metadata.json"}
    got = chronicle.assets.download(asset, tmp_path / "restored")
    assert_same_tree(state["checkpoint_src"], tmp_path / "restored")
    assert sorted(f["name"] for f in got["files"]) == sorted(asset.download_urls or {})
    again = chronicle.assets.download(asset_id, tmp_path / "again")  # by id, from the cache
    assert again["cached"] is True
    assert_same_tree(state["checkpoint_src"], tmp_path / "again")


# ---- Managing assets: deprecate, invalidate, delete --------------------------------------------


def test_deprecate_invalidate_delete(chronicle: Chronicle, tmp_path: Path) -> None:
    asset_id = chronicle.assets.create_inline(asset_type="dataset", content="orphan").asset_id
    # --- sample ---
    chronicle.assets.deprecate(asset_id, reason="superseded by the Re=2000 sweep")  # soft warning, still usable
    chronicle.assets.invalidate(asset_id, reason="labeling bug in the source data")  # hard block as a new input
    chronicle.assets.delete(asset_id)  # hard delete — only if unlinked
    # --- sample ---
    with pytest.raises(NotFound):
        chronicle.assets.get(asset_id)
    with pytest.raises(AssetLinked) as e:  # linked as a variation's input above
        chronicle.assets.delete(state["linked"])
    assert e.value.status == 409 and e.value.code == "asset_linked"
    kept = chronicle.assets.get(state["linked"])
    assert kept.deprecated and kept.deprecated.reason == "superseded by v3"

    flagged = chronicle.assets.create_inline(asset_type="dataset", content="x").asset_id
    chronicle.assets.deprecate(flagged, reason="superseded")
    res = chronicle.assets.download(flagged, tmp_path / "dep")  # still usable, with a warning
    assert res["warnings"] == [f"asset {flagged} is deprecated: superseded"]
    chronicle.assets.invalidate(flagged, reason="wrong data")
    with pytest.raises(AssetInvalid):
        chronicle.assets.download(flagged, tmp_path / "inv")
    assert not (tmp_path / "inv").exists()
    chronicle.assets.download(flagged, tmp_path / "inv", allow_invalid=True)


# ---- Managing assets: access control ----------------------------------------------------------


def test_access_control(env: DaemonProc, chronicle: Chronicle) -> None:
    asset_id = chronicle.assets.create_inline(asset_type="dataset", content="shared").asset_id
    abc = add_principal(env, "user_abc", [])
    member = add_principal(env, "user_nine", [{"id": "team_9", "kind": "team", "name": "Nine"}])
    with pytest.raises(NotFound):
        abc.assets.get(asset_id)
    # --- sample ---
    chronicle.assets.grant_access(asset_id, principal_id="user_abc", action="read")  # read | write | delete | administer
    # --- sample ---
    assert abc.assets.get(asset_id, include_presigned=True).download_urls
    # --- sample ---
    chronicle.assets.revoke_access(asset_id, principal_id="user_abc", action="read")
    chronicle.assets.list_access(asset_id)  # who can reach it
    chronicle.assets.share_with_scope(asset_id, scope_id="team_9")  # grant a whole team/org read
    # --- sample ---
    with pytest.raises(NotFound):
        abc.assets.get(asset_id)
    assert member.assets.get(asset_id).asset_id == asset_id
    grants = chronicle.assets.list_access(asset_id)
    assert [(g.principal_id, g.action) for g in grants] == [("team_9", "read")]
    # resolve team/org ids with chronicle.me.scopes()
    assert [s.id for s in member.me.scopes().scopes] == ["team_9"]


# ---- Managing assets: visibility and ownership --------------------------------------------------


def test_visibility_and_ownership(env: DaemonProc, chronicle: Chronicle) -> None:
    me = chronicle.me.scopes().principal_id
    path = tokens_file(env)
    data = json.loads(path.read_text())
    for entry in data["tokens"].values():  # the local user joins org_123
        if entry["principal_id"] == me:
            entry["scopes"] = [{"id": "org_123", "kind": "organization", "name": "Lab"}]
    path.write_text(json.dumps(data))
    assert [s.id for s in chronicle.me.scopes().scopes] == ["org_123"]
    outsider = add_principal(env, "user_out", [])
    colleague = add_principal(env, "user_col", [
        {"id": "org_123", "kind": "organization", "name": "Lab"}])
    asset_id = chronicle.assets.create_inline(asset_type="dataset", content="d").asset_id
    # --- sample ---
    chronicle.assets.set_visibility(asset_id, "public")  # "private" | "organization" / "team" | "public"
    # --- sample ---
    assert outsider.assets.get(asset_id).visibility == "public"
    # --- sample ---
    chronicle.assets.move(asset_id, organization_id="org_123", visibility="organization")
    # --- sample ---
    moved = chronicle.assets.get(asset_id)
    assert (moved.organization_id, moved.visibility, moved.created_by) == (
        "org_123", "organization", me)
    assert colleague.assets.get(asset_id).asset_id == asset_id
    with pytest.raises(NotFound):
        outsider.assets.get(asset_id)
