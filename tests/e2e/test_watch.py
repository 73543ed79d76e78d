"""The watcher end to end: real writers (safetensors, torch.save, torch.distributed.checkpoint,
a Hugging Face-style tmp-directory rename, a keep-last-2 rotation) in their own processes,
real daemon processes, real files; every ready asset downloaded and compared byte for byte."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from tests.support.helpers_daemon import DaemonProc
from tests.support.helpers_e2e import chronicle_for, socket_get_text
from tests.support.helpers_watch import (
    by_checkpoint,
    download,
    run_script,
    script,
    second_daemon,
    tree,
    wait_jobs_terminal,
    wait_until,
    watch_daemon,
    writer_env,
)
from tests.support.helpers_watch import (
    jobs as jobs_of,
)

MiB = 1024 * 1024


def ready_assets(d: DaemonProc, run_id: str) -> list[str]:
    return sorted(a.asset_id for a in chronicle_for(d).assets.list(output_of=run_id)
                  if a.state == "ready")


def test_safetensors_shards_renamed_into_place(tmp_path: Path) -> None:
    """Hugging Face Trainer style: shards written into tmp-checkpoint-N, renamed to
    checkpoint-N. Only the rename seals (no marker, no quiescence in the rule)."""
    out, expected = tmp_path / "out", tmp_path / "expected"
    out.mkdir()
    expected.mkdir()
    writer = script(tmp_path, "hf.py", """
        import json, os, shutil, sys, time
        import torch
        from safetensors.torch import save_file
        out, expected = sys.argv[1], sys.argv[2]
        for step in (1, 2):
            tmp = os.path.join(out, f"tmp-checkpoint-{step}")
            os.makedirs(tmp)
            g = torch.Generator().manual_seed(step)
            index = {"metadata": {}, "weight_map": {}}
            for shard in (1, 2):
                name = f"model-{shard:05d}-of-00002.safetensors"
                save_file({f"layer{shard}.weight": torch.randn(256, 256, generator=g)},
                          os.path.join(tmp, name))
                index["weight_map"][f"layer{shard}.weight"] = name
                time.sleep(0.3)  # a writer slower than the watcher: it sees the tmp dir
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f)
            shutil.copytree(tmp, os.path.join(expected, f"checkpoint-{step}"))
            os.rename(tmp, os.path.join(out, f"checkpoint-{step}"))
    """)
    rules = [{"path": f"{out}/checkpoint-*", "seal": ["rename_dir"], "run_id": "run_hf"}]
    with watch_daemon(rules) as d:
        r = run_script(writer, str(out), str(expected), env=writer_env())
        assert r.returncode == 0, r.stderr
        js = wait_jobs_terminal(d, 2)
        assert sorted(j["checkpoint"] for j in js) == [f"{out}/checkpoint-1",
                                                      f"{out}/checkpoint-2"]
        assert all(j["state"] == "done" for j in js), js
        assert d.log_text().count("sealed (rename_dir)") == 2
        for j in js:
            name = Path(j["checkpoint"]).name
            got = tree(download(d, j["asset_id"], tmp_path / "dl" / name))
            assert got == tree(expected / name)
            assert len(got) == 3
        assert len(ready_assets(d, "run_hf")) == 2


def test_torch_save_and_distributed_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    writer = script(tmp_path, "torch_writer.py", """
        import os, sys, time
        import torch
        import torch.distributed.checkpoint as dcp
        out = sys.argv[1]
        d = os.path.join(out, "pt", "step-1")
        os.makedirs(d)
        g = torch.Generator().manual_seed(1)
        torch.save({"w": torch.randn(256, 256, generator=g)}, os.path.join(d, "model.pt"))
        time.sleep(0.3)
        torch.save({"step": 1, "lr": 0.1}, os.path.join(d, "optim.pt"))
        open(os.path.join(d, "_SUCCESS"), "w").close()
        state = {"model": {"w": torch.randn(512, 128, generator=g)}, "step": torch.tensor(7)}
        dcp.save(state, checkpoint_id=os.path.join(out, "dcp", "step-2"))
    """)
    rules = [{"path": f"{out}/pt/step-*", "seal": ["marker"], "run_id": "run_torch"},
             {"path": f"{out}/dcp/step-*", "seal": ["dcp_metadata"], "run_id": "run_torch"}]
    (out / "pt").mkdir(parents=True)
    (out / "dcp").mkdir()
    with watch_daemon(rules) as d:
        r = run_script(writer, str(out))
        assert r.returncode == 0, r.stderr
        js = wait_jobs_terminal(d, 2)
        assert all(j["state"] == "done" for j in js), js
        assert "sealed (dcp_metadata)" in d.log_text()
        for j in js:
            src = Path(j["checkpoint"])
            got = tree(download(d, j["asset_id"], tmp_path / "dl" / src.parent.name))
            assert got == tree(src)
        dcp_files = tree(out / "dcp" / "step-2")
        assert ".metadata" in dcp_files and any(n.endswith(".distcp") for n in dcp_files)


def test_a_dcp_checkpoint_waits_for_its_late_metadata(tmp_path: Path) -> None:
    """Rank 0 writes ``.metadata`` after the other ranks' shards, here seconds later: the
    shards sit old and unchanged for many quiescence periods, and the rule allows
    quiescence, yet nothing is sealed until ``.metadata`` arrives (a DCP checkpoint without
    it cannot be loaded); then it is sealed by it and uploaded whole."""
    out, full = tmp_path / "out" / "dcp", tmp_path / "full"
    out.mkdir(parents=True)
    writer = script(tmp_path, "dcp_writer.py", """
        import sys
        import torch
        import torch.distributed.checkpoint as dcp
        g = torch.Generator().manual_seed(3)
        dcp.save({"model": {"w": torch.randn(256, 256, generator=g)}, "step": torch.tensor(3)},
                 checkpoint_id=sys.argv[1])
    """)
    r = run_script(writer, str(full))
    assert r.returncode == 0, r.stderr
    rules = [{"path": f"{out}/step-*", "seal": ["dcp_metadata", "quiescence"],
              "quiescence_s": 0.3, "run_id": "run_dcp"}]
    with watch_daemon(rules) as d:
        step = out / "step-3"
        step.mkdir()
        for f in full.iterdir():  # every rank's shards, not rank 0's .metadata
            if f.name != ".metadata":
                shutil.copy2(f, step / f.name)
        old = time.time() - 60
        for f in [step, *step.iterdir()]:
            os.utime(f, (old, old))
        time.sleep(3)  # ten quiescence periods and many watcher checks
        assert not [j for j in jobs_of(d) if "checkpoint" in j], jobs_of(d)
        assert "sealed" not in d.log_text()
        shutil.copy2(full / ".metadata", step / ".metadata")
        js = wait_jobs_terminal(d, 1)
        assert [j["state"] for j in js] == ["done"], js
        assert "sealed (dcp_metadata)" in d.log_text()
        assert tree(download(d, js[0]["asset_id"], tmp_path / "dl")) == tree(full)


LASTPT_WRITER = """
    import os, shutil, sys, time
    import torch
    out, expected, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    path = os.path.join(out, "last.pt")
    inodes = []
    for v in (1, 2):
        g = torch.Generator().manual_seed(v)
        torch.save({"v": v, "w": torch.randn(512, 512, generator=g)}, path)  # 1 MiB
        shutil.copy(path, os.path.join(expected, f"v{v}.pt"))
        inodes.append(os.stat(path).st_ino)
        if v == 1:
            time.sleep(pause)
    print(len(set(inodes)))
