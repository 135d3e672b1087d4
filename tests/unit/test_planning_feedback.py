"""The leader's planning learns from measured jobs: auto plans, fitted message costs.

Births carry measured per-unit tile costs (`unit_profiles`) as agents announce
them; `Planning` makes `auto` plans from them. When the plan in force measures far
slower than it predicted, the next plan is made with the cost of a gate round (or a
message) fitted so that the measured plan's replay matches what it measured, and
the plan that disappointed is bounded by its measurement in the next choice.
"""

from __future__ import annotations

import pytest

from edgedi.agent.planning import MEASURED_JOBS, Planning, profile_from_birth
from edgedi.broker.messages import DeviceBirth, DeviceCapabilities, LinkEstimate, UnitProfile
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

    measured = first.predicted_latency_s * 3
    hops = planning._client_hops()
    results = [planning.observe_job(MODEL, first, measured - hops) for _ in range(MEASURED_JOBS)]
    assert results == [False] * (MEASURED_JOBS - 1) + [True]
    assert replans == [True]

    second = await planning.plan_for(MODEL)
    assert second.plan_id != first.plan_id
    spec = get_spec(MODEL, SIZE)
    network = planning._network(MODEL)
    assert network.gate_round_s > 0 or network.broker_per_message_s > 2e-4
    # With the fitted costs, the measured plan's replay is what it measured.
    profiles = [
        p for p in (planning_profile(planning, device) for device in births) if p is not None
    ]
    replayed = replay_plan(first, spec, profiles, network).latency_s
    assert replayed == pytest.approx(measured, rel=0.02)
    # And whatever is chosen now is predicted no slower than that measurement.
    assert second.predicted_latency_s <= measured * 1.001


async def test_auto_measures_its_best_candidates_then_keeps_the_fastest() -> None:
    planning = Planning("a", SIZE, "auto")
    births = {d: birth(d, 1.0) for d in ("a", "b")}
    planning.update(births, list(births), 1)
    hops = planning._client_hops()
    tried: list[str] = []
    plan = await planning.plan_for(MODEL)
    for _ in range(6):  # within its prediction: only exploration moves it on
        tried.append(plan.strategy)
        replanned = [
            planning.observe_job(MODEL, plan, plan.predicted_latency_s * 1.05 - hops)
            for _ in range(MEASURED_JOBS)
        ]
        if not any(replanned):
            break
        plan = await planning.plan_for(MODEL)
    else:
        pytest.fail(f"auto never settled: {tried}")
    assert len(set(tried)) >= 2  # it measured more than the first choice
    assert any(len(p) for p in tried)
    # Settled on the fastest measured, and stays there while it holds its prediction.
    measured = planning._measured_medians(MODEL)
    assert plan.strategy.removeprefix("auto:") == min(measured, key=measured.__getitem__)
    for _ in range(2 * MEASURED_JOBS):
        assert not planning.observe_job(MODEL, plan, plan.predicted_latency_s * 1.05 - hops)
    assert await planning.plan_for(MODEL) is plan


def planning_profile(planning: Planning, device: str) -> DeviceProfile | None:
    known = planning._births.get(device)
    return None if known is None else profile_from_birth(known)
