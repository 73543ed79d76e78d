"""The state machines' tables of moves (agent.queue.states, JOB_MOVES), and the guards that
apply them: no daemon, no network, a queue database in a temp dir at most."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest

from agent.queue import runstore
from agent.queue.runstore import RunRow, WatchedRow
from agent.queue.states import (
    ASSET_MOVES,
    RUN_MOVES,
    SEAL_MOVES,
    WATCHED_MOVES,
    AssetState,
    IllegalMove,
    RunState,
    SealMode,
    WatchedState,
    check_move,
    sources,
)
from agent.queue.store import JOB_MOVES, JobKind, JobState, Queue
from agent.runs.registry import RunInfo
from agent.watch.staging import Snapshot, StagedFile

Table = Mapping[Any, frozenset[Any]]

MACHINES: dict[str, tuple[type[StrEnum], Table, frozenset[Any]]] = {
    "job": (JobState, JOB_MOVES, frozenset({JobState.QUEUED, JobState.ABANDONED,
                                             JobState.LOST})),
    "run": (RunState, RUN_MOVES, frozenset({RunState.RUNNING})),
    "seal": (SealMode, SEAL_MOVES, frozenset({SealMode.OPEN})),
    "watched": (WatchedState, WATCHED_MOVES, frozenset({
        WatchedState.SEALED, WatchedState.ELSEWHERE, WatchedState.ABANDONED,
        WatchedState.LOST})),
    "asset": (AssetState, ASSET_MOVES, frozenset({AssetState.NEW})),
}
"""Each machine: its enum, its table, and the states its rows are born in."""


def _pairs(enum: type[StrEnum]) -> list[tuple[Any, Any]]:
    return [(a, b) for a in enum for b in enum]


@pytest.mark.parametrize("name", MACHINES)
def test_every_table_covers_every_state_and_names_only_its_own(name: str) -> None:
    enum, moves, born = MACHINES[name]
    assert set(moves) == set(enum)
    for state, targets in moves.items():
        assert isinstance(state, enum) and isinstance(targets, frozenset)
        assert all(isinstance(t, enum) for t in targets), (state, targets)
    assert born <= set(enum)


@pytest.mark.parametrize("name", MACHINES)
def test_every_state_is_reached_from_a_birth(name: str) -> None:
    _enum, moves, born = MACHINES[name]
    seen, todo = set(born), list(born)
    while todo:
        for t in moves[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    assert seen == set(moves)


@pytest.mark.parametrize("name", MACHINES)
def test_a_move_is_allowed_exactly_when_its_table_says(name: str) -> None:
    enum, moves, _born = MACHINES[name]
    for a, b in _pairs(enum):
        if b in moves[a]:
            assert check_move(moves, a, b, f"{name} x") is b
            assert a in sources(moves, b)
        else:
            with pytest.raises(IllegalMove) as e:
                check_move(moves, a, b, f"{name} x")
            assert e.value.code == "illegal_move"
            assert f"{name} x cannot move from {a} to {b}" in e.value.message
            assert a not in sources(moves, b)


def test_a_final_state_says_so() -> None:
    with pytest.raises(IllegalMove, match="it is final"):
        check_move(RUN_MOVES, RunState.ENDED, RunState.RUNNING, "run r")


def test_values_stay_the_strings_stored_and_sent() -> None:
    assert [str(s) for s in RunState] == ["running", "dying", "ending", "ended"]
    assert [str(s) for s in SealMode] == ["open", "strong", "closed"]
    assert [str(s) for s in WatchedState] == ["sealed", "done", "abandoned", "lost",
                                              "elsewhere", "superseded"]
    assert [str(s) for s in AssetState] == ["new", "registering", "registered", "finalized",
                                            "abandoned"]
    assert json.dumps({"state": RunState.DYING}) == '{"state": "dying"}'
    assert f"{WatchedState.SEALED}" == "sealed" and RunState("ended") is RunState.ENDED


# ---- the moves the code makes ------------------------------------------------------------------

CODE_MOVES: list[tuple[str, Any, Any]] = [
    # agent.queue.store: claim, cancel, abandon_job, finish, release/recover, retry;
    # runstore.relabel_abandoned (agent.watch.watcher: a superseded checkpoint's job)
    ("job", JobState.QUEUED, JobState.RUNNING),
    ("job", JobState.QUEUED, JobState.CANCELLED),
    ("job", JobState.QUEUED, JobState.ABANDONED),
    *[("job", JobState.RUNNING, s) for s in (JobState.DONE, JobState.FAILED,
                                            JobState.CANCELLED, JobState.ABANDONED,
                                            JobState.LOST, JobState.QUEUED)],
    ("job", JobState.FAILED, JobState.QUEUED),
    ("job", JobState.CANCELLED, JobState.QUEUED),
    ("job", JobState.FAILED, JobState.ABANDONED),
    ("job", JobState.CANCELLED, JobState.ABANDONED),
    # agent.runs.registry: a lease expires; finish (running or dying); a death; the end
    ("run", RunState.RUNNING, RunState.DYING),
    ("run", RunState.RUNNING, RunState.ENDING),
    ("run", RunState.DYING, RunState.ENDING),
    ("run", RunState.ENDING, RunState.ENDED),
    # agent.runs.registry: restore (ended: closed; dead or failed: strong), a death, settling
    ("seal", SealMode.OPEN, SealMode.CLOSED),
    ("seal", SealMode.OPEN, SealMode.STRONG),
    ("seal", SealMode.STRONG, SealMode.STRONG),
    ("seal", SealMode.STRONG, SealMode.CLOSED),
    # agent.watch.watcher: _cleanup once a job ended, _supervise on a rewrite in place
    ("watched", WatchedState.SEALED, WatchedState.DONE),
    ("watched", WatchedState.SEALED, WatchedState.ABANDONED),
    ("watched", WatchedState.SEALED, WatchedState.SUPERSEDED),
    ("watched", WatchedState.SUPERSEDED, WatchedState.SUPERSEDED),
    # agent.transfer.upload (register, finalize, abandon), agent.transfer.worker (inline,
    # an asset abandoned remotely, a retry's reset), agent.runs.registry (abandon_local_asset)
    ("asset", AssetState.NEW, AssetState.REGISTERING),
    ("asset", AssetState.REGISTERING, AssetState.REGISTERED),
    ("asset", AssetState.REGISTERED, AssetState.FINALIZED),
    ("asset", AssetState.NEW, AssetState.FINALIZED),
    ("asset", AssetState.FINALIZED, AssetState.FINALIZED),
    ("asset", AssetState.REGISTERED, AssetState.ABANDONED),
    ("asset", AssetState.NEW, AssetState.ABANDONED),
    ("asset", AssetState.REGISTERING, AssetState.ABANDONED),
    ("asset", AssetState.ABANDONED, AssetState.NEW),
]


@pytest.mark.parametrize(("name", "start", "to"), CODE_MOVES,
                         ids=[f"{n}:{a}->{b}" for n, a, b in CODE_MOVES])
def test_the_moves_the_code_makes_are_allowed(name: str, start: Any, to: Any) -> None:
    _enum, moves, _born = MACHINES[name]
    assert check_move(moves, start, to, name) is to


def test_a_runs_moves_go_through_its_table() -> None:
    info = RunInfo("run_s", 1000, None)
    assert (info.state, info.sealing) == (RunState.RUNNING, SealMode.OPEN)
    info.move(RunState.DYING)
    info.seal_only(SealMode.STRONG)
    info.move(RunState.ENDING)
    info.seal_only(SealMode.STRONG)
    info.seal_only(SealMode.CLOSED)
    info.move(RunState.ENDED)
    assert info.to_api()["state"] == "ended" and info.to_api()["settled"] is True
    with pytest.raises(IllegalMove, match="run run_s cannot move from ended to running"):
        info.move(RunState.RUNNING)
    with pytest.raises(IllegalMove, match="sealing cannot move from closed to open"):
        info.seal_only(SealMode.OPEN)
    assert (info.state, info.sealing) == (RunState.ENDED, SealMode.CLOSED)


# ---- the guarded writes --------------------------------------------------------------------------


@pytest.fixture
def q(tmp_path: Path) -> Queue:
    return Queue(tmp_path / "queue.db")


def test_an_asset_record_moves_by_its_table_and_refuses_the_rest(q: Queue) -> None:
    rec = q.create_asset(asset_type="t", uid=1, run_id=None, visibility=None, components=[])
    assert rec.state is AssetState.NEW
    q.set_asset(rec.asset_key, state=AssetState.REGISTERING)
    q.set_asset(rec.asset_key, asset_id="asset_1", state=AssetState.REGISTERED)
    got = q.asset(rec.asset_key)
    assert got is not None and (got.state, got.asset_id) == (AssetState.REGISTERED, "asset_1")
    with pytest.raises(IllegalMove, match="cannot move from registered to registering"):
        q.set_asset(rec.asset_key, asset_id="asset_2", state=AssetState.REGISTERING)
    with pytest.raises(IllegalMove, match="cannot move from registered to new"):
        q.reset_asset(rec.asset_key)
    got = q.asset(rec.asset_key)  # a refused move changes nothing
    assert got is not None and (got.state, got.asset_id) == (AssetState.REGISTERED, "asset_1")
    q.set_asset(rec.asset_key, state=AssetState.ABANDONED)
    q.reset_asset(rec.asset_key)
    got = q.asset(rec.asset_key)
    assert got is not None and (got.state, got.asset_id) == (AssetState.NEW, None)
    q.set_asset("la_gone", state=AssetState.FINALIZED)  # a record that is gone: left so
    q.reset_asset("la_gone")


def _row(path: str, state: WatchedState = WatchedState.SEALED) -> WatchedRow:
    return WatchedRow(runstore.new_ckpt_id(), path, "run_s", "rule", state, "marker")


def test_a_watched_row_moves_by_its_table_and_refuses_the_rest(q: Queue) -> None:
    row = _row("/c/one")
    runstore.seal_checkpoint(q, row, 1000, {"path": "/c/one"}, 1)
    runstore.set_watched(q, row.ckpt_id, state=WatchedState.SUPERSEDED, snapshot="/s/x")
    runstore.set_watched(q, row.ckpt_id, state=WatchedState.SUPERSEDED)
    with pytest.raises(IllegalMove, match=f"checkpoint {row.ckpt_id} cannot move from "
                                          "superseded to done"):
        runstore.set_watched(q, row.ckpt_id, state=WatchedState.DONE)
    elsewhere = _row("/c/two", WatchedState.ELSEWHERE)
    runstore.record_watched(q, elsewhere)
    with pytest.raises(IllegalMove, match="it is final"):
        runstore.set_watched(q, elsewhere.ckpt_id, state=WatchedState.ABANDONED)
    states = {r.path: r.state for r in runstore.latest_watched(q)}
    assert states == {"/c/one": WatchedState.SUPERSEDED, "/c/two": WatchedState.ELSEWHERE}
    runstore.set_watched(q, "ck_gone", state=WatchedState.DONE)  # gone: left so


def test_a_job_move_outside_its_table_is_refused_before_the_database(q: Queue) -> None:
    job = q.enqueue(JobKind.UPLOAD, 1000, {"path": "/x"})
    with pytest.raises(IllegalMove, match=f"job {job.job_id} cannot move from done to queued"):
        q._move(job.job_id, (JobState.DONE,), JobState.QUEUED)
    with pytest.raises(IllegalMove, match="cannot move from lost to abandoned"):
        runstore.relabel_abandoned(q, job.job_id, (JobState.QUEUED, JobState.LOST), "x", "y")
    got = q.get(job.job_id)
    assert got is not None and got.state is JobState.QUEUED


# ---- rows read by name ---------------------------------------------------------------------------


def test_a_run_row_is_saved_and_read_back_by_name(q: Queue) -> None:
    row = RunRow(run_id="run_s", uid=1000, pid=42, pid_start=7, wrapper_pid=None,
                 liveness="pid", lease_s=60.0, on_exit="drain", watch=[{"path": "/c/*"}],
                 state=RunState.RUNNING, status=None, exit_code=None, last_seen=1.0,
                 created_at=2.0, cred_id=None)
    runstore.save_run(q, row)
    runstore.update_run(q, "run_s", state=RunState.ENDING, status="finished", exit_code=0)
    (got,) = runstore.load_runs(q)
    assert got.state is RunState.ENDING and got.updated_at is not None
    assert (got.watch, got.pid, got.status, got.exit_code) == ([{"path": "/c/*"}], 42,
                                                               "finished", 0)
    assert RunInfo.of(got).row().state is RunState.ENDING
    assert runstore.load_runs(q, (RunState.ENDED,)) == []


def test_a_snapshots_files_keep_their_names_through_the_watched_row(q: Queue) -> None:
    files = {"a.bin": StagedFile(5, 10, 99, "link"), "b.bin": StagedFile(3, 11, 98, "copy")}
    snap = Snapshot("/s/snap_1", "/s/snap_1/ck", files)
    assert snap.linked() == {"a.bin": files["a.bin"]}
    row = _row("/c/ck")
    row.snapshot, row.staged = snap.dir, {"path": snap.path, "files": snap.files}
    runstore.seal_checkpoint(q, row, 1000, {"path": snap.path}, 8)
    ((got, job_state, _code),) = runstore.staged_rows(q)
    assert got.staged is not None and job_state == JobState.QUEUED
    assert got.staged["files"]["a.bin"] == [5, 10, 99, "link"]  # stored as before: a list
    again = {rel: StagedFile(*v) for rel, v in got.staged["files"].items()}
    assert again == files and again["b.bin"].how == "copy" and again["a.bin"].size == 5
    assert got.state is WatchedState.SEALED and got.created_at <= time.time()
