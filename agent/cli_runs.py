"""``chronicle-agent runs [RUN] [--json]``: the runs this daemon knows, or one run with what
became of each of its checkpoints (``GET /v1/runs``, ``GET /v1/runs/{id}`` and
``GET /v1/runs/{id}/checkpoints``).

Also :func:`summary`, the one-line account of a run's checkpoints that ``runs`` and
``exec`` print. Names (paths, run ids, messages) go through :func:`agent.termsafe.visible`
before they reach a terminal; ``--json`` prints the daemon's objects as they are.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.client import SocketClient, path_segment
from agent.termsafe import visible

if TYPE_CHECKING:
    from agent.cli import Ctx


def add_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add ``runs`` to the parser of :mod:`agent.cli`."""
    p = command("runs", "list runs with their checkpoint counts, or show one run and the "
                        "fate of each of its checkpoints")
    p.add_argument("run_id", nargs="?", metavar="RUN",
                   help="a run id: show it and its checkpoints")
    p.add_argument("--json", action="store_true",
                   help='print {"runs": [...]}, or the run (its "checkpoints" included)')
    p.set_defaults(handler=cmd_runs)


def get_run(client: SocketClient, run_id: str, timeout_s: float | None = None
            ) -> dict[str, Any]:
    return client.request("GET", f"/v1/runs/{path_segment(run_id)}", timeout_s=timeout_s)


def summary(counts: dict[str, Any]) -> str:
    """``6 checkpoints sealed (4 ready, 2 uploading), 0 lost, 0 abandoned``: lost and
    abandoned always ("0 lost" is a statement), the rest when there are any."""
    def n(key: str) -> int:
        return int(counts.get(key) or 0)

    sealed = n("sealed")
    text = f"{sealed} checkpoint{'' if sealed == 1 else 's'} sealed"
    if sealed:
        parts = [f"{n('ready')} ready", f"{n('uploading')} uploading"]
        parts += [f"{n('failed')} failed"] if n("failed") else []
        text += f" ({', '.join(parts)})"
    text += f", {n('lost')} lost, {n('abandoned')} abandoned"
    if n("elsewhere"):
        text += f", {n('elsewhere')} uploaded by another agent"
    if n("unsealed"):
        text += f", {n('unsealed')} not sealed yet"
    return text


def table(header: Sequence[str], rows: list[Sequence[object]]) -> str:
    """Aligned columns, every cell made visible (one line per row whatever it holds); the
    last column is not padded."""
    cells = [[visible(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)),
                                r[-1]]).rstrip() for r in cells)


def _when(stamp: str | None) -> str:
    """An RFC 3339 UTC time as ``2026-12-01 16:03:07``."""
    return stamp[:19].replace("T", " ") if stamp else "-"


def _fate(c: dict[str, Any]) -> str:
    """``sealed (uploading)``: the fate, and the detail where it says more."""
    fate, detail = str(c.get("fate")), c.get("detail")
    return fate if detail in (None, fate) else f"{fate} ({detail})"


def _state(run: dict[str, Any]) -> str:
    state = str(run.get("state"))
    if run.get("status"):
        state += f" ({run['status']}"
        state += f", exit {run['exit_code']})" if run.get("exit_code") is not None else ")"
    return state


def _process(run: dict[str, Any], short: bool = False) -> str:
    """What keeps the run alive: its process, or heartbeats within a lease."""
    if run.get("liveness") == "pid":
        return str(run.get("pid")) if short else f"pid {run.get('pid')}"
    return "lease" if short else f"heartbeats within a lease of {run.get('lease_s')} s"


def _reason(ck: dict[str, Any]) -> str:
    r = ck.get("reason")
    return f"{r.get('code')}: {r.get('message')}" if isinstance(r, dict) else ""


def cmd_runs(ctx: Ctx) -> int:
    client = ctx.client()
    if ctx.args.run_id is None:
        runs = client.request("GET", "/v1/runs").get("runs") or []
        if ctx.args.json:
            ctx.print_json({"runs": runs})
        elif runs:
            ctx.print(table(
                ("RUN", "STATE", "PID", "STARTED (UTC)", "ENDED (UTC)", "CHECKPOINTS"),
                [(r.get("run_id"), _state(r), _process(r, short=True),
                  _when(r.get("started_at")), _when(r.get("ended_at")),
                  summary(r.get("checkpoint_counts") or {})) for r in runs]))
        else:
            ctx.warn("no runs")
        return 0
    run = get_run(client, ctx.args.run_id)
    checkpoints = run.get("checkpoints") or []
    if ctx.args.json:
        ctx.print_json(run)
        return 0
    rules = ", ".join(f"{w.get('path')} ({w.get('asset_type')})" for w in run.get("watch") or [])
    about = [
        ("run:", run.get("run_id")),
        ("state:", _state(run)),
        ("process:", _process(run)),
        ("started:", _when(run.get("started_at")) + " UTC"),
        ("ended:", _when(run.get("ended_at")) + (" UTC" if run.get("ended_at") else "")),
        ("watch:", rules or "-"),
        ("checkpoints:", summary(run.get("checkpoint_counts") or {})),
    ]
    ctx.print("\n".join(f"{key:<13}{visible(value)}" for key, value in about))
    if checkpoints:
        ctx.print()
        ctx.print(table(("PATH", "SEAL", "FATE", "JOB", "ASSET", "REASON"), [
            (c.get("path"), c.get("seal") or "-", _fate(c), c.get("job_id") or "-",
             c.get("asset_id") or "-", _reason(c)) for c in checkpoints]))
    return 0
