"""Watching never loses a checkpoint silently: a decision is about the file or directory it
was made on (a second run writing the same paths makes new checkpoints), roots that do not
exist yet are watched from their parents, a file renamed into place from elsewhere is sealed
by its own format, and what could not be captured is a ``lost`` job, a WARNING line and a
count in ``/metrics``. Real daemons, real writer processes, real files."""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

from tests.support.helpers_daemon import DaemonProc
from tests.support.helpers_e2e import socket_get_text
from tests.support.helpers_watch import (
    by_checkpoint,
    download,
    script,
    tree,
    wait_jobs_terminal,
    wait_until,
    watch_daemon,
)


def write_step(out: Path, step: int, seed: int) -> dict[str, bytes]:
    """A checkpoint directory written in place, its marker last (the Trainer's way)."""
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    files = {"model.bin": random.Random(seed).randbytes(50_000), "trainer_state.json": b"{}"}
    (ck / "model.bin").write_bytes(files["model.bin"])
    (ck / "trainer_state.json").write_bytes(files["trainer_state.json"])
    return files


def unsealed_dir(d: DaemonProc, ck: Path, size: int) -> Path:
    """A checkpoint directory with one file and no seal, once the daemon has seen it."""
    ck.mkdir()
    (ck / "model.bin").write_bytes(b"w" * size)
    wait_until(lambda: d.client().request("GET", "/v1/health")["staging"]["unsealed"] == 1,
               15, f"{ck.name} seen unsealed")
    return ck


def done_contents(d: DaemonProc, path: Path, tmp: Path) -> list[dict[str, bytes]]:
    """The downloaded content of every ready asset of one checkpoint path."""
    out = []
    for i, j in enumerate(by_checkpoint(d).get(str(path), [])):
        if j["state"] == "done":
            out.append(tree(download(d, j["asset_id"], tmp / f"dl-{path.name}-{i}")))
    return out


def test_a_second_run_at_the_same_paths_makes_new_checkpoints(tmp_path: Path) -> None:
    """checkpoint-2 sealed, deleted and written again (events), then again while the daemon
    is stopped (the start rescan), then again in place of a directory the daemon had
    decided (same path, other inode or other birth): three checkpoints, three assets."""
    out = tmp_path / "out"
    out.mkdir()
    with watch_daemon([{"path": f"{out}/checkpoint-*", "run_id": "run_rerun"}]) as d:
        first = write_step(out, 2, seed=1)
        wait_jobs_terminal(d, 1)
        shutil.rmtree(out / "checkpoint-2")
        second = write_step(out, 2, seed=2)
        wait_jobs_terminal(d, 2)
        d.stop()
        shutil.rmtree(out / "checkpoint-2")
        third = write_step(out, 2, seed=3)
        d.start()
        js = wait_jobs_terminal(d, 3)
        assert [j["state"] for j in js] == ["done"] * 3, js
        got = done_contents(d, out / "checkpoint-2", tmp_path)
        assert sorted(g["model.bin"] for g in got) == sorted(
            f["model.bin"] for f in (first, second, third))
        assert d.log_text().count("sealed (marker)") == 3


def test_a_root_created_after_the_start_is_watched_from_its_parent(tmp_path: Path) -> None:
    """The Trainer creates its output directory a few seconds into the run: with rescans
    only every 10 minutes, only the watch on the nearest existing parent can find what is
    written there; a checkpoint rotated away 2 s after its save is captured."""
    out = tmp_path / "later" / "deeper" / "out"
    env = {"CHRONICLE_AGENT_WATCHER__RESCAN_S": "600"}
    with watch_daemon([{"path": f"{out}/checkpoint-*", "run_id": "run_late"}], env) as d:
        wait_until(lambda: "missing root(s) from their parents" in d.log_text(), 10,
                   "the watchers")
        out.mkdir(parents=True)
        files = write_step(out, 1, seed=7)
        wait_until(lambda: by_checkpoint(d).get(str(out / "checkpoint-1")), 15,
                   "checkpoint-1 sealed")
        shutil.rmtree(out / "checkpoint-1")  # the writer's rotation
        [job] = wait_jobs_terminal(d, 1)
        assert job["state"] == "done", job
        assert done_contents(d, out / "checkpoint-1", tmp_path) == [files]


def test_a_checkpoint_deleted_before_its_seal_is_lost_visibly(tmp_path: Path) -> None:
    """A directory whose marker never comes, deleted: a ``lost`` job with why, a WARNING
    line, a count in /metrics, and the run's end counts it."""
    out = tmp_path / "out"
    out.mkdir()
    rule = {"path": f"{out}/step-*", "seal": ["marker"], "run_id": "run_lost"}
    with watch_daemon([rule]) as d:
        ck = unsealed_dir(d, out / "step-5", 10_000)
        shutil.rmtree(ck)
        [job] = wait_jobs_terminal(d, 1)
        assert job["state"] == "lost", job
        assert job["error"]["code"] == "deleted_before_seal", job
        assert "1 file(s), 10000 bytes" in job["error"]["message"]
        lines = [ln for ln in d.log_text().splitlines() if "step-5 lost" in ln]
        assert lines and "WARNING" in lines[0], d.log_text()[-2000:]
        metrics = socket_get_text(d.socket_path, "/metrics")
        assert 'chronicle_agent_checkpoints_total{fate="lost",reason="deleted_before_seal"} 1' \
            in metrics
        assert 'chronicle_agent_jobs{state="lost"} 1' in metrics
        r = d.run_cli("jobs", "--state", "lost", "--json")
        assert r.returncode == 0 and str(ck) in r.stdout and "deleted_before_seal" in r.stdout, r


