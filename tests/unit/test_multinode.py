"""Multi-node checkpoints without a daemon: when a joined asset is whole, and what `exec`
takes for the node count and rank."""

from __future__ import annotations

import pytest

from agent.chronicle import models as m
from agent.cli import _nodes
from agent.errors import UsageError
from agent.transfer.joined import missing


def _asset(sizes: dict[str, int | None]) -> m.Asset:
    return m.Asset.model_validate({
        "asset_id": "ast_1", "asset_type": "checkpoint", "state": "pending",
        "components": [{"name": n, "size": s} for n, s in sizes.items()]})


def _uploads(held: dict[str, dict]) -> m.Uploads:  # type: ignore[type-arg]
    return m.Uploads.model_validate({"components": held})


def test_whole_when_every_indexed_file_is_uploaded_by_someone() -> None:
    expected = frozenset({".metadata", "__0_0.distcp", "__1_0.distcp"})
    asset = _asset({".metadata": 10, "__0_0.distcp": 5})
    ups = _uploads({".metadata": {"uploaded": True}, "__0_0.distcp": {"uploaded": True}})
    assert missing(expected, asset, ups) == ["__1_0.distcp"]  # not declared by any node yet
    asset = _asset({".metadata": 10, "__0_0.distcp": 5, "__1_0.distcp": 5})
    ups = _uploads({".metadata": {"uploaded": True}, "__0_0.distcp": {"uploaded": True},
                    "__1_0.distcp": {"uploaded": False}})
    assert missing(expected, asset, ups) == ["__1_0.distcp"]  # declared, not uploaded
    ups.components["__1_0.distcp"].uploaded = True
    assert missing(expected, asset, ups) == []


def test_a_multipart_file_is_whole_when_its_parts_cover_its_size() -> None:
    expected = frozenset({"big"})
    asset = _asset({"big": 12})
    part = {"etag": '"e"', "size": 5}
    for parts, whole in (([1, 2], False), ([1, 3], False), ([2, 3], False), ([1, 2, 3], True)):
        sizes = {1: 5, 2: 5, 3: 2}
        ups = _uploads({"big": {"uploaded": False, "parts": [
            dict(part, part_number=n, size=sizes[n]) for n in parts]}})
        assert (missing(expected, asset, ups) == []) is whole, parts
    assert missing(expected, _asset({"big": None}), _uploads({"big": {"parts": [
        dict(part, part_number=1)]}})) == ["big"]  # size unknown: not yet


def test_exec_nodes_from_flags_or_the_launcher() -> None:
    assert _nodes(None, None, {}) == {}
    assert _nodes(1, None, {}) == {}
    assert _nodes(4, 2, {}) == {"nodes": 4, "node_rank": 2}
    assert _nodes(None, None, {"SLURM_NNODES": "3", "SLURM_NODEID": "1"}) == {
        "nodes": 3, "node_rank": 1}
    assert _nodes(2, None, {"GROUP_RANK": "0"}) == {"nodes": 2, "node_rank": 0}
    with pytest.raises(UsageError, match="needs this node's rank"):
        _nodes(2, None, {})
    with pytest.raises(UsageError, match="--node-rank 2 is not one of 0-1"):
        _nodes(2, 2, {})
    with pytest.raises(UsageError, match="--nodes must be at least 1"):
        _nodes(0, None, {})
