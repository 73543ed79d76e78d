"""The watcher's DEFAULT rules against the real writers: the Hugging Face Trainer,
Lightning's ModelCheckpoint and torch.distributed.checkpoint, each in its own process
under ``chronicle-agent exec --watch OUT --type checkpoint`` (no --seal, no --marker), a
real daemon with default watcher settings and its embedded Chronicle.

Each writer script (``tests/support/writers/``) copies every checkpoint in its own save callback,
right after the save returned, into a reference directory outside the watched tree and
logs it (``REF/saves.jsonl``). Once every job of the run is terminal and the run ended,
every checkpoint the writer completed must be a ``ready`` asset whose bytes, downloaded
with ``chronicle-agent download``, are those of its reference copy; no asset may hold
anything else; nothing the writer completed may end abandoned or lost.

The writers pace themselves like training (a short sleep per step stands in for compute):
a checkpoint lives a second or two before the writer's rotation deletes it, which is the
time the daemon has to capture it. Tiny models with random weights, CPU, offline."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.config import AgentSection
from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_e2e import chronicle_for
from tests.support.helpers_watch import daemon_run, script, tree, wait_until, writer_env
from tests.support.writers._common import read_saves

WRITERS = Path(__file__).resolve().parents[1] / "support" / "writers"
MiB = 1024 * 1024
HF = ("hf_train.py", "--steps", "12", "--save-steps", "2", "--limit", "2", "--pause-s", "0.4")
"""Six checkpoints, 0.8 s apart; keep-last-2, so each lives about 1.6 s."""
LIGHTNING_PAUSE = ("--pause-s", "0.2")
"""Four batches an epoch: an epoch about 0.9 s, a top-2 file lives about two of them."""


def exec_writer(d: DaemonProc, run_id: str, out: Path, ref: Path, writer: str, *args: str,
                timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """``chronicle-agent exec --run RUN --watch OUT --type checkpoint -- python WRITER OUT
    REF ARGS``: the default seal rules."""
    cmd = [sys.executable, "-m", "agent", "exec", "--run", run_id, "--watch", str(out),
           "--type", "checkpoint", "--", sys.executable, str(WRITERS / writer), str(out),
           str(ref), *args]
    env = writer_env(d, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def settle(d: DaemonProc, run_id: str, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Wait until the run ended (the daemon ends it once all its jobs are terminal); its
    checkpoint jobs, from ``chronicle-agent jobs --json``."""
    wait_until(lambda: daemon_run(d, run_id)["state"] == "ended", timeout_s,
               f"run {run_id} to end with all its jobs terminal", every_s=0.2)
    r = d.run_cli("jobs", "--run", run_id, "--json")
    assert r.returncode == 0, r.stderr
    return [j for j in json.loads(r.stdout)["jobs"] if "checkpoint" in j]


def ref_tree(save: dict[str, Any]) -> dict[str, bytes]:
    ref = Path(save["ref"])
    return tree(ref) if ref.is_dir() else {Path(save["path"]).name: ref.read_bytes()}


def describe(d: DaemonProc, js: list[dict[str, Any]]) -> str:
    rows = [f"{j['state']:9} {j['checkpoint']} {j.get('error')}" for j in js]
    log = [ln for ln in d.log_text().splitlines()[-400:] if "agent.server.access" not in ln
           and "agent.transfer." not in ln]
    return "\n".join(["jobs:", *rows, "daemon log (watch and runs):", *log[-30:]])