"""


@pytest.mark.parametrize("copy", [True, False], ids=["copy_files", "hardlink"])
def test_last_pt_rewritten_in_place(tmp_path: Path, copy: bool) -> None:
    """torch.save onto one last.pt reuses the inode. With copy_files the snapshot is a copy
    and both versions become assets; with a hardlink the rewrite is detected while the
    first version uploads: that job is abandoned (source_changed), the file is sealed
    again, and no asset ever holds mixed bytes."""
    out, expected = tmp_path / "out", tmp_path / "expected"
    out.mkdir()
    expected.mkdir()
    writer = script(tmp_path, "lastpt.py", LASTPT_WRITER)
    rule = {"path": f"{out}/last.pt", "seal": ["quiescence"], "quiescence_s": 0.4,
            "run_id": "run_last"}
    env = {}
    if copy:
        rule["copy_files"] = ["last.pt"]
    else:  # slow uploads: the rewrite lands while version 1 is in flight
        env["CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S"] = str(512 * 1024)
    with watch_daemon([rule], env) as d:
        r = run_script(writer, str(out), str(expected), "1.5" if copy else "1.0")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "1"  # the same inode, rewritten in place
        v1, v2 = (expected / "v1.pt").read_bytes(), (expected / "v2.pt").read_bytes()
        assert v1 != v2
        reflinked = "staged by reflink" in d.log_text()

        def settled() -> list[dict[str, object]] | None:
            js = by_checkpoint(d).get(str(out / "last.pt"), [])
            if len(js) >= 2 and all(j["state"] in ("done", "abandoned", "failed", "cancelled")
                                    for j in js):
                return js
            return None

        js = wait_until(settled, 60, "both versions of last.pt settled", every_s=0.2)
        assert len(js) == 2, js
        contents = []
        for i, j in enumerate(x for x in js if x["state"] == "done"):
            contents.append((download(d, str(j["asset_id"]), tmp_path / f"c{i}")
                             / "last.pt").read_bytes())
        assert all(c in (v1, v2) for c in contents)  # never mixed bytes
        if copy or reflinked:
            assert contents == [v1, v2]
        else:
            assert contents == [v2]
            [gone] = [j for j in js if j["state"] == "abandoned"]
            assert gone["error"]["code"] == "source_changed"
            assert "rewritten in place" in d.log_text()
        ready = ready_assets(d, "run_last")
        assert len(ready) == len(contents)


def test_keep_last_2_rotation_deletes_while_uploading(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    size = 2 * MiB
    writer = script(tmp_path, "rotate.py", """
        import json, os, random, shutil, sys, time
        out, size = sys.argv[1], int(sys.argv[2])
        for step in range(1, 6):
            d = os.path.join(out, f"step-{step}")
            os.makedirs(d)
            with open(os.path.join(d, "weights.bin"), "wb") as f:
                f.write(random.Random(step).randbytes(size))
            with open(os.path.join(d, "meta.json"), "w") as f:
                json.dump({"step": step}, f)
            open(os.path.join(d, "_SUCCESS"), "w").close()
            time.sleep(0.3)
            old = os.path.join(out, f"step-{step - 2}")
            if os.path.exists(old):
                shutil.rmtree(old)  # keep the last 2
    """)
    rules = [{"path": f"{out}/step-*", "seal": ["marker"], "run_id": "run_rot"}]
    env = {"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(2 * MiB),
           "CHRONICLE_AGENT_UPLOAD__CONCURRENCY": "2"}
    with watch_daemon(rules, env) as d:
        r = run_script(writer, str(out), str(size))
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("step")) == [
            "step-4", "step-5"]
        held: list[int] = []

        def uploaded() -> bool:
            held.append(d.client().health()["staging_bytes"])
            js = by_checkpoint(d)
            return len(js) == 5 and all(v[0]["state"] == "done" for v in js.values())
        wait_until(uploaded, 60, "5 checkpoints uploaded")
        # the deleted checkpoints' bytes were held by the staging area alone meanwhile
        assert max(held) >= size, held
        js = wait_jobs_terminal(d, 5)
        assert all(j["state"] == "done" for j in js), js
        chron = chronicle_for(d)
        for j in js:  # Chronicle's digests of what it stored, against what was written
            step = int(Path(j["checkpoint"]).name.split("-")[1])
            comps = {c.name: c.sha256 for c in chron.assets.get(j["asset_id"]).components}
            assert comps["weights.bin"] == hashlib.sha256(
                random.Random(step).randbytes(size)).hexdigest()
            assert comps["meta.json"] == hashlib.sha256(f'{{"step": {step}}}'.encode()).hexdigest()
            if step == 1:  # and the bytes themselves, for the first one deleted
                got = tree(download(d, j["asset_id"], tmp_path / "dl" / str(step)))
                assert got["weights.bin"] == random.Random(step).randbytes(size)
        assert len(ready_assets(d, "run_rot")) == 5

        def cleaned() -> bool:
            h = d.client().health()
            return h["staging"]["snapshots"] == 0 and h["staging_bytes"] == 0
        wait_until(cleaned, 10, "the staging area cleaned")
        staging = out / ".chronicle-staging"
        assert [p for p in staging.rglob("*") if p.is_file() and p.parent.name != "claims"] == []


def test_staging_cap_is_backpressure_and_status_reports_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for i in (1, 2, 3):
        (out / f"c{i}").mkdir(parents=True)
    rules = [{"path": f"{out}/c*", "seal": ["marker"], "copy_files": ["*"],
              "run_id": "run_cap"}]
    env = {"CHRONICLE_AGENT_WATCHER__STAGING_MAX_BYTES": str(3 * MiB),
           "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(2 * MiB)}
    with watch_daemon(rules, env) as d:
        for i in (1, 2, 3):
            (out / f"c{i}" / "w.bin").write_bytes(os.urandom(2 * MiB))
            (out / f"c{i}" / "_SUCCESS").write_bytes(b"")
        seen = {"waiting": 0, "held": 0, "metric": False}

        def done() -> bool:
            h = d.client().health()
            seen["waiting"] = max(seen["waiting"], h["staging"]["waiting"])
            seen["held"] = max(seen["held"], h["staging_bytes"])
            if h["staging_bytes"] and not seen["metric"]:
                metrics = socket_get_text(d.socket_path, "/metrics")
                seen["metric"] = f"chronicle_agent_staging_bytes {h['staging_bytes']}" in \
                    metrics or "chronicle_agent_staging_bytes 0" not in metrics
            js = [j for j in d.client().list_jobs() if j["state"] == "done"]
            return len(js) == 3 and h["staging_bytes"] == 0
        wait_until(done, 60, "3 copies uploaded through a 3 MiB staging area")
        assert seen["waiting"] >= 1, seen  # a seal waited for room
        assert 2 * MiB <= seen["held"] <= 4 * MiB, seen  # the cap held (one copy at a time)
        assert seen["metric"], seen
        assert "waits: the staging area holds" in d.log_text()
        status = d.run_cli("status")
        assert status.returncode == 0 and "staging:" in status.stdout


def test_two_daemons_on_one_shared_directory(tmp_path: Path) -> None:
    """Two agents (separate state and sockets, one Chronicle) watch one directory: each
    checkpoint becomes one asset, uploaded by one agent. When claims cannot be made, the
    derived registration key still gives one asset per checkpoint."""
    shared = tmp_path / "shared"
    (shared / "run_two").mkdir(parents=True)
    blocked = tmp_path / "noclaims"
    (blocked / "run_idem").mkdir(parents=True)
    (blocked / ".chronicle-staging").mkdir()
    (blocked / ".chronicle-staging" / "claims").write_text("not a directory")
    # run_id "{N}": the run directory's segment (Path.parts counts "/" too)
    rules = [{"path": f"{root}/*/step-*", "seal": ["marker"], "run_id": f"{{{len(root.parts)}}}"}
             for root in (shared, blocked)]
    with watch_daemon(rules) as a, second_daemon(a, rules) as b:
        for root, run in ((shared, "run_two"), (blocked, "run_idem")):
            for step in (1, 2, 3):
                ck = root / run / f"step-{step}"
                ck.mkdir()
                (ck / "w.bin").write_bytes(random.Random(step).randbytes(300_000))
                (ck / "_SUCCESS").write_bytes(b"")
        chron = chronicle_for(a)

        def settled(run: str, n: int) -> list[str] | None:
            assets = chron.assets.list(output_of=run)
            if len(assets) >= n and all(x.state == "ready" for x in assets):
                return [x.asset_id for x in assets]
            return None

        two = wait_until(lambda: settled("run_two", 3), 30, "3 shared checkpoints ready")
        assert len(two) == 3
        def jobs_ended() -> list[dict[str, object]] | None:
            # an asset is ready a moment before its job records it (seen once in CI)
            js = [j for d in (a, b) for j in d.client().list_jobs(run_id="run_two")]
            return js if all(j["state"] not in ("queued", "running") for j in js) else None
        done = wait_until(jobs_ended, 10, "the uploads' jobs to end")
        assert sorted(j["state"] for j in done) == ["done"] * 3, done
        wait_until(lambda: a.log_text().count("claimed by agent")
                   + b.log_text().count("claimed by agent") == 3, 10,
                   "the other agent to find each checkpoint claimed")
        idem = wait_until(lambda: settled("run_idem", 3), 30, "3 unclaimed checkpoints ready")
        assert len(idem) == 3  # both agents uploaded, one asset each
        for d in (a, b):
            wait_until(lambda d=d: all(
                j["state"] in ("done", "failed") for j in d.client().list_jobs(
                    run_id="run_idem")), 30, "jobs settle")
        ids = {j["asset_id"] for d in (a, b) for j in d.client().list_jobs(run_id="run_idem")}
        assert ids == set(idem)
        for aid in idem:
            got = tree(download(a, aid, tmp_path / "dl" / aid))
            assert got["w.bin"] in [random.Random(s).randbytes(300_000) for s in (1, 2, 3)]


def test_restart_between_checkpoints_seals_each_once(tmp_path: Path) -> None:
    """Checkpoints renamed into place (Hugging Face style): one while the daemon watches,
    two while it is stopped (no rename seen: the quiescence fallback seals them after the
    restart), one while it uploads when the daemon is killed with -9. Each becomes exactly
    one job and one asset."""
    out = tmp_path / "out"
    out.mkdir()
    rules = [{"path": f"{out}/step-*", "seal": ["rename_dir", "quiescence"],
              "quiescence_s": 1.0, "run_id": "run_restart"}]
    env = {"CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(2 * MiB)}

    def write(step: int, size: int = 200_000, pause_s: float = 0.0) -> None:
        tmp = out / f"tmp-step-{step}"
        tmp.mkdir()
        (tmp / "w.bin").write_bytes(random.Random(step).randbytes(size))
        time.sleep(pause_s)
        (tmp / "meta.json").write_text(f'{{"step": {step}}}')
        os.rename(tmp, out / f"step-{step}")

    with watch_daemon(rules, env) as d:
        write(1, pause_s=0.3)
        [j1] = wait_jobs_terminal(d, 1)
        assert "sealed (rename_dir)" in d.log_text()
        d.stop()
        write(2)
        write(3)
        agent_id = (d.state_dir / "agent_id").read_text().strip()
        orphan = out / ".chronicle-staging" / agent_id / "snap_crashed"
        (orphan / "step-9").mkdir(parents=True)  # as a crash mid-snapshot leaves it
        d.start()
        wait_jobs_terminal(d, 3)
        assert not orphan.exists()
        write(4, size=6 * MiB, pause_s=0.3)
        job = wait_until(lambda: next((j for j in d.client().list_jobs()
                                       if j.get("checkpoint", "").endswith("step-4")
                                       and j["bytes_done"] > 0), None), 30, "step-4 uploading")
        d.kill()  # kill -9 mid-upload
        d.start()
        js = wait_jobs_terminal(d, 4)
        assert all(j["state"] == "done" for j in js), js
        per = by_checkpoint(d)
        assert sorted(per) == [str(out / f"step-{i}") for i in (1, 2, 3, 4)]
        assert all(len(v) == 1 for v in per.values()), per  # nothing sealed twice
        assert per[str(out / "step-1")][0]["job_id"] == j1["job_id"]
        assert per[str(out / "step-4")][0]["job_id"] == job["job_id"]
        assert len(ready_assets(d, "run_restart")) == 4
        got = tree(download(d, per[str(out / "step-4")][0]["asset_id"], tmp_path / "dl4"))
        assert got["w.bin"] == random.Random(4).randbytes(6 * MiB)
        assert not list(out.glob("tmp-*"))


def test_polling_rule_and_per_run_rules_over_the_socket(tmp_path: Path) -> None:
    """A rule with poll = true (as on NFS/Lustre) is watched by polling; rules given with a
    run over the socket are watched until the run ends."""
    polled = tmp_path / "nfs"
    polled.mkdir()
    mine = tmp_path / "mine"
    rules = [{"path": f"{polled}/ck-*", "seal": ["marker"], "poll": True, "run_id": "run_poll"}]
    with watch_daemon(rules, {"CHRONICLE_AGENT_WATCHER__POLL_DELAY_MS": "50",
                              "CHRONICLE_AGENT_WATCHER__RESCAN_S": "30"}) as d:
        wait_until(lambda: "0 root(s) by events, 1 by polling" in d.log_text(), 5,
                   "the polling watcher")
        ck = polled / "ck-1"
        ck.mkdir()
        (ck / "a.bin").write_bytes(b"polled")
        (ck / "_SUCCESS").write_bytes(b"")
        [j] = wait_jobs_terminal(d, 1, timeout_s=10)
        assert j["state"] == "done"
        run = d.client().request("POST", "/v1/runs", {
            "run_id": "run_sock", "watch": [{"path": f"{mine}/*", "seal": ["marker"]}]})
        assert run["watch"][0]["path"] == f"{mine}/*" and run["liveness"] == "pid"
        (mine / "s1").mkdir(parents=True)  # the root did not exist when the rule came
        (mine / "s1" / "x").write_bytes(b"x")
        (mine / "s1" / "_SUCCESS").write_bytes(b"")
        js = wait_jobs_terminal(d, 1, run_id="run_sock")
        assert js[0]["state"] == "done" and js[0]["run_id"] == "run_sock"
        d.client().request("POST", "/v1/runs/run_sock/finish", {"status": "finished"})
        wait_until(lambda: d.client().request("GET", "/v1/runs/run_sock")["state"] == "ended",
                   10, "run_sock ended")
        (mine / "s2").mkdir()
        (mine / "s2" / "_SUCCESS").write_bytes(b"")
        time.sleep(1.0)
        assert len(d.client().list_jobs(run_id="run_sock")) == 1  # no longer watched
        bad = d.run_cli("jobs", "--run", "run_sock")
        assert bad.returncode == 0 and "done" in bad.stdout
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_deleted_checkpoint_is_not_taken_for_the_new_file_given_its_inode(
        tmp_path: Path) -> None:
    """A checkpoint deleted before it could be captured, and a new file created at once
    that the filesystem gives the same inode number (ext4 does: a real Lightning top-k
    rotation met it): the deleted one is recorded lost, never taken for renamed and
    forgotten; the new one is its own checkpoint. (Another process may take the freed inode
    first: then the pair is tried again under new names, up to five times.)"""
    out = tmp_path / "out"
    out.mkdir()
    rules = [{"path": f"{out}/*.bin", "seal": ["marker", "quiescence"], "quiescence_s": 4,
              "run_id": "run_ino"}]
    reused = None
    with watch_daemon(rules) as d:
        for k in range(5):
            probe = out / f"probe{k}.tmp"  # ext4 then gives the lowest free inode: this one
            probe.write_bytes(b"p")
            probe.unlink()
            first = out / f"epoch{k}.bin"
            first.write_bytes(random.Random(k).randbytes(4096))
            time.sleep(2.5)  # seen, unsealed (its quiescence is 4 s)
            ino = first.stat().st_ino
            first.unlink()
            second = out / f"last{k}.bin"
            second.write_bytes(random.Random(100 + k).randbytes(4096))
            if second.stat().st_ino == ino:
                reused = k
                break
        if reused is None:
            pytest.skip("this filesystem never gave the new file the deleted one's inode")
        js = wait_jobs_terminal(d, 2 * (reused + 1))
        by_name = {Path(j["checkpoint"]).name: j for j in js}
        assert sorted(by_name) == sorted([f"epoch{k}.bin" for k in range(reused + 1)]
                                         + [f"last{k}.bin" for k in range(reused + 1)]), js
        for k in range(reused + 1):
            lost, new = by_name[f"epoch{k}.bin"], by_name[f"last{k}.bin"]
            assert lost["state"] == "lost", js
            assert lost["error"]["code"] == "deleted_before_seal", js
            assert new["state"] == "done", js
        got = tree(download(d, by_name[f"last{reused}.bin"]["asset_id"], tmp_path / "dl"))
        assert got == {f"last{reused}.bin": random.Random(100 + reused).randbytes(4096)}
