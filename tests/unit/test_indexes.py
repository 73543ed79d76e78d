"""A checkpoint's own index, read without running anything in it: torch.distributed.checkpoint's
``.metadata`` (real files written by ``dcp.save``) and a safetensors index."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from agent.watch import indexes
from agent.watch.indexes import UnreadableIndex, whole_by_index


def _reader(d: Path):  # type: ignore[no-untyped-def]
    return lambda name: open(d / name, "rb")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: no group
def test_the_shards_a_real_dcp_save_names(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.zeros(3),
             "opt": {"step": 3, "lr": 0.1, "names": ["a", "b"]}}
    out = tmp_path / "step-1"
    dcp.save(state, checkpoint_id=str(out))
    names = sorted(p.name for p in out.iterdir())
    whole = whole_by_index(names, _reader(out))
    assert whole is not None and whole.kind == "dcp_metadata"
    assert whole.files == frozenset(names)  # every file there, the index included
    assert any(n.endswith(".distcp") for n in whole.files)


def test_a_pickle_that_would_run_code_runs_nothing(tmp_path: Path) -> None:
    canary = tmp_path / "ran"

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, (f"open({str(canary)!r}, 'w').write('x')",))

    data = pickle.dumps({"storage_data": Boom()})
    with pytest.raises(UnreadableIndex, match="names no storage file"):
        indexes.dcp_files(data)
    assert not canary.exists()
    with pytest.raises(UnreadableIndex, match="not a readable DCP .metadata"):
        indexes.dcp_files(b"\x80\x05garbage")


def test_a_metadata_naming_a_path_outside_is_refused() -> None:
    class _StorageInfo:
        def __init__(self, path: str) -> None:
            self.relative_path, self.offset, self.length = path, 0, 1

    _StorageInfo.__module__ = "torch.distributed.checkpoint.filesystem"
    _StorageInfo.__qualname__ = "_StorageInfo"
    import sys
    import types

    mod = types.ModuleType("torch.distributed.checkpoint.filesystem")
    mod._StorageInfo = _StorageInfo  # type: ignore[attr-defined]
    saved = sys.modules.get(mod.__name__)
    sys.modules[mod.__name__] = mod
    try:
        data = pickle.dumps({"x": _StorageInfo("../../etc/passwd")})
    finally:
        if saved is None:
            del sys.modules[mod.__name__]
        else:
            sys.modules[mod.__name__] = saved
    with pytest.raises(UnreadableIndex, match="outside its directory"):
        indexes.dcp_files(data)


def test_a_safetensors_index_names_its_shards(tmp_path: Path) -> None:
    index = {"metadata": {"total_size": 10}, "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
        "c.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    whole = whole_by_index(["config.json", "model.safetensors.index.json"], _reader(tmp_path))
    assert whole is not None and whole.kind == "safetensors_index"
    assert whole.files == {"model-00001-of-00002.safetensors",
                           "model-00002-of-00002.safetensors", "model.safetensors.index.json"}
    for bad, why in (({"weight_map": {}}, "without a weight_map"), ([], "without a weight_map"),
                     ({"weight_map": {"a": "/abs"}}, "unusable file")):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(UnreadableIndex, match=why):
            whole_by_index(["model.safetensors.index.json"], _reader(tmp_path))


def test_no_index_or_two_is_none() -> None:
    assert whole_by_index(["a.bin", "config.json"], lambda n: open(os.devnull, "rb")) is None
    assert indexes.find_index(["a.safetensors.index.json", "b.safetensors.index.json"]) is None
