"""The whole path, for real: a real daemon process with its embedded local Chronicle, real
files, the CLI and ``Run`` as users call them, downloads compared byte for byte."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.chronicle.sdk import Chronicle
from agent.run import Run
from tests.support.helpers_daemon import DaemonProc
from tests.support.helpers_e2e import MiB, assert_same_tree, write_random


def mixed_tree(root: Path, big_bytes: int = 200 * MiB) -> Path:
    root.mkdir(parents=True)
    (root / "empty.bin").write_bytes(b"")
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "nested" / "deeper" / "weights 01.bin").write_bytes(os.urandom(300_000))
    (root / "nested" / "données-été ✓.json").write_text(json.dumps({"step": 12000}))
    write_random(root / "model.safetensors", big_bytes)
    return root


def cli_json(daemon: DaemonProc, *args: str) -> dict[str, object]:
    res = daemon.run_cli(*args, "--json", timeout_s=300)
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    return out


def test_directory_through_cli_ends_ready_and_downloads_identical(
    any_daemon: DaemonProc, tmp_path: Path
) -> None:
    daemon = any_daemon
    src = mixed_tree(tmp_path / "ckpt")
    job = cli_json(daemon, "upload", str(src), "--type", "checkpoint", "--wait")
    assert job["state"] == "done", job
    assert job["bytes_done"] == job["bytes_total"] == sum(
        p.stat().st_size for p in src.rglob("*") if p.is_file())
    asset_id = str(job["asset_id"])
    dest = tmp_path / "restored"
    got = cli_json(daemon, "download", asset_id, str(dest))
    assert got["asset_id"] == asset_id
    assert_same_tree(src, dest)
    names = sorted(f["name"] for f in got["files"])  # type: ignore[attr-defined]
    assert "nested/données-été ✓.json" in names and "nested/deeper/weights 01.bin" in names
    assert not [p for p in tmp_path.iterdir() if ".chronicle-partial-" in p.name]
    lag_ms = daemon.client().health()["loop_lag_max_ms"]
    print(f"longest event-loop delay during the upload: {lag_ms} ms")
    assert lag_ms < 1000, "the event loop was blocked"


def test_run_upload_directory_async_ends_ready(
    any_daemon_env: DaemonProc, tmp_path: Path
) -> None:
    src = mixed_tree(tmp_path / "ckpt", big_bytes=80 * MiB)  # above the multipart threshold
    run = Run(run_id="run_dirasync")
    handle = run.upload_directory_async(src)
    job = handle.wait(timeout_s=240)
    assert job["state"] == "done"
    chron = Chronicle()
    asset = chron.assets.get(job["asset_id"])
    assert asset.state == "ready"
    assert asset.output_of == "run_dirasync"
    assert {c.name for c in asset.components} == {
        "empty.bin", "model.safetensors", "nested/deeper/weights 01.bin",
        "nested/données-été ✓.json"}
    dest = tmp_path / "dl"
    chron.assets.download(job["asset_id"], dest)
    assert_same_tree(src, dest)


def test_inline_json_and_markdown_end_ready_with_their_content_type(
    any_daemon_env: DaemonProc,
) -> None:
    run = Run(run_id="run_inline")
    j = run.upload_asset(asset_type="takeaways_report",
                         content={"summary": "Loss converged at step 12000"}).wait(timeout_s=60)
    md = run.upload_asset(asset_type="hypothesis_report", content="# H1\n\nIt converges.",
                          content_type="text/markdown").wait(timeout_s=60)
    chron = Chronicle()
    a = chron.assets.get(j["asset_id"])
    b = chron.assets.get(md["asset_id"])
    assert (a.state, a.content_type, a.output_of) == ("ready", "application/json", "run_inline")
    assert (b.state, b.content_type) == ("ready", "text/markdown")


def test_three_step_presigned_flow_through_the_daemon(
    any_daemon_env: DaemonProc, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_random(out / "model.safetensors", 70 * MiB)
    (out / "optimizer.pt").write_bytes(os.urandom(123_456))
    (out / "metadata.json").write_text('{"step": 1}')
    run = Run(run_id="run_threestep")
    upload_info = run.create_asset_presigned(
        asset_type="checkpoint",
        components=["model.safetensors", "optimizer.pt", "metadata.json"],
    )
    handles = [
        run.upload_component(url, local_path=out / filename,
                             content_type="application/octet-stream")
        for filename, url in upload_info.upload_urls.items()
    ]
    fin = run.finalize_asset(upload_info.asset_id).wait(timeout_s=240)
    assert fin["state"] == "done"
    assert all(h.wait(timeout_s=10)["state"] == "done" for h in handles)
    asset = Chronicle().assets.get(upload_info.asset_id)
    assert asset.state == "ready"
    sizes = {c.name: c.size for c in asset.components}
    assert sizes == {"model.safetensors": 70 * MiB, "optimizer.pt": 123_456,
                     "metadata.json": 11}
    dest = tmp_path / "dl"
    Chronicle().assets.download(upload_info.asset_id, dest)
    assert_same_tree(out, dest)


def test_finalize_without_uploading_a_component_fails_clearly(
    any_daemon_env: DaemonProc, tmp_path: Path
) -> None:
    run = Run(run_id="run_missing")
    info = run.create_asset_presigned(asset_type="checkpoint", components=["a.bin", "b.bin"])
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    run.upload_component(info.upload_urls["a.bin"], local_path=tmp_path / "a.bin")
    job = run.finalize_asset(info.asset_id).wait(timeout_s=60, raise_on_failure=False)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "components_missing"
    assert "b.bin" in job["error"]["message"]


@pytest.mark.parametrize("bad", ["../escape.bin", "/abs.bin", "a//b", "a/./b", "nul\x00"])
def test_bad_component_names_are_refused(daemon: DaemonProc, bad: str) -> None:
    from agent.errors import ApiError

    with pytest.raises(ApiError) as e:
        daemon.client().request("POST", "/v1/assets/presigned",
                                {"asset_type": "checkpoint", "components": [bad]})
    assert e.value.status == 400 and e.value.code == "invalid_request"
    assert "component name" in e.value.message
