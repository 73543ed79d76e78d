"""The node-local cache holds any subset of an asset's components: a use fetches only the
wanted components its entry does not hold, adds them to it, and hands back just those."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from agent.chronicle import models as m
from agent.transfer.cache import AssetCache

DATA = {".metadata": b"meta" * 10, "__0_0.distcp": b"zero" * 100, "__1_0.distcp": b"one" * 90,
        "optim/rank_0.pt": b"opt" * 7}


def asset(data: dict[str, bytes] = DATA) -> m.Asset:
    return m.Asset(asset_id="ast_subsets", asset_type="checkpoint", state="ready",
                   components=[m.Component(name=n, size=len(b),
                                           sha256=hashlib.sha256(b).hexdigest())
                               for n, b in data.items()])


class Store:
    """Writes what a fill asks for, and remembers what it was asked."""

    def __init__(self, data: dict[str, bytes] = DATA) -> None:
        self.data = data
        self.asked: list[list[str]] = []

    async def fill(self, target: Path, names: list[str]) -> list[dict[str, Any]]:
        self.asked.append(sorted(names))
        out = []
        for n in names:
            p = target / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(self.data[n])
            out.append({"name": n, "size": len(self.data[n]),
                        "sha256": hashlib.sha256(self.data[n]).hexdigest()})
        return out


async def use(cache: AssetCache, store: Store, names: set[str] | None,
              a: m.Asset | None = None) -> tuple[list[str], int, bool]:
    async with cache.use(a or asset(), store.fill,
                         frozenset(names) if names is not None else None) as entry:
        for f in entry.files:
            assert (entry.path / f.name).read_bytes() == DATA[f.name]
        return sorted(f.name for f in entry.files), entry.fetched, entry.filled


async def test_selections_fill_one_entry_and_fetch_only_what_it_lacks(tmp_path: Path) -> None:
    cache, store = AssetCache(tmp_path / "cache", 1 << 20), Store()
    rank1 = {".metadata", "__1_0.distcp"}
    assert await use(cache, store, rank1) == (sorted(rank1), 2, True)
    assert await use(cache, store, rank1) == (sorted(rank1), 0, False)  # a hit
    assert await use(cache, store, {".metadata", "__0_0.distcp"}) == (
        [".metadata", "__0_0.distcp"], 1, True)
    assert await use(cache, store, None) == (sorted(DATA), 1, True)  # only the rest
    assert store.asked == [sorted(rank1), ["__0_0.distcp"], ["optim/rank_0.pt"]]
    assert cache.stats()["entries"] == 1
    assert cache.stats()["bytes"] == sum(len(b) for b in DATA.values())
    # a fresh cache object over the same directory (a daemon restart) still holds it all,
    # hashing the files again on first use
    again = AssetCache(tmp_path / "cache", 1 << 20)
    assert await use(again, store, None) == (sorted(DATA), 0, False)
    assert len(store.asked) == 3


async def test_adopted_part_serves_its_files_and_the_rest_is_fetched(tmp_path: Path) -> None:
    """What a node uploaded of a checkpoint several nodes wrote is its entry; restoring
    that node's ranks fetches only the files other nodes wrote."""
    cache, store = AssetCache(tmp_path / "cache", 1 << 20), Store()
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "__1_0.distcp").write_bytes(DATA["__1_0.distcp"])
    assert await cache.adopt("ast_subsets", [{
        "name": "__1_0.distcp", "size": len(DATA["__1_0.distcp"]), "path": str(
            snap / "__1_0.distcp"),
        "sha256": hashlib.sha256(DATA["__1_0.distcp"]).hexdigest()}])
    assert not (snap / "__1_0.distcp").exists()  # moved, not copied
    assert await use(cache, store, {"__1_0.distcp"}) == (["__1_0.distcp"], 0, False)
    assert await use(cache, store, {".metadata", "__1_0.distcp"}) == (
        [".metadata", "__1_0.distcp"], 1, True)
    assert store.asked == [[".metadata"]]


@pytest.mark.parametrize("change", ["not a component", "other digest"])
async def test_an_entry_that_does_not_match_the_asset_is_dropped(tmp_path: Path,
                                                                 change: str) -> None:
    cache, store = AssetCache(tmp_path / "cache", 1 << 20), Store()
    await use(cache, store, {".metadata", "__1_0.distcp"})
    if change == "not a component":  # the asset as Chronicle describes it now
        later = asset({k: v for k, v in DATA.items() if k != "__1_0.distcp"})
    else:
        later = asset({**DATA, "__1_0.distcp": b"other bytes"})
        store.data = {**DATA, "__1_0.distcp": b"other bytes"}
    names, fetched, filled = await use(cache, store, {".metadata"}, later)
    assert (names, fetched, filled) == ([".metadata"], 1, True)  # fetched again
    assert store.asked[-1] == [".metadata"]
    assert cache.stats()["entries"] == 1
