"""What the writer scripts share: the reference copy taken in the writer's own save
callback, and the log of when each save returned.

``REF/saves.jsonl`` gets one line per completed save: ``{"path": the checkpoint as the
writer named it, "ref": its copy under REF, "t": wall clock when the save returned}``. The
copy is taken right after the save returned, before training goes on, so it is exactly
what the writer completed."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


def record_save(path: str, ref_root: str) -> str:
    """Copy the checkpoint ``path`` (a file or a directory) under ``ref_root`` (as
    ``NNN-<name>``, one per save, so versions of one name are kept apart); log it."""
    t = time.time()
    log = os.path.join(ref_root, "saves.jsonl")
    n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
    ref = os.path.join(ref_root, f"{n:03d}-{os.path.basename(path)}")
    if os.path.isdir(path):
        shutil.copytree(path, ref)
    else:
        shutil.copyfile(path, ref)
    with open(log, "a") as f:
        f.write(json.dumps({"path": os.path.abspath(path), "ref": ref, "t": t}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return ref


def die() -> None:
    """kill -9 of this very process (no atexit, no flush, no finally)."""
    os.kill(os.getpid(), 9)


def read_saves(ref_root: str) -> list[dict[str, object]]:
    """The saves a writer completed, in order (``record_save``'s log)."""
    try:
        with open(os.path.join(ref_root, "saves.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def writer_args(extra: list[tuple[str, type, object]]) -> argparse.Namespace:
    """``OUT REF [--pause-s S]`` and the writer's own ``(flag, type, default)`` options;
    REF is created."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("ref")
    ap.add_argument("--pause-s", type=float, default=0.0,
                    help="sleep per step: a stand-in for a real step's compute")
    for flag, kind, default in extra:
        ap.add_argument(flag, type=kind, default=default)
    a = ap.parse_args()
    os.makedirs(a.ref, exist_ok=True)
    return a