def check_captured(d: DaemonProc, run_id: str, ref: Path, dl: Path, *,
                   optional: AbstractSet[int] = frozenset(),
                   may_be_lost: AbstractSet[str] = frozenset(),
                   may_be_abandoned: AbstractSet[str] = frozenset(),
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every save the writer logged in ``ref`` (but the indices in ``optional``) is a
    ``ready`` asset of ``run_id`` with exactly its reference bytes; every ``done`` job's
    asset holds the bytes of one save of its path, each save matched once; no job failed
    or was cancelled; abandoned and lost only for the checkpoint paths given. Returns the
    saves and the jobs."""
    saves = read_saves(str(ref))
    js = settle(d, run_id)
    why = describe(d, js)
    ready = {a.asset_id for a in chronicle_for(d).assets.list(output_of=run_id)
             if a.state == "ready"}
    matched: dict[int, str] = {}
    dl.mkdir(parents=True, exist_ok=True)
    for n, j in enumerate(j for j in js if j["state"] == "done"):
        assert j["asset_id"] in ready, (j, why)
        dest = dl / f"{run_id}-{n}"
        r = d.run_cli("download", j["asset_id"], str(dest))
        assert r.returncode == 0, r.stderr
        got = tree(dest)
        same = [i for i, s in enumerate(saves) if s["path"] == j["checkpoint"]
                and i not in matched and ref_tree(s) == got]
        assert same, f"{j['checkpoint']}: the asset holds bytes the writer never completed\n{why}"
        matched[same[0]] = j["job_id"]
    missing = [s["path"] for i, s in enumerate(saves) if i not in matched and i not in optional]
    assert not missing, f"completed but not captured: {missing}\n{why}"
    for j in js:
        allowed = {"done"} | ({"lost"} if j["checkpoint"] in may_be_lost else set()) | (
            {"abandoned"} if j["checkpoint"] in may_be_abandoned else set())
        assert j["state"] in allowed, (j, why)
    assert len(ready) == len(matched), why  # no other asset of the run is ready
    return saves, js


def hf_case(d: DaemonProc, tmp: Path, run_id: str, out: Path, *args: str) -> None:
    ref = tmp / f"ref-{run_id}"
    r = exec_writer(d, run_id, out, ref, *HF, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    saves, js = check_captured(d, run_id, ref, tmp / "dl")
    assert [Path(str(s["path"])).name for s in saves] == [
        f"checkpoint-{n}" for n in (2, 4, 6, 8, 10, 12)]
    assert len(js) == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10",
                                                                "checkpoint-12"]


def test_hf_trainer_twice_into_the_same_directory(tmp_path: Path) -> None:
    """(a) Trainer 5.x writes checkpoint-N in place, trainer_state.json last; keep-last-2
    deletes each a moment later. OUT and its parent do not exist yet: the Trainer creates
    them. (b) A second run into the same OUT writes the same checkpoint-N names (the same
    seed: the same bytes but for mtimes): each of its checkpoints is a new asset of its own."""
    out = tmp_path / "hf" / "out"
    with start_daemon() as d:
        hf_case(d, tmp_path, "run_hf_b1", out)
        hf_case(d, tmp_path, "run_hf_b2", out)


def test_hf_trainer_killed_mid_run(tmp_path: Path) -> None:
    """(c) kill -9 in the 4th save, after the weights and optimizer of checkpoint-8 are
    written and before its trainer_state.json: the three completed checkpoints are ready;
    the half-written one is no asset."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    with start_daemon() as d:
        r = exec_writer(d, "run_hf_kill", out, ref, *HF, "--kill-in-save", "4")
        assert r.returncode == 128 + 9, r.stderr[-3000:]
        half = out / "checkpoint-8"
        assert (half / "model.safetensors").exists()
        assert not (half / "trainer_state.json").exists()
        saves, js = check_captured(d, "run_hf_kill", ref, tmp_path / "dl",
                                   may_be_abandoned={str(half)})
        assert [Path(str(s["path"])).name for s in saves] == [
            "checkpoint-2", "checkpoint-4", "checkpoint-6"]
        assert not [j for j in js if j["checkpoint"] == str(half) and j["state"] == "done"]


def lightning_case(d: DaemonProc, tmp: Path, run_id: str, *args: str
                   ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], Path]:
    out, ref = tmp / f"out-{run_id}", tmp / f"ref-{run_id}"
    r = exec_writer(d, run_id, out, ref, "lightning_train.py", *LIGHTNING_PAUSE, *args)
    saves = read_saves(str(ref))
    last = str(out / "last.ckpt")
    # each top-k file, and last.ckpt's final version, must be captured; an earlier version
    # of last.ckpt, replaced by a rename an epoch later, may have been missed (lost)
    finals = {s["path"]: i for i, s in enumerate(saves)}
    optional = {i for i, s in enumerate(saves) if s["path"] == last and finals[last] != i}
    saves, js = check_captured(d, run_id, ref, tmp / "dl", optional=optional,
                               may_be_lost={last})
    return r, saves, out


def test_lightning_top_k_and_last(tmp_path: Path) -> None:
    """(d) ModelCheckpoint(save_top_k=2, save_last=True, monitor=train_loss, every epoch),
    6 epochs: each .ckpt is written whole (a temporary file renamed into place) and the
    top-2 rotation deletes the older ones."""
    with start_daemon() as d:
        r, saves, out = lightning_case(d, tmp_path, "run_pl", "--epochs", "6")
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(saves) == 12  # a top-k file and last.ckpt every epoch
        assert len(list(out.glob("*.ckpt"))) == 3


