"""The daemon's state machines besides the jobs': each an enum and one table of the moves it
allows, applied by :func:`check_move`.

The enums are :class:`~enum.StrEnum`: a state is stored in SQLite and sent in JSON as the
same string as before. The jobs' machine (:class:`~agent.queue.store.JobState`,
``JOB_MOVES``) lives with the queue. A table maps every state to the states it may become;
a state that may become nothing is final. The tables say what the code does, races
included (see ``ASSET_MOVES``): a move not in them is a bug, raised as :class:`IllegalMove`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from agent.errors import AgentError


class IllegalMove(AgentError):
    """A state change its machine's table does not allow."""

    code = "illegal_move"


S = TypeVar("S", bound=StrEnum)


def check_move(moves: Mapping[S, frozenset[S]], current: S, to: S, what: str) -> S:
    """``to``, if ``moves`` allows ``current`` → ``to``; else :class:`IllegalMove` naming
    ``what`` (e.g. ``"run run_1"``) and the moves its state allows."""
    allowed = moves.get(current, frozenset())
    if to not in allowed:
        may = ", ".join(sorted(allowed)) or "nothing: it is final"
        raise IllegalMove(f"{what} cannot move from {current} to {to} (from {current} it may "
                          f"become {may})")
    return to


def sources(moves: Mapping[S, frozenset[S]], to: S) -> tuple[S, ...]:
    """The states a move to ``to`` may start from (a guarded ``UPDATE … WHERE state IN``)."""
    return tuple(sorted(s for s, targets in moves.items() if to in targets))


# ---- runs ------------------------------------------------------------------------------------


class RunState(StrEnum):
    """A run the daemon tracks (:mod:`agent.runs.registry`)."""

    RUNNING = "running"
    DYING = "dying"
    """Its lease expired: its death is being recorded (in memory only; stored as ending)."""
    ENDING = "ending"
    """Finished or dead: its checkpoints are being settled and its jobs drained."""
    ENDED = "ended"
    """Ended on Chronicle."""


RUN_MOVES: dict[RunState, frozenset[RunState]] = {
    RunState.RUNNING: frozenset({RunState.DYING, RunState.ENDING}),
    RunState.DYING: frozenset({RunState.ENDING}),
    RunState.ENDING: frozenset({RunState.ENDED}),
    RunState.ENDED: frozenset(),
}
"""running → dying (lease expired) → ending (finish, or its death recorded) → ended."""


class SealMode(StrEnum):
    """Which seals a run's checkpoints may still get (``RunRegistry.sealing``)."""

    OPEN = "open"
    """Any seal."""
    STRONG = "strong"
    """The run died (or failed): only strong seals, never quiescence."""
    CLOSED = "closed"
    """Its end is settled: nothing more is sealed."""


SEAL_MOVES: dict[SealMode, frozenset[SealMode]] = {
    SealMode.OPEN: frozenset({SealMode.STRONG, SealMode.CLOSED}),
    SealMode.STRONG: frozenset({SealMode.STRONG, SealMode.CLOSED}),
    SealMode.CLOSED: frozenset(),
}
"""strong → strong: a death sets it, and settling an unclean end sets it again."""


# ---- watched checkpoints ---------------------------------------------------------------------


class WatchedState(StrEnum):
    """What was decided about a watched checkpoint (a ``watched`` row). A row is born
    sealed, elsewhere, abandoned or lost."""

    SEALED = "sealed"
    """Sealed here: snapshotted, its upload job queued."""
    DONE = "done"
    """Its job is done; its snapshot removed."""
    ABANDONED = "abandoned"
    """Never becomes an asset (not sealed when its run ended, invalid, its job abandoned or
    cancelled)."""
    LOST = "lost"
    """Completed by its writer, but it could not be captured."""
    ELSEWHERE = "elsewhere"
    """Another agent sharing the filesystem claimed it."""
    SUPERSEDED = "superseded"
    """Rewritten in place after its seal: a later version replaces it."""


WATCHED_MOVES: dict[WatchedState, frozenset[WatchedState]] = {
    WatchedState.SEALED: frozenset({WatchedState.DONE, WatchedState.ABANDONED,
                                    WatchedState.SUPERSEDED}),
    WatchedState.SUPERSEDED: frozenset({WatchedState.SUPERSEDED}),
    WatchedState.DONE: frozenset(),
    WatchedState.ABANDONED: frozenset(),
    WatchedState.LOST: frozenset(),
    WatchedState.ELSEWHERE: frozenset(),
}
"""sealed → done | abandoned | superseded once its job ended (or was superseded);
superseded → superseded when its snapshot is removed, once its job ended."""


# ---- the daemon's asset records --------------------------------------------------------------


class AssetState(StrEnum):
    """The daemon's local record of an asset it uploads (``AssetRecord.state``)."""

    NEW = "new"
    """Not registered with Chronicle (yet, or again after a reset)."""
    REGISTERING = "registering"
    """The registration was sent; a restart replays it with the same key."""
    REGISTERED = "registered"
    FINALIZED = "finalized"
    ABANDONED = "abandoned"


ASSET_MOVES: dict[AssetState, frozenset[AssetState]] = {
    AssetState.NEW: frozenset({
        AssetState.REGISTERING,
        AssetState.FINALIZED,  # an inline asset: created and finalized in one call
        AssetState.ABANDONED,  # its run ended before it was registered
        AssetState.NEW,  # a reset of a record nothing was sent for
    }),
    AssetState.REGISTERING: frozenset({AssetState.REGISTERED, AssetState.ABANDONED}),
    AssetState.REGISTERED: frozenset({AssetState.FINALIZED, AssetState.ABANDONED}),
    AssetState.FINALIZED: frozenset({
        AssetState.FINALIZED,  # an inline job run again after a crash before its end
        AssetState.ABANDONED,  # only by a race: abandon_local_asset after the finalize
    }),
    AssetState.ABANDONED: frozenset({
        AssetState.NEW,  # reset_asset, when a job of the asset is retried
        # only by races (the record is written by whoever comes last: an abandon by the
        # registry, the worker's own steps for the asset it still uploads) and by a retried
        # finalize job of an abandoned presigned asset that Chronicle still finalizes
        AssetState.ABANDONED, AssetState.REGISTERING, AssetState.REGISTERED,
        AssetState.FINALIZED,
    }),
}
"""new → registering → registered → finalized, or abandoned from any of them; an abandoned
record is reset to new when its job is retried."""
