"""The leader's planning process (`agent.plan_worker`): real spawned processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgedi.agent.pacing import join_cgroup
from edgedi.agent.plan_worker import (
    PlanWorker,
    PlanWorkerError,
    auto_candidates,
    fit_message_cost,
    strategy_plan,
)
from edgedi.models.specs import get_spec
from edgedi.planner.cost import NetworkModel
from edgedi.planner.errors import InfeasiblePlanError, PlannerError
from edgedi.planner.profiles import DeviceProfile, TimeModel
from edgedi.planner.replay import replay_plan
from edgedi.planner.strategies import get_strategy
from edgedi.planner.strategies.auto import candidates

MODEL = "tiny-edgedi"
SIZE = 48


def cluster(count: int) -> list[DeviceProfile]:
    """Devices of speeds 1, 0.75, 0.5, ...: 1 ns per multiply-add at speed 1."""
    return [
        DeviceProfile(
            device=f"pi-{index + 1}",
            time_models={},
            default=TimeModel(seconds_per_mac=1e-9 / speed, seconds_fixed=1e-4 / speed),
            memory_bytes=2**30,
            bandwidth=12.5e6,
            latency_s=5e-4,
        )
        for index, speed in enumerate(1.0 - 0.25 * i for i in range(count))
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not running either: it only waits for its parent to reap it.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


async def test_the_process_plans_what_the_planner_plans_here() -> None:
    profiles = cluster(3)
    spec = get_spec(MODEL, SIZE)
    network = NetworkModel()
    worker = PlanWorker()
    try:
        found = await worker.run(
            auto_candidates, MODEL, SIZE, profiles, profiles[0].device, 1, network, None
        )
        here = candidates(spec, profiles, leader=profiles[0].device, epoch=1, network=network)
        assert [(c.name, c.predicted_s) for c in found] == [(c.name, c.predicted_s) for c in here]
        plan = await worker.run(
            strategy_plan, MODEL, SIZE, "edgeci", profiles, profiles[0].device, 1, "p1", network
        )
        made_here = get_strategy("edgeci").plan(
            spec, profiles, epoch=1, leader=profiles[0].device, plan_id="p1"
        )
        assert plan.segments == made_here.segments
        assert plan.predicted_latency_s == pytest.approx(
            replay_plan(made_here, spec, profiles, network).latency_s
        )
    finally:
        worker.close()


async def test_known_candidates_are_replayed_with_the_new_costs_not_searched_again() -> None:
    profiles = cluster(3)
    worker = PlanWorker()
    leader = profiles[0].device
    try:
        first = await worker.run(
            auto_candidates, MODEL, SIZE, profiles, leader, 1, NetworkModel(), None
        )
        dearer = NetworkModel(broker_per_message_s=0.01)
        again = await worker.run(auto_candidates, MODEL, SIZE, profiles, leader, 1, dearer, first)
        assert [c.plan.plan_id for c in again] == [c.plan.plan_id for c in first]
        several = [c for c in first if len(c.plan.devices_used) > 1]
        assert several
        slower = {c.name: c.predicted_s for c in again}
        assert all(slower[c.name] > c.predicted_s for c in several)
    finally:
        worker.close()


async def test_a_fitted_cost_makes_the_replay_predict_the_measurement() -> None:
    profiles = cluster(3)
    spec = get_spec(MODEL, SIZE)
    worker = PlanWorker()
    try:
        plan = await worker.run(
            strategy_plan, MODEL, SIZE, "equal", profiles, profiles[0].device, 1, "p", None
        )
        assert any(segment.reductions for segment in plan.segments), "a plan with gate rounds"
        base = NetworkModel()
        predicted = replay_plan(plan, spec, profiles, base).latency_s
        costs = await worker.run(
            fit_message_cost, plan, MODEL, SIZE, profiles, base, "gate_round_s", predicted * 1.5
        )
        assert list(costs) == ["gate_round_s"] and costs["gate_round_s"] > 0
        fitted = base.model_copy(update=costs)
        assert replay_plan(plan, spec, profiles, fitted).latency_s == pytest.approx(
            predicted * 1.5, rel=1e-3
        )
    finally:
        worker.close()


async def test_a_plan_faster_than_any_round_cost_fits_the_message_cost_down() -> None:
    """A per-message cost fitted to a slow plan over-prices a fast one with gate
    rounds: no cost per round fits it, so the cost per message is fitted too."""
    profiles = cluster(3)
    spec = get_spec(MODEL, SIZE)
    worker = PlanWorker()
    try:
        plan = await worker.run(
            strategy_plan, MODEL, SIZE, "equal", profiles, profiles[0].device, 1, "p", None
        )
        dear = NetworkModel(broker_per_message_s=0.005)
        cheap = replay_plan(plan, spec, profiles, NetworkModel(broker_per_message_s=0.001))
        costs = await worker.run(
            fit_message_cost, plan, MODEL, SIZE, profiles, dear, "gate_round_s", cheap.latency_s
        )
        assert costs["gate_round_s"] == 0.0
        assert costs["broker_per_message_s"] == pytest.approx(0.001, rel=1e-3)
    finally:
        worker.close()


async def test_errors_come_back_with_their_message_and_kind() -> None:
    profiles = cluster(2)
    worker = PlanWorker()
    try:
        # UnknownStrategyError takes (name, known): it cannot be rebuilt as it was
        # raised, and a pool that fails to rebuild an answer counts its process dead.
        with pytest.raises(PlannerError, match="unknown strategy 'no-such'"):
            await worker.run(
                strategy_plan, MODEL, SIZE, "no-such", profiles, profiles[0].device, 1, "p", None
            )
        with pytest.raises(ValueError, match="unknown model"):
            await worker.run(
                strategy_plan, "no-such-model", SIZE, "edgeci", profiles, "x", 1, "p", None
            )
        with pytest.raises(PlanWorkerError, match="ZeroDivisionError"):
            await worker.run(divmod, 1, 0)
        # The same process answered all three.
        assert await worker.run(os.getpid) == await worker.run(os.getpid)
    finally:
        worker.close()


def _infeasible() -> None:
    raise InfeasiblePlanError("no device can hold the model")


async def test_an_infeasible_plan_stays_infeasible() -> None:
    worker = PlanWorker()
    try:
        with pytest.raises(InfeasiblePlanError, match="no device can hold"):
            await worker.run(_infeasible)
    finally:
        worker.close()


async def test_a_killed_process_is_replaced_and_close_ends_it() -> None:
    worker = PlanWorker()
    first = await worker.run(os.getpid)
    assert first != os.getpid()
    os.kill(first, signal.SIGKILL)
    assert _wait_gone(first)
    second = await worker.run(os.getpid)
    assert second != first
    worker.close()
    assert _wait_gone(second), "close() left the planning process running"


async def test_the_process_joins_the_cgroup_it_is_given(tmp_path: Path) -> None:
    # A plain file stands in for a cgroup's `cgroup.procs`: the process writes its pid.
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    worker = PlanWorker(procs)
    try:
        pid = await worker.run(os.getpid)
    finally:
        worker.close()
    assert procs.read_text() == str(pid) and pid != os.getpid()


def test_a_cgroup_that_refuses_leaves_the_process_where_it_is(tmp_path: Path) -> None:
    assert join_cgroup(None, os.getpid(), "a test") is False
    assert join_cgroup(tmp_path / "no-such-group" / "cgroup.procs", os.getpid(), "a test") is False


_AGENT = """
import asyncio, os, sys, time
from edgedi.agent.plan_worker import PlanWorker

async def main():
    worker = PlanWorker()
    print(await worker.run(os.getpid), flush=True)
    time.sleep(60)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_the_process_ends_when_its_agent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(_AGENT)
    with subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True
    ) as agent:
        try:
            assert agent.stdout is not None
            planning = int(agent.stdout.readline())
            assert _alive(planning)
            agent.kill()
            agent.wait(timeout=10)
            assert _wait_gone(planning), "the planning process outlived its killed agent"
        finally:
            agent.kill()


async def test_a_plan_without_gate_rounds_fits_only_the_message_cost() -> None:
    profiles = cluster(3)
    spec = get_spec("tiny", SIZE)
    worker = PlanWorker()
    try:
        plan = await worker.run(
            strategy_plan, "tiny", SIZE, "edgeci", profiles, profiles[0].device, 1, "p", None
        )
        assert not any(segment.reductions for segment in plan.segments)
        base = NetworkModel(gate_round_s=0.01)
        fast = replay_plan(plan, spec, profiles, base).latency_s / 2
        costs = await worker.run(
            fit_message_cost, plan, "tiny", SIZE, profiles, base, "broker_per_message_s", fast
        )
        assert costs == {"broker_per_message_s": 0.0}
    finally:
        worker.close()
