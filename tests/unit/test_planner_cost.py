"""The cost model: message timing, and the vectorised tables against the reference.

`edgedi.planner.blocks` claims that every tile's rows, MACs and bytes are lookups in
separable tables; here they are compared with `edgedi.models.units.segment_tiles`
and `edgedi.planner.cost` on random models (gates, residuals, strides) and the zoo.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_planner_fixtures import profile, random_cluster, random_network, random_spec

from edgedi.models.specs import MODEL_NAMES, get_spec
from edgedi.models.units import ModelSpec, Rows, segment_tiles, split_rows
from edgedi.planner.blocks import block_table
from edgedi.planner.cost import (
    NetworkModel,
    compute_seconds,
    message_timing,
    phase_seconds,
    reduction_round_seconds,
    transfer_seconds,
)
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.timing import evaluate_rows, single_device_costs


def test_pipelined_transfer_pays_both_latencies_and_the_slower_link() -> None:
    network = NetworkModel(broker_per_message_s=1e-3, message_overhead_bytes=0)
    timing = message_timing(1e6, (1e7, 2e-3), (1e8, 3e-3), network, "sender")
    assert timing.total == pytest.approx(2e-3 + 3e-3 + 1e-3 + 1e6 / 1e7)
    a, b = profile("a", bandwidth=1e7, latency=2e-3), profile("b", bandwidth=1e8, latency=3e-3)
    assert transfer_seconds(1e6, a, b, network) == pytest.approx(timing.total)
    assert transfer_seconds(1e6, a, a, network) == 0.0


def test_store_and_forward_pays_each_link_in_turn() -> None:
    network = NetworkModel(
        broker_per_message_s=1e-3, store_and_forward=True, message_overhead_bytes=0
    )
    sender = message_timing(1e6, (1e7, 2e-3), (1e8, 3e-3), network, "sender")
    receiver = message_timing(1e6, (1e7, 2e-3), (1e8, 3e-3), network, "receiver")
    total = 1e6 / 1e7 + 1e6 / 1e8 + 6e-3
    assert sender.total == pytest.approx(total) and receiver.total == pytest.approx(total)
    assert sender.hold == pytest.approx(0.1) and receiver.hold == pytest.approx(0.01)
    shared = message_timing(
        1e6, (1e7, 2e-3), (1e8, 3e-3), network.model_copy(update={"shared_medium": True}), "sender"
    )
    assert shared.hold == pytest.approx(0.11) and shared.total == pytest.approx(total)


def test_broker_bandwidth_and_envelope_count() -> None:
    network = NetworkModel(
        broker_per_message_s=0.0, broker_bandwidth=1e6, message_overhead_bytes=1000
    )
    timing = message_timing(9000, (1e9, 0.0), (1e9, 0.0), network, "sender")
    assert timing.total == pytest.approx(10_000 / 1e6)
    a, b = profile("a", latency=0.0), profile("b", latency=0.0)
    round_trip = reduction_round_seconds(a, b, 100, network)
    assert round_trip == pytest.approx((800 + 1000) / 1e6 + (400 + 1000) / 1e6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), units=st.integers(1, 8))
def test_tables_match_segment_tiles(seed: int, units: int) -> None:
    rng = random.Random(seed)
    spec = random_spec(rng, units)
    table = block_table(spec)
    spatial = spec.spatial_units
    first = rng.randrange(len(spatial))
    last = rng.randrange(first, len(spatial))
    height = spatial[last].out_shape[1]
    parts = split_rows(
        height,
        [rng.choice([0.0, 0.5, 1.0, 2.0, 3.0]) or 0.0 for _ in range(5)]
        if rng.random() < 0.2
        else [rng.uniform(0.2, 3) for _ in range(5)],
    )
    tiles = segment_tiles(spatial[first : last + 1], parts)
    block = table.block(first, last)
    for part, tile in zip(parts, tiles, strict=True):
        assert table.tile_macs(block, part.start, part.stop) == tile.macs_by_cost_class()
        if not part.empty:
            assert table.in_start[block, part.start] == tile.in_rows.start
            assert table.in_stop[block, part.stop] == tile.in_rows.stop


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tables_match_segment_tiles_on_the_zoo(name: str) -> None:
    spec = get_spec(name, 64)
    table = block_table(spec)
    spatial = spec.spatial_units
    rng = random.Random(name)
    for _ in range(10):
        first = rng.randrange(len(spatial))
        last = rng.randrange(first, len(spatial))
        parts = split_rows(spatial[last].out_shape[1], [rng.uniform(0.1, 2) for _ in range(3)])
        tiles = segment_tiles(spatial[first : last + 1], parts)
        for part, tile in zip(parts, tiles, strict=True):
            assert table.tile_macs(table.block(first, last), part.start, part.stop) == (
                tile.macs_by_cost_class()
            )


def _problem(seed: int, units: int, devices: int) -> tuple[ModelSpec, PlanningProblem]:
    rng = random.Random(seed)
    spec = random_spec(rng, units)
    return spec, PlanningProblem(spec, random_cluster(rng, devices), random_network(rng))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), units=st.integers(1, 6), devices=st.integers(1, 5))
def test_vectorised_compute_equals_the_reference(seed: int, units: int, devices: int) -> None:
    spec, problem = _problem(seed, units, devices)
    rng = random.Random(seed + 1)
    spatial = spec.spatial_units
    first = rng.randrange(len(spatial))
    last = rng.randrange(first, len(spatial))
    parts = split_rows(spatial[last].out_shape[1], [rng.uniform(0, 2) for _ in range(devices)])
    order = list(range(devices))
    rng.shuffle(order)
    timing = evaluate_rows(
        problem.table,
        problem.fleet,
        np.array([problem.table.block(first, last)]),
        np.array([order]),
        np.array([[p.start for p in parts]]),
        np.array([[p.stop for p in parts]]),
        np.array([problem.leader]),
    )
    tiles = segment_tiles(spatial[first : last + 1], parts)
    for k, tile in enumerate(tiles):
        device = problem.devices[order[k]]
        assert timing.compute[0, k] == pytest.approx(compute_seconds(device, tile), rel=1e-9)
        assert sum(phase_seconds(device, tile)) == pytest.approx(timing.compute[0, k], rel=1e-9)
        assert timing.bytes_in[0, k] == tile.in_bytes
        assert timing.bytes_out[0, k] == tile.out_bytes


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), units=st.integers(1, 6), devices=st.integers(1, 5))
def test_single_device_costs_equal_one_slot_partitions(seed: int, units: int, devices: int) -> None:
    _spec, problem = _problem(seed, units, devices)
    table = problem.table
    blocks = np.arange(len(table.first))
    for sink_is_device in (False, True):
        costs = single_device_costs(
            table,
            problem.fleet,
            blocks,
            None if sink_is_device else np.full(len(blocks), problem.leader),
        )
        for device in range(devices):
            sinks = np.full(len(blocks), device if sink_is_device else problem.leader)
            timing = evaluate_rows(
                table,
                problem.fleet,
                blocks,
                np.full((len(blocks), 1), device),
                np.zeros((len(blocks), 1), dtype=np.int64),
                table.height[blocks][:, None],
                sinks,
            )
            np.testing.assert_allclose(costs[:, device], timing.makespan, rtol=1e-12)


def test_tile_rows_example_by_hand() -> None:
    """A 3x3 conv (padding 1) then a 2x2 pool: the first half of the pool's rows."""
    from test_planner_fixtures import Builder

    spec = Builder(1, 8).conv(2).pool().build()
    table = block_table(spec)
    block = table.block(0, 1)
    # Pool rows [0, 2) need conv rows [0, 4), which need input rows [0, 5).
    assert (table.in_start[block, 0], table.in_stop[block, 2]) == (0, 5)
    tile = segment_tiles(spec.spatial_units, [Rows(0, 2), Rows(2, 4)])[0]
    assert tile.in_rows == Rows(0, 5)
