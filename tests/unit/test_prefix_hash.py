"""The running SHA-256 of a ranged download (download._Prefix): bytes written in order are
hashed as they are written, bytes that land out of order are read back, and either way the
digest is the file's."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from agent.transfer.download import _Prefix


def _write(path: Path, data: bytes, at: int, n: int, prefix: _Prefix) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data[at:at + n])
    # as the download does: in pieces, some straddling the prefix's end
    cut = n // 3
    prefix.offer([memoryview(data)[at:at + cut], memoryview(data)[at + cut:at + n]], at)


def _read_all_back(path: Path, prefix: _Prefix, end: int) -> int:
    view = memoryview(bytearray(1 << 16))
    calls = 0
    with open(path, "rb") as f:
        while prefix.n < end:
            assert prefix.read_back(f, view, end), "file shorter than its prefix"
            calls += 1
    return calls


def test_in_order_writes_are_hashed_without_reading_back(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * len(data))
    prefix = _Prefix()
    step = 300_001
    for at in range(0, len(data), step):
        _write(path, data, at, min(step, len(data) - at), prefix)
    assert prefix.n == len(data)
    assert _read_all_back(path, prefix, len(data)) == 0
    assert prefix.h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_out_of_order_and_repeated_writes_give_the_files_digest(tmp_path: Path) -> None:
    rnd = random.Random(7)
    data = os.urandom(2 << 20)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * len(data))
    spans = [(a, min(a + 100_000, len(data))) for a in range(0, len(data), 100_000)]
    rnd.shuffle(spans)
    spans += spans[:5]  # a retried range writes its bytes again: never hashed twice
    prefix = _Prefix()
    for a, b in spans:
        _write(path, data, a, b - a, prefix)
    _read_all_back(path, prefix, len(data))
    assert prefix.n == len(data)
    assert prefix.h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_write_straddling_the_prefix_hashes_only_its_new_bytes(tmp_path: Path) -> None:
    data = os.urandom(1000)
    path = tmp_path / "f"
    path.write_bytes(data)
    prefix = _Prefix()
    prefix.offer([data[:600]], 0)
    prefix.offer([data[400:900]], 400)  # a retry from byte 400 after 600 were hashed
    assert prefix.n == 900
    _read_all_back(path, prefix, 1000)
    assert prefix.h.hexdigest() == hashlib.sha256(data).hexdigest()