def test_lightning_killed_right_after_last_ckpt(tmp_path: Path) -> None:
    """(d) kill -9 0.1 s after the final last.ckpt is in place: it is complete, so it is
    sealed at the run's death and uploaded, not abandoned as unsealed."""
    with start_daemon() as d:
        r, saves, out = lightning_case(d, tmp_path, "run_pl_kill", "--epochs", "3",
                                       "--kill-after-last-s", "0.1")
        assert r.returncode == 128 + 9, r.stderr[-3000:]
        assert saves[-1]["path"] == str(out / "last.ckpt")


def test_distributed_checkpoint_steps(tmp_path: Path) -> None:
    """(e) torch.distributed.checkpoint.save(state, checkpoint_id=OUT/step-N), one process:
    shards, then .metadata."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    with start_daemon() as d:
        r = exec_writer(d, "run_dcp", out, ref, "dcp_save.py", "--steps", "4",
                        "--pause-s", "0.3")
        assert r.returncode == 0, r.stderr[-3000:]
        saves, js = check_captured(d, "run_dcp", ref, tmp_path / "dl")
        assert len(saves) == 4 and len(js) == 4
        assert all(".metadata" in ref_tree(s) for s in saves)


@contextmanager
def cpu_burners(n: int = 2) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` processes spinning at nice 0 (one per core here); killed on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def test_hf_trainer_with_both_cores_busy(tmp_path: Path) -> None:
    """(f) (a) again while two CPU burners keep both cores busy; the daemon at its default
    nice and I/O class (the other tests keep the runner's priority). A save every 1.6 s, so
    each checkpoint lives about 3.2 s: at 0.8 s, a slow run of the whole suite on this VM
    once saw checkpoint-8 deleted by the rotation while the niced daemon was still linking
    it (recorded lost, with its reason)."""
    defaults = AgentSection()
    env = {"CHRONICLE_AGENT_AGENT__NICE": str(defaults.nice),
           "CHRONICLE_AGENT_AGENT__IO_CLASS": defaults.io_class}
    with start_daemon(env) as d, cpu_burners(os.cpu_count() or 2):
        assert os.getpriority(os.PRIO_PROCESS, d.pid or 0) == defaults.nice
        hf_case(d, tmp_path, "run_hf_busy", tmp_path / "hf" / "out", "--pause-s", "0.8")


def test_checkpoint_rotated_away_while_the_staging_area_is_full_is_lost(
        tmp_path: Path) -> None:
    """(g) step-1 is captured (a hardlink) and uploads slowly (8 s); the writer deletes
    it, so the staging area holds its 2 MiB on its own, over a 1 MiB cap (the daemon
    recounts what it holds every 2 s: the writer's next save comes 3 s later). step-2,
    complete (marker), waits for room; the writer deletes it a second later: it could never
    be captured. `chronicle-agent jobs --json` shows it `lost`, with the reason."""
    out = tmp_path / "out"
    out.mkdir()
    writer = script(tmp_path, "rotate.py", """
        import os, random, shutil, sys, time
        out = sys.argv[1]
        for step in (1, 2):
            d = os.path.join(out, f"step-{step}")
            os.makedirs(d)
            with open(os.path.join(d, "w.bin"), "wb") as f:
                f.write(random.Random(step).randbytes(2 * 1024 * 1024))
            open(os.path.join(d, "_SUCCESS"), "w").close()
            time.sleep(1.0)
            shutil.rmtree(d)  # keep none: rotated away before the next save
            time.sleep(3.0)
    """)
    env = {"CHRONICLE_AGENT_WATCHER__STAGING_MAX_BYTES": str(MiB),
           "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(256 * 1024)}
    with start_daemon(env) as d:
        r = subprocess.run(
            [sys.executable, "-m", "agent", "exec", "--run", "run_lost", "--watch", str(out),
             "--type", "checkpoint", "--", sys.executable, str(writer), str(out)],
            env=writer_env(d), capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        js = {Path(j["checkpoint"]).name: j for j in settle(d, "run_lost")}
        why = describe(d, list(js.values()))
        assert sorted(js) == ["step-1", "step-2"], why
        assert js["step-1"]["state"] == "done", why
        (tmp_path / "dl").mkdir()
        dl = d.run_cli("download", js["step-1"]["asset_id"], str(tmp_path / "dl" / "1"))
        assert dl.returncode == 0, dl.stderr
        assert tree(tmp_path / "dl" / "1") == {"w.bin": random.Random(1).randbytes(2 * MiB),
                                               "_SUCCESS": b""}
        lost = js["step-2"]
        assert lost["state"] == "lost", why
        assert lost["error"]["code"] == "staging_full", why
        assert "staging" in lost["error"]["message"], why
        assert not lost.get("asset_id") or lost["asset_id"] not in {
            a.asset_id for a in chronicle_for(d).assets.list(output_of="run_lost")
            if a.state == "ready"}