def test_a_file_renamed_into_place_then_kill_9_is_sealed_by_its_format(tmp_path: Path) -> None:
    """Lightning's way: torch.save into the temp directory, a rename into place, and the
    training killed 0.1 s later. The file is whole by its own structure: sealed and
    uploaded, not abandoned as unsealed."""
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    writer = script(tmp_path, "w.py", f"""
        import os, signal, time, torch
        torch.manual_seed(0)
        tmp = os.path.join({str(elsewhere)!r}, "tmpabc")
        torch.save({{"w": torch.randn(256, 256), "epoch": 3}}, tmp)
        os.replace(tmp, os.path.join({str(out)!r}, "last.ckpt"))
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    with watch_daemon() as d:
        r = d.run_cli("exec", "--run", "run_light", "--watch", str(out), "--type", "checkpoint",
                      "--", sys.executable, str(writer))
        assert r.returncode == 128 + 9, r
        [job] = wait_jobs_terminal(d, 1, "run_light")
        assert job["state"] == "done", job
        assert "sealed (format)" in d.log_text()
        got = tree(download(d, job["asset_id"], tmp_path / "dl"))
        assert got == {"last.ckpt": (out / "last.ckpt").read_bytes()}


def test_renamed_between_candidate_names_is_not_lost(tmp_path: Path) -> None:
    """A checkpoint written under one name the rule matches and renamed to another: the
    same inode under its new name, sealed by the rename; nothing recorded as lost."""
    out = tmp_path / "out"
    out.mkdir()
    rule = {"path": f"{out}/*", "seal": ["rename_dir", "quiescence"], "quiescence_s": 30.0,
            "run_id": "run_mv"}
    with watch_daemon([rule]) as d:
        part = unsealed_dir(d, out / "step-3.partial", 5000)
        os.rename(part, out / "step-3")
        [job] = wait_jobs_terminal(d, 1)
        assert job["state"] == "done" and job["checkpoint"] == str(out / "step-3"), job
        assert "sealed (rename_dir)" in d.log_text()
        assert "lost" not in d.log_text()


def orbax_save(out: Path, step: int, payload: bytes) -> None:
    """The file operations of orbax-checkpoint 0.12.8's CheckpointManager.save on a local
    filesystem, in the order strace showed them (jax is too heavy for the test
    environment): a ``N.orbax-checkpoint-tmp`` directory, the item's own temporary
    directory renamed inside it, ``_CHECKPOINT_METADATA`` rewritten in place three times,
    ``commit_success.txt`` last, then the rename to ``N``."""
    tmp = out / f"{step}.orbax-checkpoint-tmp"
    tmp.mkdir()
    meta = tmp / "_CHECKPOINT_METADATA"
    meta.write_text('{"init_timestamp_nsecs": 1}')
    item = tmp / "default.orbax-checkpoint-tmp"
    (item / "ocdbt.process_0" / "d").mkdir(parents=True)
    (item / "ocdbt.process_0" / "d" / "f0a1").write_bytes(payload)
    lock = item / "ocdbt.process_0" / "manifest.ocdbt.__lock"
    lock.write_bytes(b"manifest")
    os.rename(lock, item / "ocdbt.process_0" / "manifest.ocdbt")
    (item / "_METADATA").write_text("{}")
    meta.write_text('{"init_timestamp_nsecs": 1, "item_handlers": {}}')
    (item / "commit_success.txt").write_text("ok")
    os.rename(item, tmp / "default")
    meta.write_text('{"init_timestamp_nsecs": 1, "commit_timestamp_nsecs": 2}')
    (tmp / "commit_success.txt").write_text(f"Checkpoint commit was successful to {out}/{step}")
    os.rename(tmp, out / str(step))


def test_orbax_sequence_as_traced_is_sealed_by_default_rules(tmp_path: Path) -> None:
    """Default rules (``exec --watch``): every Orbax step sealed once, none under its
    temporary name, with max_to_keep=2's in-place deletion of old steps after each save."""
    out = tmp_path / "ckpts"
    out.mkdir()
    with watch_daemon() as d:
        d.client().request("POST", "/v1/runs", {"run_id": "run_orbax", "watch": [
            {"path": f"{out}/*", "asset_type": "checkpoint"}]})
        payloads = {s: random.Random(s).randbytes(20_000) for s in range(4)}
        for s in range(4):
            orbax_save(out, s, payloads[s])
            wait_until(lambda s=s: by_checkpoint(d).get(str(out / str(s))), 15, f"step {s}")
            if s >= 2:
                shutil.rmtree(out / str(s - 2))  # max_to_keep=2, in place
        js = wait_jobs_terminal(d, 4)
        assert sorted(j["checkpoint"] for j in js) == [str(out / str(s)) for s in range(4)]
        assert all(j["state"] == "done" for j in js), js
        for j in js:
            s = int(Path(j["checkpoint"]).name)
            got = tree(download(d, j["asset_id"], tmp_path / f"dl{s}"))
            assert got["default/ocdbt.process_0/d/f0a1"] == payloads[s]
        assert "orbax-checkpoint-tmp" not in "".join(j["checkpoint"] for j in js)
