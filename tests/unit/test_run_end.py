"""What a run's end settles, without a daemon and without a network: the run registry built
from the narrow things it uses (a real queue database in a temp dir, and stand-ins for
Chronicle, the job canceller and the watcher that record what they are asked), driven
through its API as the socket API drives it.

The rules (agent/runs/registry.py): a run that did not finish cleanly gets strong seals only
(the last scan allows no quiescence), a clean one a last scan that allows it and a wait for
what is still unsealed; then the unsealed are abandoned, the run's rules dropped, and the run
ended on Chronicle with its status once none of its jobs is left running.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent.config import Settings
from agent.queue.aqueue import AsyncQueue
from agent.queue.states import RunState, SealMode
from agent.runs.registry import RunRegistry


class Chronicle:
    """Records the calls; every one succeeds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.chronicle = self

    async def send(self, call: Any, *, token: str | None = None) -> None:
        self.calls.append((call.method, call.target(), call.json))

    async def ensure_run(self, run_id: str | None, token: str | None = None) -> None:
        self.calls.append(("ensure", str(run_id), None))

    async def features(self) -> frozenset[str]:
        return frozenset({"checksum_urls", "asset_keys"})


class Canceller:
    def __init__(self) -> None:
        self.cancelled: list[tuple[str, str | None]] = []

    def cancel_running(self, job_id: str, abandon_reason: str | None = None) -> None:
        self.cancelled.append((job_id, abandon_reason))


class Sealer:
    """The watcher as a run's end sees it: ``unsealed`` checkpoints until its last scan."""

    def __init__(self, registry: RunRegistry, unsealed: int, sealed_by_last_scan: bool) -> None:
        self.registry = registry
        self.cfg = Settings().watcher.model_copy(update={"check_s": 0.05})
        self.tally: dict[str | None, dict[str, int]] = {}
        self.left = unsealed
        self.sealed_by_last_scan = sealed_by_last_scan
        self.calls: list[tuple[Any, ...]] = []

    def add_rules(self, run_id: str, rules: list[Any], uid: int) -> None:
        self.calls.append(("add_rules", run_id, len(rules)))

    def remove_rules(self, run_id: str) -> None:
        self.calls.append(("remove_rules", run_id))

    def longest_quiescence_s(self) -> float:
        return 0.2

    def unsealed(self, run_id: str) -> int:
        return self.left

    async def final_scan(self, run_id: str, *, allow_quiescence: bool) -> None:
        self.calls.append(("final_scan", run_id, allow_quiescence,
                           self.registry.sealing(run_id)))
        if self.sealed_by_last_scan:
            self.left = 0

    async def abandon_unsealed(self, run_id: str, why: str) -> int:
        self.calls.append(("abandon_unsealed", run_id, self.left))
        n, self.left = self.left, 0
        return n


async def _settled(tmp_path: Path, status: str, *, unsealed: int, sealed_by_last_scan: bool,
                   ) -> tuple[dict[str, Any], Chronicle, Sealer]:
    queue = await AsyncQueue.open(tmp_path / "queue.db")
    chronicle = Chronicle()
    registry = RunRegistry(queue, Settings(agent={"state_dir": tmp_path}), chronicle,
                           Canceller())
    sealer = Sealer(registry, unsealed, sealed_by_last_scan)
    registry.attach(sealer)
    try:
        async with anyio.create_task_group() as tg:
            registry.bind(tg)
            await registry.restore()
            await tg.start(registry.run)
            uid = os.getuid()
            await registry.register("run_1", None, uid, lease=True,
                                    watch=[{"path": str(tmp_path / "out" / "*")}])
            assert registry.sealing("run_1") == SealMode.OPEN
            await registry.finish("run_1", status, uid=uid)
            with anyio.fail_after(10):
                while registry.get("run_1")["state"] != RunState.ENDED:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        assert registry.sealing("run_1") == SealMode.CLOSED
        return registry.get("run_1"), chronicle, sealer
    finally:
        await queue.close()


@pytest.mark.parametrize("status", ["failed", "crashed"])
async def test_an_unclean_end_seals_strongly_abandons_the_rest_and_ends_the_run(
        tmp_path: Path, status: str) -> None:
    run, chronicle, sealer = await _settled(tmp_path, status, unsealed=2,
                                            sealed_by_last_scan=False)
    assert sealer.calls == [("add_rules", "run_1", 1),
                            ("final_scan", "run_1", False, SealMode.STRONG),
                            ("abandon_unsealed", "run_1", 2), ("remove_rules", "run_1")]
    ends = [c for c in chronicle.calls if c[1] == "/v1/runs/run_1/end"]
    assert [c[2]["status"] for c in ends] == [status]
    assert run["state"] == RunState.ENDED and run["status"] == status and run["settled"]


async def test_a_clean_end_allows_quiescence_and_waits_for_what_it_seals(
        tmp_path: Path) -> None:
    run, chronicle, sealer = await _settled(tmp_path, "finished", unsealed=1,
                                            sealed_by_last_scan=True)
    assert sealer.calls == [("add_rules", "run_1", 1),
                            ("final_scan", "run_1", True, SealMode.OPEN),
                            ("abandon_unsealed", "run_1", 0), ("remove_rules", "run_1")]
    assert [c[2]["status"] for c in chronicle.calls if c[0] == "POST"] == ["finished"]
    assert run["state"] == RunState.ENDED


async def test_a_clean_end_abandons_what_stays_unsealed_past_the_wait(tmp_path: Path) -> None:
    run, _, sealer = await _settled(tmp_path, "finished", unsealed=1, sealed_by_last_scan=False)
    assert ("abandon_unsealed", "run_1", 1) in sealer.calls
    assert run["state"] == RunState.ENDED
