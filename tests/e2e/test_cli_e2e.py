"""The CLI and ``Run`` against a real daemon process (with its embedded local Chronicle)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import cli
from agent.errors import ApiError, JobFailed
from agent.run import Run
from tests.support.helpers_daemon import DaemonProc, start_daemon

WAIT_S = 60


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[DaemonProc]:
    with start_daemon() as d:
        yield d


@pytest.fixture
def d(shared_daemon: DaemonProc, monkeypatch: pytest.MonkeyPatch) -> DaemonProc:
    """The module's daemon, with this process's environment pointed at it."""
    for key in list(os.environ):
        if key.startswith("CHRONICLE_AGENT_") or key == "METHODIC_RUN_ID":
            monkeypatch.delenv(key)
    for key in ("CHRONICLE_AGENT_SOCKET", "CHRONICLE_AGENT_AGENT__STATE_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, shared_daemon.env[key])
    return shared_daemon


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _out_json(capsys: pytest.CaptureFixture[str]) -> Any:
    out = capsys.readouterr().out
    return json.loads(out)


def test_status(d: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("status", "--json") == 0
    health = _out_json(capsys)
    assert health["version"]
    assert health["chronicle_url"].startswith("http")
    assert isinstance(health["queue"], dict)
    assert cli("status") == 0
    assert health["chronicle_url"] in capsys.readouterr().out


def test_status_as_a_subprocess(d: DaemonProc) -> None:
    run = d.run_cli("status", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["version"]


def test_upload_file_wait_then_download(
    d: DaemonProc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(300_000))
    assert cli("upload", str(src), "--type", "checkpoint", "--wait", "--json") == 0, (
        capsys.readouterr().err
    )
    job = _out_json(capsys)
    assert job["state"] == "done" and job["kind"] == "upload"
    assert job["bytes_done"] == job["bytes_total"] == 300_000
    asset_id = job["asset_id"]
    assert asset_id

    dest = tmp_path / "dl"
    assert cli("download", asset_id, str(dest), "--json") == 0, capsys.readouterr().err
    result = _out_json(capsys)
    assert result == {
        "asset_id": asset_id,
        "dest": str(dest),
        "files": [{"name": "model.bin", "size": 300_000, "sha256": _sha256(src)}],
        "cached": False, "fetched": 1, "fetched_bytes": 300_000,  # nothing in the node cache
    }
    assert (dest / "model.bin").read_bytes() == src.read_bytes()


def test_upload_directory_keeps_relative_names(
    d: DaemonProc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "step-10"
    (src / "shards").mkdir(parents=True)
    (src / "metadata.json").write_text('{"step": 10}')
    (src / "shards" / "0.bin").write_bytes(os.urandom(70_000))
    (src / "shards" / "1.bin").write_bytes(b"")
    assert cli("upload", str(src), "--type", "checkpoint", "--wait") == 0, capsys.readouterr().err
    asset_id = capsys.readouterr().out.strip()
    assert asset_id

    dest = tmp_path / "empty"
    dest.mkdir()
    assert cli("download", asset_id, str(dest)) == 0, capsys.readouterr().err
    assert _tree(dest) == _tree(src)


def test_upload_without_wait_returns_a_job(
    d: DaemonProc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "f.txt"
    src.write_text("hello")
    assert cli("upload", str(src), "--type", "notes", "--run", "run_cli_e2e") == 0
    job_id = capsys.readouterr().out.strip()
    job = d.client().wait_job(job_id, WAIT_S)
    assert job["state"] == "done", job
    assert cli("jobs", "--json", "--run", "run_cli_e2e") == 0
    jobs = _out_json(capsys)["jobs"]
    assert job_id in [j["job_id"] for j in jobs]
    assert all(j["run_id"] == "run_cli_e2e" for j in jobs)
    assert cli("jobs") == 0
    assert job_id in capsys.readouterr().out


def test_upload_inline(d: DaemonProc, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("upload-inline", "--type", "takeaways_report", "--json-content",
               '{"summary": "Loss converged"}', "--wait") == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()
    md = tmp_path / "hypothesis.md"
    md.write_text("# Hypothesis\n\nIt works.\n")
    assert cli("upload-inline", "--type", "hypothesis_report", "--file", str(md),
               "--wait", "--json") == 0, capsys.readouterr().err
    job = _out_json(capsys)
    assert job["state"] == "done" and job["asset_id"]


def test_refusals_exit_1(d: DaemonProc, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("cancel", "job_does_not_exist") == 1
    assert "not_found" in capsys.readouterr().err
    assert cli("retry", "job_does_not_exist") == 1
    capsys.readouterr()
    assert cli("download", "asset_does_not_exist", str(tmp_path / "x")) == 1
    assert "error" in capsys.readouterr().err


def test_guide_samples_unchanged(
    d: DaemonProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assets guide's Python samples, as written, against the daemon."""
    monkeypatch.setenv("METHODIC_RUN_ID", "run_guide_e2e")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for filename in ("model.safetensors", "optimizer.pt", "metadata.json"):
        (out / filename).write_bytes(os.urandom(1000 + len(filename)))

    run = Run()
    assert run.run_id == "run_guide_e2e"

    # Worker side — auto-populates output_of from the bound run
    inline = run.upload_asset(
        asset_type="takeaways_report",
        content={
            "summary": "Loss converged at step 12000",
            "key_findings": ["validation loss flat after step 9000"],
        },
    )

    # 1. Register the asset and get presigned URLs (one per component)
    upload_info = run.create_asset_presigned(
        asset_type="checkpoint",
        components=["model.safetensors", "optimizer.pt", "metadata.json"],
    )
    # 2. PUT each component to its presigned URL
    handles = []
    for filename, url in upload_info.upload_urls.items():
        handles.append(run.upload_component(url, local_path=Path(f"./out/{filename}"),
                                            content_type="application/octet-stream"))
    # 3. Finalize — asset transitions to `ready` and becomes immutable
    final = run.finalize_asset(upload_info.asset_id)

    directory = run.upload_directory_async(out)

    assert inline.wait(WAIT_S)["state"] == "done"
    for h in handles:
        assert h.wait(WAIT_S)["state"] == "done"
    assert final.wait(WAIT_S)["asset_id"] == upload_info.asset_id
    assert directory.wait(WAIT_S)["state"] == "done"
    assert directory.asset_id and directory.asset_id != upload_info.asset_id

    dest = tmp_path / "back"
    job = d.client().request(
        "POST", "/v1/downloads", {"asset_id": upload_info.asset_id, "dest": str(dest)}
    )
    assert d.client().wait_job(job["job_id"], WAIT_S)["state"] == "done"
    assert _tree(dest) == _tree(out)
    run.finish()


def test_run_context_manager_and_failures(d: DaemonProc, tmp_path: Path) -> None:
    with Run("run_ctx_e2e") as run:
        h = run.upload_asset("notes", "plain text", content_type="text/plain")
        assert h.wait(WAIT_S)["state"] == "done"
        with pytest.raises((ApiError, JobFailed)):
            run.finalize_asset("asset_does_not_exist").wait(WAIT_S)
    bad = Run("run_ctx_e2e", register=False)
    with pytest.raises((ApiError, JobFailed)):
        h = bad.upload_component("http://127.0.0.1:9/not-a-presigned-url",
                                 local_path=__file__)
        h.wait(WAIT_S)


def test_stopped_daemon_exits_3(daemon_env: DaemonProc,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """A daemon of its own (conftest's ``daemon_env``): stop it, then start it again."""
    assert cli("status") == 0
    assert daemon_env.stop() == 0
    assert cli("status") == 3
    assert str(daemon_env.socket_path) in capsys.readouterr().err
    daemon_env.restart()
    assert cli("status") == 0
