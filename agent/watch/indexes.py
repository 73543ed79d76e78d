"""What a checkpoint's own index says the whole checkpoint holds.

When the ranks of several nodes write one checkpoint, each node holds only its own files;
the node that holds the index knows the whole (``docs/multinode.md``):

- torch.distributed.checkpoint: ``.metadata`` (a pickle of ``Metadata``, written by the
  coordinator rank after every rank's shards) names each shard file by the
  ``relative_path`` of a ``_StorageInfo``;
- Hugging Face sharded safetensors: ``*.safetensors.index.json`` names the shard files in
  its ``weight_map``.

The ``.metadata`` pickle is read without running anything in it: every class or function
it names becomes a stand-in that keeps its arguments and state (nothing is imported, no code
from the file runs, torch is not needed), and the stand-ins are searched for the storage
records. Standard library only: the watcher reads it in a thread as the checkpoint's owner.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

DCP_METADATA = ".metadata"
SAFETENSORS_INDEX = ".safetensors.index.json"
MAX_INDEX_BYTES = 256 * 1024 * 1024
"""An index larger than this is not read (a DCP ``.metadata`` of a large sharded model is a
few MiB; a safetensors index a few hundred KiB)."""
MAX_OBJECTS = 20_000_000
"""Stand-ins and containers visited at most while searching a ``.metadata``."""


class UnreadableIndex(ValueError):
    """An index that cannot be read as one (damaged, too large, not the format's)."""


@dataclass(frozen=True)
class Whole:
    """What the checkpoint holds when whole, by its index."""

    kind: str
    """``dcp_metadata`` or ``safetensors_index``."""
    index: str
    """The index file's name (relative to the checkpoint directory)."""
    files: frozenset[str]
    """Every file the index names (relative paths), the index itself included."""


class _Stand:
    """A stand-in for whatever class or function a pickle names: keeps the arguments it
    was called with and the state it was given."""

    _qualname = "?"

    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stand:
        # NEWOBJ makes instances with __new__ alone; REDUCE calls the class (both here)
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Reader(pickle.Unpickler):
    def __init__(self, f: BinaryIO) -> None:
        super().__init__(f)
        self._made: dict[tuple[str, str], type[_Stand]] = {}

    def find_class(self, module: str, name: str) -> Any:
        stand = self._made.get((module, name))
        if stand is None:
            stand = self._made[module, name] = type(name, (_Stand,), {
                "_qualname": f"{module}.{name}"})
        return stand

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of a DCP .metadata")


def _storage_paths(root: Any) -> set[str]:
    """The ``relative_path`` of every ``_StorageInfo`` stand-in reachable from ``root``."""
    found: set[str] = set()
    stack = [root]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, str | bytes | int | float | bool | type(None)):
            continue
        seen.add(id(obj))
        if len(seen) > MAX_OBJECTS:
            raise UnreadableIndex(f"more than {MAX_OBJECTS} objects")
        if isinstance(obj, _Stand):
            state = obj.state
            if type(obj).__name__ == "_StorageInfo":
                path = _field(state, "relative_path")
                if path is None and obj.args and isinstance(obj.args[0], str):
                    path = obj.args[0]
                if isinstance(path, str):
                    found.add(path)
            stack.append(obj.args)
            stack.append(state)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
    return found


def _field(state: Any, name: str) -> Any:
    """A field of pickled state: a ``__dict__``, or ``(dict, slots)`` for a class with
    slots."""
    if isinstance(state, dict):
        return state.get(name)
    if isinstance(state, tuple) and len(state) == 2:
        for part in state:
            if isinstance(part, dict) and name in part:
                return part[name]
    return None


def dcp_files(data: bytes | BinaryIO) -> frozenset[str]:
    """The shard files a DCP ``.metadata`` names (its bytes, or the open file, read as the
    pickle is, not whole first)."""
    try:
        root = _Reader(io.BytesIO(data) if isinstance(data, bytes) else data).load()
    except UnreadableIndex:
        raise
    except Exception as e:  # a damaged pickle raises anything from EOFError to TypeError
        raise UnreadableIndex(f"not a readable DCP .metadata ({type(e).__name__}: {e})"[:300]) \
            from None
    files = _storage_paths(root)
    if not files:
        raise UnreadableIndex("a DCP .metadata that names no storage file")
    bad = sorted(f for f in files if not _relative(f))
    if bad:
        raise UnreadableIndex(f"a DCP .metadata naming a file outside its directory: {bad[0]!r}")
    return frozenset(files)


def safetensors_files(data: bytes | BinaryIO) -> frozenset[str]:
    """The shard files a safetensors index's ``weight_map`` names."""
    try:
        doc = json.loads(data) if isinstance(data, bytes) else json.load(data)
    except ValueError as e:
        raise UnreadableIndex(f"not a JSON safetensors index ({e})") from None
    weights = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weights, dict) or not weights:
        raise UnreadableIndex("a safetensors index without a weight_map")
    files = set(weights.values())
    bad = sorted(str(f) for f in files if not isinstance(f, str) or not _relative(f))
    if bad:
        raise UnreadableIndex(f"a safetensors index naming an unusable file: {bad[0]!r}")
    return frozenset(files)


def _relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..")
                                                           for p in parts)


def find_index(names: Iterable[str]) -> tuple[str, str] | None:
    """The index among a checkpoint's file names, with its kind: ``.metadata`` first, then
    a single ``*.safetensors.index.json`` at the top; None when there is none (or several
    safetensors indexes: which one is the checkpoint's is not for us to guess)."""
    names = list(names)
    if DCP_METADATA in names:
        return "dcp_metadata", DCP_METADATA
    st = [n for n in names if n.endswith(SAFETENSORS_INDEX) and "/" not in n]
    return ("safetensors_index", st[0]) if len(st) == 1 else None


def whole_by_index(names: Iterable[str], open_file: Callable[[str], BinaryIO]) -> Whole | None:
    """What the checkpoint holds when whole, by its index among ``names``; None without an
    index. ``open_file(name)``: the file, open for reading (as the checkpoint's owner). An
    index that cannot be read raises :class:`UnreadableIndex`."""
    found = find_index(names)
    if found is None:
        return None
    kind, index = found
    with open_file(index) as f:
        if os.fstat(f.fileno()).st_size > MAX_INDEX_BYTES:
            raise UnreadableIndex(f"{index} is larger than {MAX_INDEX_BYTES} bytes")
        files = dcp_files(f) if kind == "dcp_metadata" else safetensors_files(f)
    return Whole(kind, index, files | {index})
