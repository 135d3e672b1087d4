"""The leader's planning learns from measured jobs: auto plans, fitted message costs.

Births carry measured per-unit tile costs (`unit_profiles`) as agents announce
them; `Planning` makes `auto` plans from them. When the plan in force measures far
slower than it predicted, the next plan is made with the cost of a gate round (or a
message) fitted so that the measured plan's replay matches what it measured, and
the plan that disappointed is bounded by its measurement in the next choice.
`auto` measures its candidates side by side, job by job in turn, so a machine whose
speed drifts meanwhile does not decide the choice.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import pytest

from edgedi.agent.planning import (
    MAX_LATENCY_FITS,
    MAX_ROUNDS,
    MEASURED_JOBS,
    Planning,
    profile_from_birth,
)
from edgedi.broker.messages import DeviceBirth, DeviceCapabilities, LinkEstimate, UnitProfile
from edgedi.broker.plan import Plan
from edgedi.models.specs import get_spec
from edgedi.planner.blocks import block_table
from edgedi.planner.profiles import DeviceProfile
from edgedi.planner.replay import replay_plan

MODEL = "tiny-edgedi"
SIZE = 48


def birth(device: str, speed: float) -> DeviceBirth:
    spec = get_spec(MODEL, SIZE)
    table = block_table(spec)
    return DeviceBirth(
        sender=device,
        device=device,
        session=1,
        candidate=True,
        capabilities=DeviceCapabilities(
            cores=1, memory_bytes=2**30, machine="test", software_version="test", models=(MODEL,)
        ),
        profile={"conv3x3": (1e-9 / speed, 1e-5)},
        link=LinkEstimate(bandwidth_bytes_per_second=1e8, latency_seconds=2e-4),
        unit_profiles={
            MODEL: UnitProfile(
                digest=table.digest,
                units=tuple((2e-8 / speed, 5e-5 / speed) for _ in range(table.units)),
                tail_seconds=1e-4,
            )
        },
    )


async def run_jobs(
    planning: Planning, latency: Callable[[Plan, int], float], most: int = 200
) -> tuple[list[Plan], int]:
    """Jobs one after another, each taking `latency(plan, job number)` as the client
    sees it, until the first re-plan; the plans handed out and the jobs run."""
    hops = planning._client_hops()
    handed: list[Plan] = []
    for number in range(most):
        plan = await planning.plan_for(MODEL, for_job=True)
        handed.append(plan)
        if planning.observe_job(MODEL, plan, latency(plan, number) - hops):
            return handed, number + 1
    pytest.fail(f"no re-plan in {most} jobs: {[p.strategy for p in handed][-12:]}")


async def test_an_auto_plan_that_measures_slow_is_replanned_with_fitted_costs() -> None:
    replans: list[bool] = []
    planning = Planning("a", SIZE, "auto", on_change=lambda: replans.append(True))
    births = {d: birth(d, s) for d, s in (("a", 1.0), ("b", 1.0), ("c", 0.6))}
    planning.update(births, list(births), 1)
    first = await planning.plan_for(MODEL)
    assert first.strategy.startswith("auto:")
    assert first.predicted_latency_s > 0
    if len(first.devices_used) < 2:
        pytest.skip("auto chose one device here: nothing between devices to fit")

    # Every plan between devices measures three times its prediction.
    def slow(plan: Plan, _: int) -> float:
        return plan.predicted_latency_s * (3 if len(plan.devices_used) > 1 else 1)

    handed, _ = await run_jobs(planning, slow)
    assert replans == [True]
    spread = {plan.plan_id: plan for plan in handed}
    between = [plan for plan in spread.values() if len(plan.devices_used) > 1]
    # The fastest measured plan between devices is the one the costs were fitted to.
    fitted = min(between, key=lambda plan: (slow(plan, 0), plan.strategy.removeprefix("auto:")))
    measured = slow(fitted, 0)

    second = await planning.plan_for(MODEL)
    assert second.plan_id not in spread or len(spread) == 1
    spec = get_spec(MODEL, SIZE)
    network = planning._network(MODEL)
    assert network.gate_round_s > 0 or network.broker_per_message_s > 2e-4
    # With the fitted costs, the fitted plan's replay is what it measured.
    profiles = [
        p for p in (planning_profile(planning, device) for device in births) if p is not None
    ]
    replayed = replay_plan(fitted, spec, profiles, network).latency_s
    assert replayed == pytest.approx(measured, rel=0.02)


def _later(latency: Callable[[Plan, int], float], offset: int, plan: Plan, number: int) -> float:
    return latency(plan, offset + number)


async def settle(
    planning: Planning, latency: Callable[[Plan, int], float], rounds: int = 12
) -> tuple[Plan, list[list[Plan]]]:
    """Jobs until a plan holds for 2 * MEASURED_JOBS jobs without a re-plan: that
    plan, and the plans handed out between re-plans."""
    hops = planning._client_hops()
    handed: list[list[Plan]] = []
    number = 0
    for _ in range(rounds):
        batch, jobs = await run_jobs(planning, functools.partial(_later, latency, number))
        number += jobs
        handed.append(batch)
        plan = await planning.plan_for(MODEL, for_job=True)
        held = True
        for _ in range(2 * MEASURED_JOBS):
            if await planning.plan_for(MODEL, for_job=True) is not plan or planning.observe_job(
                MODEL, plan, latency(plan, number) - hops
            ):
                held = False
                break
            number += 1
        if held:
            return plan, handed
    pytest.fail(f"auto never settled: {[[p.strategy for p in b] for b in handed]}")


async def test_auto_measures_its_candidates_side_by_side_then_keeps_the_fastest() -> None:
    planning = Planning("a", SIZE, "auto")
    births = {d: birth(d, 1.0) for d in ("a", "b")}
    planning.update(births, list(births), 1)

    def as_predicted(plan: Plan, _: int) -> float:  # within its prediction
        return plan.predicted_latency_s * 1.05

    settled, rounds = await settle(planning, as_predicted)
    names = [plan.strategy for plan in rounds[0]]
    rotation = len(set(names))
    assert rotation >= 2, names  # more than the first choice was measured
    # In turn, job by job: never the same candidate twice in a row, each as often.
    assert all(a != b for a, b in itertools.pairwise(names)), names
    assert len(names) == rotation * MEASURED_JOBS
    # Settled on the fastest measured.
    measured = planning._measured_medians(MODEL)
    assert settled.strategy.removeprefix("auto:") == min(measured, key=measured.__getitem__)


async def test_a_machine_that_slows_down_meanwhile_does_not_decide_the_choice() -> None:
    # The machine slows down steadily while auto explores (a shared host getting
    # busy). Measured one after another, the candidates tried first would look
    # fastest; side by side, the one that is really faster (by 30 %) wins, though
    # the best-predicted candidates are measured first and it is not among them.
    planning = Planning("a", SIZE, "auto")
    births = {d: birth(d, 1.0) for d in ("a", "b", "c")}
    planning.update(births, list(births), 1)
    planning._fits[MODEL] = MAX_LATENCY_FITS  # the predictions stay as they are
    first = await planning.plan_for(MODEL)
    faster = "single/1"
    assert first.strategy != f"auto:{faster}"

    def drifting(plan: Plan, number: int) -> float:
        base = 0.07 if plan.strategy == f"auto:{faster}" else 0.1
        return base * (1 + 0.1 * number)

    settled, rounds = await settle(planning, drifting, rounds=60)
    assert settled.strategy == f"auto:{faster}", [[p.strategy for p in r] for r in rounds]


@pytest.mark.parametrize("most", [1, MAX_ROUNDS])
async def test_auto_stops_exploring_after_a_few_rounds(
    monkeypatch: pytest.MonkeyPatch, most: int
) -> None:
    # Plans between devices keep measuring far slower than predicted: every fit moves
    # the predictions and brings up candidates not measured yet (here two rounds'
    # worth). After `most` rounds auto keeps the fastest it measured.
    monkeypatch.setattr("edgedi.agent.planning.MAX_ROUNDS", most)
    planning = Planning("a", SIZE, "auto")
    births = {d: birth(d, s) for d, s in (("a", 1.0), ("b", 1.0), ("c", 0.6), ("d", 0.6))}
    planning.update(births, list(births), 1)

    def far_off(plan: Plan, number: int) -> float:
        between = len(plan.devices_used) > 1
        return plan.predicted_latency_s * (4 + number % 3 if between else 1.1)

    settled, _ = await settle(planning, far_off)
    assert planning._rounds_started[MODEL] == min(most, 2)
    measured = planning._measured_medians(MODEL)
    assert settled.strategy.removeprefix("auto:") == min(measured, key=measured.__getitem__)


def planning_profile(planning: Planning, device: str) -> DeviceProfile | None:
    known = planning._births.get(device)
    return None if known is None else profile_from_birth(known)


async def test_a_replan_that_makes_the_same_plan_again_keeps_its_id() -> None:
    # A fit moves every prediction, and the same candidate may win again: jobs then
    # go on as one plan, and a client sees one plan in force.
    planning = Planning("a", SIZE, "auto")
    births = {d: birth(d, 1.0) for d in ("a", "b")}
    planning.update(births, list(births), 1)
    first = await planning.plan_for(MODEL)
    planning._round_cost[MODEL] = 1e-6  # a fit that changes no choice
    planning._replan_now(MODEL)
    again = await planning.plan_for(MODEL)
    assert again is not first and again.strategy == first.strategy
    assert again.plan_id == first.plan_id
    # Another membership: another plan.
    births["c"] = birth("c", 0.5)
    planning.update(births, list(births), 1)
    other = await planning.plan_for(MODEL)
    assert other.plan_id != first.plan_id


async def test_an_explicit_strategy_takes_over_only_when_clearly_faster() -> None:
    # The demo runs `single` beside auto's plan: a median of five `single` jobs a
    # little below the plan's (noise) must not make auto switch to one device.
    replans: list[bool] = []
    planning = Planning("a", SIZE, "auto", on_change=lambda: replans.append(True))
    births = {d: birth(d, 1.0) for d in ("a", "b")}
    planning.update(births, list(births), 1)
    chosen = await planning.plan_for(MODEL)
    planning._rounds.pop(MODEL, None)  # settled on it, measured at 100 ms
    name = chosen.strategy.removeprefix("auto:")
    assert name != "single/1", "auto chose one device itself: nothing to take over"
    planning._measured[MODEL] = {name: 0.1}
    single = await planning.plan_for(MODEL, "single")
    hops = planning._client_hops()
    for _ in range(MEASURED_JOBS):
        assert not planning.observe_job(MODEL, single, 0.095 - hops)  # 5 % faster: noise
    assert not replans
    for _ in range(MEASURED_JOBS - 1):
        planning.observe_job(MODEL, single, 0.08 - hops)
    assert planning.observe_job(MODEL, single, 0.08 - hops)  # 20 % faster: it takes over
    assert replans == [True]
