"""Seal rules and the staging area, without a daemon: real files in a temp dir."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent.config import WatchRule
from agent.watch import seal
from agent.watch.seal import Scan, check_seal, scan
from agent.watch.staging import SnapshotChanged, Staging
from agent.watch.watcher import is_network_fs, mount_fstype


def rule(**kw: object) -> WatchRule:
    return WatchRule.model_validate({"path": "/x/*", **kw})


def touch(p: Path, data: bytes = b"x", mtime: float | None = None) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    if mtime is not None:
        os.utime(p, (mtime, mtime))


def decide(r: WatchRule, sc: Scan | None, *, renamed: bool = False, stable: float = 0.0,
           quiet: bool = True) -> str | None:
    assert sc is not None
    return check_seal(r, sc, renamed=renamed, stable_for_s=stable,
                      age_s=time.time() - sc.newest_ns / 1e9, allow_quiescence=quiet)


def test_marker_seals_only_when_written_last(tmp_path: Path) -> None:
    ck = tmp_path / "step-1"
    now = time.time()
    touch(ck / "model.bin", mtime=now - 10)
    assert decide(rule(), scan(str(ck))) is None
    touch(ck / "_SUCCESS", b"", mtime=now - 5)
    assert decide(rule(), scan(str(ck))) == "marker"
    touch(ck / "model.bin", b"rewritten", mtime=now)  # a rewrite after a stale marker
    assert decide(rule(), scan(str(ck))) is None
    touch(ck / "commit_success.txt", b"", mtime=now + 1)
    assert decide(rule(), scan(str(ck))) == "marker"
    assert decide(rule(seal=["dcp_metadata"]), scan(str(ck))) is None
    assert decide(rule(markers=["DONE"], seal=["marker"]), scan(str(ck))) is None


def test_dcp_metadata_and_quiescence_fallback(tmp_path: Path) -> None:
    ck = tmp_path / "dcp"
    old = time.time() - 100
    touch(ck / "__0_0.distcp", mtime=old)
    os.utime(ck, (old, old))  # old and stable: only the missing .metadata holds it back
    r = rule(quiescence_s=1.0)
    # quiescence never seals a DCP checkpoint whose .metadata is still to come
    assert decide(r, scan(str(ck)), stable=50) is None
    touch(ck / ".metadata", mtime=old + 1)
    assert decide(r, scan(str(ck))) == "dcp_metadata"
    plain = tmp_path / "plain"
    touch(plain / "w.bin", mtime=old)
    os.utime(plain, (old, old))  # the directory's own mtime counts too
    assert decide(r, scan(str(plain)), stable=0.5) is None  # not stable for long enough
    assert decide(r, scan(str(plain)), stable=2) == "quiescence"
    assert decide(r, scan(str(plain)), stable=2, quiet=False) is None
    fresh = tmp_path / "fresh"
    touch(fresh / "w.bin")  # mtime now: too young, however long the watcher looked
    assert decide(r, scan(str(fresh)), stable=2) is None
    assert decide(rule(seal=["marker"]), scan(str(plain)), stable=100) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert decide(r, scan(str(empty)), stable=100) is None


def test_rename_seals(tmp_path: Path) -> None:
    d = tmp_path / "checkpoint-1"
    touch(d / "a.safetensors")
    assert decide(rule(seal=["rename_dir"]), scan(str(d))) is None
    assert decide(rule(seal=["rename_dir"]), scan(str(d)), renamed=True) == "rename_dir"
    f = tmp_path / "last.pt"
    touch(f)
    assert decide(rule(seal=["rename_dir"]), scan(str(f)), renamed=True) is None
    assert decide(rule(seal=["rename_file"]), scan(str(f)), renamed=True) == "rename_file"


def test_tmp_names_globs_and_run_ids() -> None:
    rx = seal.tmp_regexes(rule().tmp_patterns)
    assert seal.final_name("tmp-checkpoint-500", rx) == "checkpoint-500"
    assert seal.final_name("100.orbax-checkpoint-tmp-1712345678", rx) == "100"
    assert seal.final_name("last.pt.tmp", rx) == "last.pt"
    assert seal.final_name("checkpoint-500", rx) is None
    with pytest.raises(ValueError):
        WatchRule.model_validate({"path": "/x/*", "tmp_patterns": ["tmp-*"]})
    with pytest.raises(ValueError):
        WatchRule.model_validate({"path": "relative/*"})
    assert seal.glob_root("/scratch/runs/*/ckpt/step-*") == "/scratch/runs"
    assert seal.glob_root("/out/last.pt") == "/out"
    segs = seal.split_glob("/scratch/runs/*/ckpt/step-*")
    assert seal.at_depth(segs, "/scratch/runs/r1/ckpt/step-5/shard/a.bin") == (
        "/scratch/runs/r1/ckpt/step-5", False)
    assert seal.at_depth(segs, "/scratch/runs/r1/ckpt/tmp-step-5/a.bin") == (
        "/scratch/runs/r1/ckpt/tmp-step-5", False)  # the caller tells temporary names apart
    assert seal.at_depth(segs, "/scratch/runs/r1/ckpt") == (None, True)
    assert seal.at_depth(segs, "/scratch/runs/r1/logs/x/y") == (None, False)
    assert seal.is_candidate_name("step-5", "step-*")
    assert not seal.is_candidate_name("tmp-step-5", "step-*")
    assert not seal.is_candidate_name(".hidden", "*") and seal.is_candidate_name(".m", ".*")
    r = rule(path="/scratch/runs/*/ckpt/step-*", run_id="{3}")
    assert seal.run_id_for(r, "/scratch/runs/r1/ckpt/step-5", None) == "r1"
    assert seal.run_id_for(rule(run_id="fixed"), "/x/y", "bound") == "fixed"
    assert seal.run_id_for(rule(), "/x/y", "bound") == "bound"
    key = seal.register_key("r1", "/x/y", "abcd")
    assert key == "watch:r1:/x/y@abcd"
    assert len(seal.register_key("r" * 250, "/x/" + "y" * 300, "abcd")) <= 255
    assert seal.in_staging("/x/.chronicle-staging/a/b")


def test_fingerprint_and_version(tmp_path: Path) -> None:
    touch(tmp_path / "c" / "a", b"1")
    a = scan(str(tmp_path / "c"))
    assert a is not None and a.version() == a.version()
    touch(tmp_path / "c" / "a", b"22")
    b = scan(str(tmp_path / "c"))
    assert b is not None and (a.fingerprint(), a.version()) != (b.fingerprint(), b.version())
    assert scan(str(tmp_path / "missing")) is None
    os.symlink("/etc/hostname", tmp_path / "c" / "out")
    c = scan(str(tmp_path / "c"))
    assert c is not None and c.problem and "symlink leaves" in c.problem


def test_mountinfo_parsing(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n"
        "30 22 0:40 / /scratch rw - nfs4 server:/export rw\n"
        "31 22 0:41 / /mnt/with\\040space rw - lustre mgs@tcp:/fs rw\n"
    )
    assert mount_fstype("/scratch/runs/x", str(info)) == "nfs4"
    assert mount_fstype("/mnt/with space/a", str(info)) == "lustre"
    assert mount_fstype("/home/u", str(info)) == "ext4"
    assert mount_fstype("/scratchy", str(info)) == "ext4"
    assert not is_network_fs(str(tmp_path))


# ---- staging -----------------------------------------------------------------------------


@pytest.fixture
def staging(tmp_path: Path) -> Staging:
    state = tmp_path / "state"
    state.mkdir()
    return Staging(state, max_bytes=0)


def test_snapshot_links_copies_and_survives_delete(tmp_path: Path, staging: Staging) -> None:
    ck = tmp_path / "root" / "step-1"
    touch(ck / "model.bin", os.urandom(5000))
    touch(ck / "sub" / "opt.pt", os.urandom(3000))
    touch(ck / "last.pt", b"v1")
    sc = scan(str(ck))
    assert sc is not None
    base = staging.base_for(str(tmp_path / "root"), sc.dev)
    assert base == str(tmp_path / "root" / ".chronicle-staging")
    snap = staging.snapshot(sc, base, ["last.pt"])
    hows = {rel: f.how for rel, f in snap.files.items()}
    assert hows["last.pt"] in ("copy", "reflink")
    assert hows["model.bin"] in ("link", "reflink")
    expected = {rel: (ck / rel).read_bytes() for rel in hows}
    import shutil

    shutil.rmtree(ck)  # keep-last-N rotation deletes it: the snapshot keeps the bytes
    for rel, data in expected.items():
        assert (Path(snap.path) / rel).read_bytes() == data
    staging.account([snap.dir])
    assert staging.held_bytes == 5000 + 3000 + 2 and staging.files == 3
    assert staging.changed(snap) is None
    staging.remove(snap.dir)
    staging.account([snap.dir])
    assert staging.held_bytes == 0 and not os.path.exists(snap.dir)


def test_snapshot_detects_a_rewrite_in_place(tmp_path: Path, staging: Staging) -> None:
    ck = tmp_path / "root" / "last.pt"
    touch(ck, b"version one")
    sc = scan(str(ck))
    assert sc is not None
    base = staging.base_for(str(tmp_path / "root"), sc.dev)
    with open(ck, "r+b") as f:  # rewritten after the seal, before the snapshot
        f.write(b"VERSION")
        os.utime(f.fileno(), ns=(sc.newest_ns + 10**9, sc.newest_ns + 10**9))
    with pytest.raises(SnapshotChanged):
        staging.snapshot(sc, base, [])
    assert os.listdir(os.path.join(base, staging.agent_id)) == []  # nothing left behind
    sc = scan(str(ck))
    assert sc is not None
    snap = staging.snapshot(sc, base, [])
    assert snap.path.endswith("/last.pt") and Path(snap.path).read_bytes() == b"VERSION one"
    if snap.files["last.pt"].how == "link":  # ext4, tmpfs: a link shares the inode
        with open(ck, "wb") as f:  # torch.save onto the same name: same inode
            f.write(b"v2!")
        assert staging.changed(snap) == "last.pt"


def test_staging_falls_back_to_the_state_dir(tmp_path: Path, staging: Staging) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / ".chronicle-staging").write_text("in the way")  # not a directory: cannot stage
    touch(ro / "c.bin", b"abc")
    sc = scan(str(ro / "c.bin"))
    assert sc is not None
    base = staging.base_for(str(ro), sc.dev)
    assert base == str(tmp_path / "state" / "staging")
    snap = staging.snapshot(sc, base, [])
    assert Path(snap.path).read_bytes() == b"abc"


def test_claims_and_backpressure(tmp_path: Path, staging: Staging) -> None:
    other = Staging(tmp_path / "state", 0)
    assert other.agent_id == staging.agent_id  # stable per state dir
    (tmp_path / "state2").mkdir()
    second = Staging(tmp_path / "state2", 0)
    base = str(tmp_path / "shared")
    assert staging.claim(base, "watch:r:/p@v1", "/p") is None  # ours
    assert staging.claim(base, "watch:r:/p@v1", "/p") is None  # still ours (a restart)
    assert second.claim(base, "watch:r:/p@v1", "/p") == staging.agent_id
    assert second.claim(base, "watch:r:/p@v2", "/p") is None  # another version
    claim = next((Path(base) / "claims").iterdir())
    assert json.loads(claim.read_text())["agent"] in (staging.agent_id, second.agent_id)
    capped = Staging(tmp_path / "state2", max_bytes=100)
    assert capped.room_for(1000)  # an empty staging area always takes one
    capped.held_bytes = 60
    assert capped.room_for(40) and not capped.room_for(41)


# ---- the format seal: a file whose own structure says it is whole ---------------------------


def _prefixes_never_whole(path: Path) -> int:
    """Every cut of the file (a writer caught mid-write, in place) is not whole; returns how
    many cuts were tried."""
    data = path.read_bytes()
    part = path.with_name(path.name + ".part")
    step = max(1, len(data) // 300)
    cuts = sorted({*range(1, len(data), step), *range(max(1, len(data) - 200), len(data))})
    for cut in cuts:
        part.write_bytes(data[:cut])
        assert not seal.file_whole(str(part), os.stat(part)), f"{path.name} cut at {cut}"
    part.unlink()
    return len(cuts)


def test_format_seal_knows_torch_save_safetensors_and_zip(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    torch.save({"w": torch.randn(64, 64), "step": 3}, tmp_path / "a.ckpt")  # zip + zip64 end
    save_file({"w": torch.randn(64, 64), "b": torch.zeros(3)}, str(tmp_path / "b.safetensors"))
    np.savez(tmp_path / "c.npz", a=np.arange(500))
    import zipfile
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z, z.open("x", "w", force_zip64=True) as f:
        f.write(b"abc" * 500)
    (tmp_path / "e.json").write_text(json.dumps({"not": "a checkpoint"}))
    for name in ("a.ckpt", "b.safetensors", "c.npz", "d.zip"):
        p = tmp_path / name
        assert seal.file_whole(str(p), os.stat(p)), name
        assert _prefixes_never_whole(p) > 200
        sc = scan(str(p))
        assert sc is not None and sc.whole
        assert decide(rule(), sc, quiet=False) == "format"
        assert decide(rule(seal=["rename_file"]), sc, quiet=False) is None
    e = scan(str(tmp_path / "e.json"))
    assert e is not None and not e.whole and decide(rule(), e, quiet=False) is None
    # bytes appended after a whole file (a second save appended, a torn rewrite) are not whole
    with open(tmp_path / "a.ckpt", "ab") as f:
        f.write(b"PK\x03\x04 more")
    assert not seal.file_whole(str(tmp_path / "a.ckpt"), os.stat(tmp_path / "a.ckpt"))


def test_identity_is_the_entry_not_the_path(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoint-2"
    touch(ck / "trainer_state.json", b"{}")
    first = scan(str(ck))
    assert first is not None
    import shutil
    shutil.rmtree(ck)
    touch(ck / "trainer_state.json", b"{}")
    second = scan(str(ck))
    assert second is not None
    # a new directory at the same path: another inode, or the same inode born later
    assert first.ident() != second.ident()
    again = scan(str(ck))
    assert again is not None and again.ident() == second.ident()
    assert decide(rule(), second, quiet=False) == "marker"  # the Trainer's last file
