"""How the agents of several nodes split a checkpoint they all see whole, and how they
claim, watch and take over each other's shares (agent.transfer.shares)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from agent.transfer import shares


def test_split_is_balanced_by_bytes_and_the_same_in_any_order() -> None:
    files = {f"__{r}_0.distcp": 1000 + r for r in range(8)} | {".metadata": 10}
    got = shares.split(files, 4)
    assert sorted(n for s in got for n in s) == sorted(files)  # every file once
    loads = [sum(files[n] for n in s) for s in got]
    assert max(loads) - min(loads) <= 1010, loads
    items = list(files.items())
    random.Random(7).shuffle(items)
    assert shares.split(dict(items), 4) == got  # the same on every node
    # fewer files than nodes: the last shares are empty
    assert shares.split({"a": 5, "b": 3}, 4) == [["a"], ["b"], [], []]


def test_one_big_file_goes_to_one_share() -> None:
    got = shares.split({"model.safetensors": 10**10, "config.json": 100, "tok.json": 50}, 3)
    assert got == [["model.safetensors"], ["config.json"], ["tok.json"]]


def test_plan_guesses_shared_on_a_network_fs_where_the_index_names_files_all_here(
        tmp_path: Path) -> None:
    index = json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})
    (tmp_path / "model.safetensors.index.json").write_text(index)
    comps = [{"name": "model.safetensors.index.json", "size": len(index)},
             {"name": "model-1.safetensors", "size": 100},
             {"name": "model-2.safetensors", "size": 90}]
    files = shares.opener(str(tmp_path))
    plan = shares.plan(comps, 2, 1, False, files, network_fs=True)
    assert plan is not None and plan.mine == 1 and plan.nodes == 2
    assert plan.shares == [["model-1.safetensors"],
                           ["model-2.safetensors", "model.safetensors.index.json"]]
    assert plan.share_bytes(1) == 90 + len(index)
    # on a local filesystem never guessed: node 0 may be the only node that wrote any
    assert shares.plan(comps, 2, 1, False, files) is None
    # node-local: this node holds the index but not every file it names
    assert shares.plan(comps[:2], 2, 0, False, files, network_fs=True) is None
    # no index: only when the rule says shared
    assert shares.plan(comps[1:], 2, 0, False, files, network_fs=True) is None
    assert shares.plan(comps[1:], 2, 0, True, files) is not None
    assert shares.plan(comps, 1, 0, True, files) is None  # one node
    assert shares.plan(comps, 2, None, True, files) is None  # no rank


def test_claims_generations_and_heartbeats(tmp_path: Path) -> None:
    d = str(tmp_path / "claims")
    name = shares.claim_name("watch:run_1:/shared/ckpt/step-1@abc")
    assert shares.newest(d, name, 1) is None
    assert shares.make_claim(d, name, 1, 0, "agent-a")
    assert not shares.make_claim(d, name, 1, 0, "agent-b")  # exclusive
    assert shares.newest(d, name, 1) == shares.Claim(0, "agent-a")
    assert shares.make_claim(d, name, 1, 1, "agent-b")  # taken over
    assert shares.newest(d, name, 1) == shares.Claim(1, "agent-b")
    assert shares.newest(d, name, 0) is None  # another share
    assert shares.alive_mark(d, "agent-b") is None
    shares.heartbeat(d, "agent-b")
    first = shares.alive_mark(d, "agent-b")
    assert first is not None
    os.utime(os.path.join(d, shares.AGENTS_DIR, "agent-b"), ns=(1, 1))
    shares.heartbeat(d, "agent-b")
    assert shares.alive_mark(d, "agent-b") != 1
    assert shares.look(d, name, 1) == (shares.Claim(1, "agent-b"),
                                       shares.alive_mark(d, "agent-b"))
    assert (os.stat(os.path.join(d, f"{name}.s1.g1")).st_mode & 0o777) == 0o644


def test_watch_calls_a_share_stale_only_after_its_state_stood_still() -> None:
    w = shares.Watch(takeover_s=10)
    assert not w.stale(2, ("claim", 1), now=100)
    assert not w.stale(2, ("claim", 1), now=109)
    assert not w.stale(2, ("claim", 2), now=112)  # a heartbeat: the clock starts again
    assert not w.stale(2, ("claim", 2), now=121)
    assert w.stale(2, ("claim", 2), now=122)
    w.forget(2)
    assert not w.stale(2, ("claim", 2), now=200)
    assert not w.stale(3, (None, None), now=200)  # never claimed: from when first seen
    assert w.stale(3, (None, None), now=210)


def test_share_ids_tell_registrations_apart() -> None:
    assert shares.share_id({"node_rank": 2}) == "share-2"
    assert shares.share_id({"node_rank": 0, "share": 2, "generation": 1}) == "share-2-g1"
