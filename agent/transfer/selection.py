"""Which asset, and which of its components, a download takes.

**The latest asset of a run** (``download --latest``, ``POST /v1/downloads`` with
``"latest": true``, ``Run.restore()``, ``Chronicle().assets.latest``): one
``GET /v1/assets?output_of=RUN&asset_type=TYPE&state=ready`` (the contract's listing), then,
among the assets of that run and type that are ``ready``, the newest by ``created_at`` (a
tie goes to the later ``finalized_at``, then to the greater asset id). The listing's order
is not part of the contract, so it is sorted here, and its filters are checked again here
(a Chronicle that ignored one must not hand over another run's asset). ``pending`` and
``abandoned`` assets never count; an invalidated one is skipped unless ``allow_invalid``; a
deprecated one counts, and the download warns with its reason.

**Components** (``--include GLOB`` / ``--exclude GLOB``, each repeatable; ``include`` /
``exclude`` lists in the socket API and in Python): a pattern matches a component's whole
name, a relative POSIX path such as ``shard/0001.bin``, with :func:`fnmatch.fnmatchcase`:
``*`` matches any run of characters *including* ``/``, ``?`` any one character (``/``
too), ``[seq]`` / ``[!seq]`` one character of (not of) the set; case-sensitive; a leading
``.`` is not special; there is no ``**`` and no ``{a,b}``. A component is selected when no
include pattern is given or one of them matches, and no exclude pattern matches (exclude
is applied after include). Selecting nothing is an error naming the patterns
(:class:`~agent.errors.NothingSelected`), never an empty download.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.errors import NoReadyAsset, NothingSelected, UsageError

if TYPE_CHECKING:
    from agent.chronicle import contract
    from agent.chronicle import models as m

MAX_PATTERNS = 256
"""Most include (and most exclude) patterns one download takes."""
MAX_PATTERN_CHARS = 1024
_OLDEST = datetime.min.replace(tzinfo=UTC)


# ---- components --------------------------------------------------------------------------


def check_patterns(patterns: Iterable[Any] | None, what: str) -> list[str]:
    """``patterns`` as a list of valid globs (None: none); UsageError naming the bad one."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise UsageError(f"{what}: expected a list of patterns, not one string")
    out = list(patterns)
    if len(out) > MAX_PATTERNS:
        raise UsageError(f"{what}: {len(out)} patterns; at most {MAX_PATTERNS}")
    for p in out:
        if not isinstance(p, str) or not p:
            raise UsageError(f"{what}: {p!r} is not a pattern (a non-empty string)")
        if len(p) > MAX_PATTERN_CHARS or not p.isprintable():
            raise UsageError(f"{what}: {p[:80]!r} is not a pattern: printable text of at "
                             f"most {MAX_PATTERN_CHARS} characters")
    return out


def is_selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def describe_filters(include: Sequence[str], exclude: Sequence[str]) -> str:
    parts = [f"include {list(include)!r}" if include else "",
             f"exclude {list(exclude)!r}" if exclude else ""]
    return " and ".join(p for p in parts if p) or "no pattern"


def select_components(asset: m.Asset, include: Sequence[str] | None,
                      exclude: Sequence[str] | None) -> list[m.Component]:
    """The components of ``asset`` the patterns select, in the asset's order;
    :class:`NothingSelected` when that is none of them."""
    inc, exc = list(include or ()), list(exclude or ())
    chosen = [c for c in asset.components if is_selected(c.name, inc, exc)]
    if not chosen:
        names = [c.name for c in asset.components]
        shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
        raise NothingSelected(
            f"no component of asset {asset.asset_id} is selected by "
            f"{describe_filters(inc, exc)} (its components: {shown or 'none'})")
    return chosen


def filtered(asset: m.Asset, include: Sequence[str] | None,
             exclude: Sequence[str] | None) -> m.Asset:
    """``asset`` with only the selected components (the asset itself when that is all)."""
    chosen = select_components(asset, include, exclude)
    if len(chosen) == len(asset.components):
        return asset
    return asset.model_copy(update={"components": chosen})


# ---- the latest asset of a run -----------------------------------------------------------


def latest_call(run_id: str, asset_type: str) -> contract.Call[m.AssetList]:
    """The listing the choice is made from: the run's ready assets of that type."""
    from agent.chronicle import contract

    return contract.list_assets(output_of=run_id, state="ready", asset_type=asset_type)


def _when(value: str | None) -> datetime:
    if not value:
        return _OLDEST
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return _OLDEST
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _newness(a: m.Asset) -> tuple[datetime, datetime, str]:
    return _when(a.created_at), _when(a.finalized_at), a.asset_id


def pick_latest(assets: Iterable[m.Asset], run_id: str, asset_type: str,
                allow_invalid: bool = False) -> m.Asset | None:
    """The newest ready asset of ``run_id`` and ``asset_type`` in ``assets`` (invalidated
    ones only with ``allow_invalid``); None when there is none."""
    fit = [a for a in assets
           if a.state == "ready" and a.output_of == run_id and a.asset_type == asset_type
           and (allow_invalid or a.invalidated is None)]
    return max(fit, key=_newness, default=None)


def require_latest(assets: Iterable[m.Asset], run_id: str, asset_type: str,
                   allow_invalid: bool = False) -> m.Asset:
    """:func:`pick_latest`, or :class:`NoReadyAsset` naming the run and the type."""
    listed = list(assets)
    found = pick_latest(listed, run_id, asset_type, allow_invalid)
    if found is not None:
        return found
    message = f"run {run_id} has no ready asset of type {asset_type!r}"
    skipped = pick_latest(listed, run_id, asset_type, allow_invalid=True)
    if skipped is not None:
        message += (f" that is not invalidated (the newest, {skipped.asset_id}, is "
                    "invalidated; --allow-invalid / allow_invalid=True takes it)")
    raise NoReadyAsset(message)


def selected_view(asset: m.Asset) -> dict[str, Any]:
    """What a download says about the asset ``latest`` chose (``"selected"``)."""
    return {
        "asset_id": asset.asset_id,
        "asset_type": asset.asset_type,
        "run_id": asset.output_of,
        "created_at": asset.created_at,
        "finalized_at": asset.finalized_at,
        "deprecated": asset.deprecated.reason if asset.deprecated is not None else None,
        "invalidated": asset.invalidated.reason if asset.invalidated is not None else None,
    }
