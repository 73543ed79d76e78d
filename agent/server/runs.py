"""Runs, experiments and variations: only what assets need from them.

Runs: create (idempotent on id), get, end (abandons the run's pending assets). Experiments:
create, get, add variations with input assets (invalidated inputs refused unless allowed,
deprecated ones warned about), link outputs, retract (invalidates every output).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from . import auth, db
from .app import Core, Ctx, Route, new_id, require_asset
from .assets import release_storage
from .bodies import Named, OutputLink, Reason, RunCreate, RunEnd, VariationCreate
from .db import ExperimentRow, RunRow, VariationRow, utcnow
from .http import Reply, conflict, forbidden, not_found

log = logging.getLogger(__name__)


class Runs:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def create(self, ctx: Ctx) -> Reply:
        body = ctx.body(RunCreate)
        run_id = body.run_id or new_id("run")
        run = RunRow(run_id, body.name, "running", ctx.principal.id, utcnow())

        def txn(conn: sqlite3.Connection) -> Reply:
            existing = db.get_run(conn, run_id)
            if existing is not None:
                return Reply(200, existing.to_json())
            db.insert_run(conn, run)
            return Reply(201, run.to_json())

        return await ctx.commit(txn)

    async def get(self, ctx: Ctx) -> Reply:
        run = await self.core.db.read(db.get_run, ctx.arg("run_id"))
        if run is None:
            raise not_found(f"run {ctx.arg('run_id')} not found")
        return Reply(200, run.to_json())

    async def end(self, ctx: Ctx) -> Reply:
        run_id = ctx.arg("run_id")
        status = ctx.body(RunEnd).status or "finished"
        abandoned: list[str] = []

        def txn(conn: sqlite3.Connection) -> Reply:
            run = db.get_run(conn, run_id)
            if run is None:
                raise not_found(f"run {run_id} not found")
            if not auth.owns(ctx.principal, run.created_by):
                raise forbidden(f"run {run_id} belongs to another principal")
            if run.ended_at is None:
                abandoned.extend(db.end_run(conn, run_id, status, f"run {run_id} ended ({status})"))
                run = db.get_run(conn, run_id)
                assert run is not None
            return Reply(200, {**run.to_json(), "abandoned": list(abandoned)})

        reply = await ctx.commit(txn)
        for asset_id in abandoned:
            await release_storage(self.core, asset_id)
        return reply


class Experiments:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def create(self, ctx: Ctx) -> Reply:
        exp = ExperimentRow(new_id("exp"), ctx.body(Named).name, ctx.principal.id, utcnow())

        def txn(conn: sqlite3.Connection) -> Reply:
            db.insert_experiment(conn, exp)
            return Reply(201, exp.to_json())

        return await ctx.commit(txn)

    async def get(self, ctx: Ctx) -> Reply:
        exp = await self.core.db.read(db.get_experiment, ctx.arg("experiment_id"))
        if exp is None:
            raise not_found(f"experiment {ctx.arg('experiment_id')} not found")
        return Reply(200, exp.to_json())

    async def add_variation(self, ctx: Ctx) -> Reply:
        experiment_id = ctx.arg("experiment_id")
        body = ctx.body(VariationCreate)
        allow_invalid = body.allow_invalid_assets
        var = VariationRow(new_id("var"), experiment_id, body.name, ctx.principal.id, utcnow())
        var.inputs = list(dict.fromkeys(body.inputs or []))

        def txn(conn: sqlite3.Connection) -> Reply:
            _owned_experiment(conn, ctx, experiment_id)
            warnings: list[dict[str, Any]] = []
            for asset_id in var.inputs:
                asset = require_asset(conn, ctx.principal, asset_id, "read")
                if asset.state != "ready":
                    raise conflict(
                        f"asset {asset_id} is {asset.state}; only ready assets are inputs"
                    )
                if asset.invalidated_at is not None and not allow_invalid:
                    raise conflict(
                        f"asset {asset_id} is invalidated ({asset.invalidated_reason}); pass "
                        "allow_invalid_assets to use it anyway",
                        code="asset_invalid",
                    )
                if asset.deprecated_at is not None:
                    warnings.append(
                        {
                            "code": "asset_deprecated",
                            "asset_id": asset_id,
                            "reason": asset.deprecated_reason or "",
                            "message": f"asset {asset_id} is deprecated: "
                            f"{asset.deprecated_reason or ''}",
                        }
                    )
            db.insert_variation(conn, var)
            return Reply(201, {**var.to_json(), "warnings": warnings})

        return await ctx.commit(txn)

    async def add_output(self, ctx: Ctx) -> Reply:
        variation_id = ctx.arg("variation_id")
        asset_id = ctx.body(OutputLink).asset_id

        def txn(conn: sqlite3.Connection) -> Reply:
            var = db.get_variation(conn, variation_id)
            if var is None:
                raise not_found(f"variation {variation_id} not found")
            exp = _owned_experiment(conn, ctx, var.experiment_id)
            require_asset(conn, ctx.principal, asset_id, "write")
            db.link_assets(conn, variation_id, [asset_id], "output")
            if exp.retracted_at is not None:
                db.set_flag(conn, asset_id, "invalidated", _retracted(exp))
            var = db.get_variation(conn, variation_id)
            assert var is not None
            return Reply(200, var.to_json())

        return await ctx.commit(txn)

    async def retract(self, ctx: Ctx) -> Reply:
        experiment_id = ctx.arg("experiment_id")
        reason = ctx.body(Reason).reason or ""

        def txn(conn: sqlite3.Connection) -> Reply:
            _owned_experiment(conn, ctx, experiment_id)
            db.retract_experiment(conn, experiment_id, reason)
            exp = db.get_experiment(conn, experiment_id)
            assert exp is not None
            invalidated = []
            for asset_id in db.experiment_outputs(conn, experiment_id):
                asset = db.get_asset(conn, asset_id)
                if asset is not None and asset.invalidated_at is None:
                    db.set_flag(conn, asset_id, "invalidated", _retracted(exp))
                    invalidated.append(asset_id)
            return Reply(200, {**exp.to_json(), "invalidated": invalidated})

        return await ctx.commit(txn)

    async def get_variation(self, ctx: Ctx) -> Reply:
        var = await self.core.db.read(db.get_variation, ctx.arg("variation_id"))
        if var is None:
            raise not_found(f"variation {ctx.arg('variation_id')} not found")
        return Reply(200, var.to_json())


def _retracted(exp: ExperimentRow) -> str:
    return f"experiment {exp.experiment_id} retracted: {exp.retracted_reason or ''}".rstrip(": ")


def _owned_experiment(conn: sqlite3.Connection, ctx: Ctx, experiment_id: str) -> ExperimentRow:
    exp = db.get_experiment(conn, experiment_id)
    if exp is None:
        raise not_found(f"experiment {experiment_id} not found")
    if not auth.owns(ctx.principal, exp.created_by):
        raise forbidden(f"experiment {experiment_id} belongs to another principal")
    return exp


def routes(core: Core) -> list[Route]:
    r, e = Runs(core), Experiments(core)
    return [
        ("POST", "/v1/runs", r.create, RunCreate),
        ("GET", "/v1/runs/{run_id}", r.get, None),
        ("POST", "/v1/runs/{run_id}/end", r.end, RunEnd),
        ("POST", "/v1/experiments", e.create, Named),
        ("GET", "/v1/experiments/{experiment_id}", e.get, None),
        ("POST", "/v1/experiments/{experiment_id}/variations", e.add_variation, VariationCreate),
        ("POST", "/v1/experiments/{experiment_id}/retract", e.retract, Reason),
        ("GET", "/v1/variations/{variation_id}", e.get_variation, None),
        ("POST", "/v1/variations/{variation_id}/outputs", e.add_output, OutputLink),
    ]
