"""The simulator replays plans message by message; the planner's predictions agree.

The planner prices plans with vectorised formulas (`edgedi.planner.timing`), the
simulator with an event queue and the reference geometry of `segment_tiles`: two
implementations of one cost model. They must give the same latency.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_planner_fixtures import (
    profile,
    random_cluster,
    random_network,
    random_spec,
    small_compact,
    small_vgg,
)

from edgedi.models.specs import get_spec
from edgedi.planner.cluster import synthetic_cluster
from edgedi.planner.cost import NetworkModel, transfer_seconds
from edgedi.planner.errors import InfeasiblePlanError
from edgedi.planner.simulator import simulate
from edgedi.planner.strategies import get_strategy, strategy_names


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 100_000), units=st.integers(1, 7), devices=st.integers(1, 5))
def test_predictions_equal_simulation(seed: int, units: int, devices: int) -> None:
    rng = random.Random(seed)
    spec = random_spec(rng, units)
    cluster = random_cluster(rng, devices)
    network = random_network(rng)
    leader = rng.choice(cluster).device
    tail_on_leader = rng.random() < 0.3
    # The simulator plays the leader-relayed runtime the strategies' cost model prices;
    # `auto` (and `channels`, its pick with a channel segment) predict the direct data
    # plane with its replay (test_planner_replay.py).
    for name in (name for name in strategy_names() if name not in ("auto", "channels")):
        plan = get_strategy(name).plan(
            spec, cluster, leader=leader, network=network, tail_on_leader=tail_on_leader
        )
        timeline = simulate(plan, spec, cluster, network)
        assert timeline.latency_s == pytest.approx(plan.predicted_latency_s, rel=1e-9), name
        if plan.mode == "rows":
            assert timeline.bytes_moved == pytest.approx(
                plan.predicted_bytes, abs=len(plan.segments) * devices * 4 + 1
            )
            ends = [0.0]
            for segment in plan.segments:
                ends.append(ends[-1] + segment.predicted.total_s)
            assert list(timeline.segment_ends) == pytest.approx(ends[1:], rel=1e-9, abs=1e-12)


def test_one_tile_by_hand() -> None:
    """Leader sends the whole input to a faster device, which computes and returns it."""
    spec = small_vgg(16)
    leader = profile("leader", speed=0.01, bandwidth=1e6, latency=1e-3)
    worker = profile("worker", speed=1.0, bandwidth=1e6, latency=1e-3)
    network = NetworkModel(broker_per_message_s=0.0)
    plan = get_strategy("single").plan(spec, [leader, worker], network=network)
    assert plan.tail_device == "worker" and plan.segments[0].parts[0].device == "worker"
    timeline = simulate(plan, spec, [leader, worker], network)
    spatial = spec.spatial_units
    in_bytes = spatial[0].in_bytes
    from edgedi.models.units import Rows, segment_tiles
    from edgedi.planner.cost import compute_seconds, tail_seconds

    tile = segment_tiles(spatial, [Rows(0, spatial[-1].out_shape[1])])[0]
    expected = (
        transfer_seconds(in_bytes, leader, worker, network)
        + compute_seconds(worker, tile)
        + tail_seconds(worker, [op for unit in spec.tail_units for op in unit.ops])
    )
    assert timeline.latency_s == pytest.approx(expected, rel=1e-12)


def test_timeline_never_overlaps_a_resource() -> None:
    spec = small_compact(32)
    rng = random.Random(7)
    cluster = random_cluster(rng, 4)
    network = NetworkModel(shared_medium=True)
    plan = get_strategy("edgedi").plan(spec, cluster, network=network)
    timeline = simulate(plan, spec, cluster, network)
    busy: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for event in timeline.events:
        assert event.end >= event.start >= 0
        resource = "cpu" if event.kind in ("compute", "tail") else "air"
        key = (event.device if resource == "cpu" else "", resource)
        if resource == "air" and event.kind == "receive":
            continue  # a transmission is one send and one receive of the same slot
        busy[key].append((event.start, event.end))
    for spans in busy.values():
        spans.sort()
        for (_s0, e0), (s1, _e1) in itertools.pairwise(spans):
            assert s1 >= e0 - 1e-12
    assert {e.kind for e in timeline.events} >= {"compute", "send", "receive", "tail"}


def test_images_mode_dispatches_one_image_per_device() -> None:
    spec = small_vgg(32)
    cluster = random_cluster(random.Random(3), 3)
    plan = get_strategy("images").plan(spec, cluster)
    timeline = simulate(plan, spec, cluster)
    assert len(timeline.image_latencies) == 3
    assert timeline.latency_s == pytest.approx(plan.predicted_latency_s, rel=1e-9)
    batch = simulate(plan, spec, cluster, images=12)
    assert len(batch.image_latencies) == 12 and batch.throughput > 0


def test_grid_plans_simulate_like_they_were_priced() -> None:
    spec = get_spec("tiny", 48)
    cluster = random_cluster(random.Random(11), 4)
    plan = get_strategy("deepthings", max_grid=3).plan(spec, cluster)
    timeline = simulate(plan, spec, cluster)
    assert timeline.latency_s == pytest.approx(plan.predicted_latency_s, rel=1e-9)


def test_simulator_refuses_foreign_plans() -> None:
    spec = small_vgg(16)
    cluster = random_cluster(random.Random(1), 2)
    plan = get_strategy("equal").plan(spec, cluster)
    with pytest.raises(InfeasiblePlanError):
        simulate(plan, small_compact(16), cluster)
    with pytest.raises(InfeasiblePlanError):
        simulate(plan, spec, cluster[:1])


def test_simulating_512_devices_is_fast() -> None:
    cluster = synthetic_cluster(512)
    spec = get_spec("resnet18", 64)
    plan = get_strategy("equal").plan(spec, cluster.devices, network=cluster.network)
    started = time.perf_counter()
    timeline = simulate(plan, spec, cluster.devices, cluster.network)
    assert time.perf_counter() - started < 10.0
    assert timeline.latency_s == pytest.approx(plan.predicted_latency_s, rel=1e-9)
