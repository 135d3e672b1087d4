"""Measured per-unit costs, the seconds table, the direct-plane replay and `auto`.

Checked against hand-built numbers: the per-unit fit recovers the rates it was
given; a seconds table prices every tile as the sum of its ops at their units'
rates, as the replay does; the replay of a one-device plan is the hops plus the
compute plus the tail; `auto` never picks a plan predicted slower than one device,
picks one device when links are slow, spreads the work when they are fast, and
lets a measurement overrule a prediction.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgedi.models.specs import get_spec
from edgedi.models.units import Rows, channel_splittable, segment_tiles
from edgedi.planner.blocks import block_table, seconds_table
from edgedi.planner.cost import NetworkModel
from edgedi.planner.profiles import DeviceProfile, TimeModel, UnitTimes
from edgedi.planner.replay import replay_plan, tile_phases
from edgedi.planner.strategies import get_strategy
from edgedi.planner.strategies.auto import Candidate, candidates, choose
from edgedi.planner.timing import Fleet
from edgedi.planner.unit_costs import centred_rows, fit_unit_times

MODEL = "vgg16-edgedi"


def unit_times(model: str, speed: float, fixed_s: float = 2e-5) -> UnitTimes:
    """Made-up but plausible per-unit costs: 1 ns per MAC at speed 1."""
    table = block_table(get_spec(model, 200))
    return UnitTimes(
        digest=table.digest,
        units=tuple(
            TimeModel(seconds_per_mac=1e-9 / speed, seconds_fixed=fixed_s / speed)
            for _ in range(table.units)
        ),
        tail_s=1e-3 / speed,
    )


def device(
    name: str, speed: float, *, latency_s: float = 5e-4, bandwidth: float = 1e8, model: str = MODEL
) -> DeviceProfile:
    units = unit_times(model, speed)
    return DeviceProfile(
        device=name,
        time_models={"conv3x3": TimeModel(seconds_per_mac=1e-9 / speed)},
        memory_bytes=2**32,
        bandwidth=bandwidth,
        latency_s=latency_s,
        unit_times={units.digest: units},
    )


class _Sample:
    def __init__(self, unit: int, rows: int, seconds: float) -> None:
        self.unit, self.rows, self.seconds = unit, rows, seconds


def test_the_unit_fit_recovers_rates_and_overheads() -> None:
    spec = get_spec("tiny-edgedi", 48)
    table = block_table(spec)
    samples = []
    for unit in range(table.units):
        block = table.block(unit, unit)
        height = int(table.height[block])
        ops = float(table.count[block].sum())
        for rows in sorted({1, max(1, height // 4), height}):
            start, stop = centred_rows(height, rows)
            macs = sum(table.tile_macs(block, start, stop).values())
            samples.append(_Sample(unit, rows, 3e-9 * (unit + 1) * macs + 1e-4 * ops))
    fitted = fit_unit_times(spec, samples, tail_s=0.002)
    for unit, model in enumerate(fitted.units):
        assert model.seconds_per_mac == pytest.approx(3e-9 * (unit + 1), rel=1e-6)
        assert model.seconds_fixed == pytest.approx(1e-4, rel=1e-6)
    assert fitted.tail_s == 0.002
    assert fitted.digest == table.digest


def test_the_seconds_table_prices_tiles_as_the_replay_does() -> None:
    spec = get_spec(MODEL, 200)
    devices = [device("a", 1.0), device("b", 0.5)]
    digest = block_table(spec).digest
    units = [d.units_for(digest) for d in devices]
    assert all(u is not None for u in units)
    table = seconds_table(
        spec,
        ("a", "b"),
        tuple(tuple(m.seconds_per_mac for m in u.units) for u in units if u is not None),
        tuple(tuple(m.seconds_fixed for m in u.units) for u in units if u is not None),
    )
    fleet = Fleet.build(devices, table, NetworkModel(), 0)
    assert np.allclose(fleet.rate, np.eye(2))
    spatial = spec.spatial_units
    first, last = 2, 9
    height = spatial[last].out_shape[1]
    tiles = segment_tiles(spatial[first : last + 1], [Rows(0, 10), Rows(10, height)])
    block = table.block(first, last)
    gates = int(table.gates[block])
    for index, (start, stop) in enumerate([(0, 10), (10, height)]):
        for d, profile in enumerate(devices):
            expected = sum(tile_phases(profile, digest, tiles[index]))
            priced = sum(
                table.stop_sum[block, q, stop, d]
                - table.start_sum[block, q, start, d]
                + table.fixed[block, q, d]
                for q in range(gates + 1)
            )
            assert priced == pytest.approx(expected, rel=1e-9)


def test_the_replay_of_one_device_is_its_hops_compute_and_tail() -> None:
    spec = get_spec(MODEL, 200)
    leader = device("a", 1.0, latency_s=1e-3, bandwidth=1e7)
    plan = get_strategy("single").plan(spec, [leader], leader="a")
    replay = replay_plan(plan, spec, [leader])
    tile = segment_tiles(spec.spatial_units, [Rows(0, spec.spatial_units[-1].out_shape[1])])[0]
    compute = sum(tile_phases(leader, plan.model_digest, tile))
    image_in = 1e-3 + 200 * 200 / 1e7
    units = leader.units_for(plan.model_digest)
    assert units is not None
    expected = image_in + compute + units.tail_s + 1e-3
    assert replay.latency_s == pytest.approx(expected, rel=1e-9)
    assert replay.steps["tail"] == pytest.approx(units.tail_s)


def test_auto_never_predicts_worse_than_one_device_and_takes_it_on_slow_links() -> None:
    spec = get_spec(MODEL, 200)
    slow_links = [
        device(n, s, latency_s=0.05, bandwidth=1e5)
        for n, s in zip("abcd", (1, 1, 0.6, 0.6), strict=True)
    ]
    found = candidates(spec, slow_links, leader="a")
    best = choose(found)
    single = min(c.predicted_s for c in found if c.name.startswith("single"))
    assert best.predicted_s <= single
    assert len(best.plan.devices_used) == 1  # `single`, or a plan that is single in effect


def test_auto_spreads_a_big_model_over_fast_links() -> None:
    spec = get_spec("vgg16", 200)
    fast = [
        device(n, s, latency_s=2e-4, bandwidth=1e9, model="vgg16")
        for n, s in zip("abcd", (1, 1, 0.6, 0.6), strict=True)
    ]
    best = choose(candidates(spec, fast, leader="a"))
    assert len(best.plan.devices_used) >= 3
    single = get_strategy("single").plan(spec, fast, leader="a")
    assert best.predicted_s < replay_plan(single, spec, fast).latency_s / 2


def test_a_measurement_overrules_a_prediction() -> None:
    spec = get_spec(MODEL, 200)
    plan = get_strategy("single").plan(spec, [device("a", 1.0)], leader="a")
    fast, slow = Candidate("x/4", plan, 0.05), Candidate("y/2", plan, 0.08)
    assert choose([fast, slow]).name == "x/4"
    assert choose([fast, slow], {"x/4": 0.12}).name == "y/2"
    assert choose([fast, slow], {"y/2": 0.04}).name == "y/2"  # measured faster than predicted


def test_a_split_head_moves_the_first_linear_layer_to_the_last_tiles() -> None:
    spec = get_spec("vgg16", 200)
    fleet = [
        device(n, s, latency_s=2e-4, bandwidth=1e9, model="vgg16")
        for n, s in zip("abc", (1, 1, 0.5), strict=True)
    ]
    plan = get_strategy("equal").plan(spec, fleet, leader="a")
    whole = replay_plan(plan, spec, fleet, split_head=False)
    split = replay_plan(plan, spec, fleet)
    ops = spec.units[-1].main
    share = ops[0].macs() / sum(op.macs() for op in ops)
    leader_tail = fleet[0].units_for(plan.model_digest)
    assert leader_tail is not None
    # The leader keeps only the rest of the head; each last tile computes its block.
    assert whole.steps["tail"] == pytest.approx(leader_tail.tail_s)
    assert split.steps["tail"] == pytest.approx(leader_tail.tail_s * (1 - share))
    heads = [e for e in split.events if e.label.endswith("head")]
    last = plan.segments[-1]
    assert {e.device for e in heads} == {p.device for p in last.parts if not p.empty}
    assert not any(e.label.endswith("head") for e in whole.events)


def _channel_plan(found: list[Candidate]) -> Candidate | None:
    split = [c for c in found if any(s.channel_split for s in c.plan.segments)]
    return min(split, key=lambda c: c.predicted_s) if split else None


def test_auto_splits_late_residual_units_by_channels_when_compute_dominates() -> None:
    spec = get_spec("resnet34", 200)
    slow = [device(n, 0.3, model="resnet34", bandwidth=1e9) for n in "abcd"]
    found = candidates(spec, slow, leader="a")
    best = choose(found)
    channel = _channel_plan(found)
    assert channel is not None
    segment = channel.plan.segments[-1]
    assert segment.channel_split and segment.last_unit == len(spec.spatial_units) - 1
    # Channel shares cover the hidden channels once, in part order (checked by the plan).
    assert segment.parts[0].channels is not None and segment.parts[0].channels[0] == 0
    assert sum(p.channels[1] - p.channels[0] for p in segment.parts if p.channels) == (
        spec.units[segment.first_unit].main[0].out_channels
    )
    assert "+channels" in best.name  # compute-bound: the halos of row strips lose
    # One exchange per unit of the channel segment, each partial published once per tile.
    replayed = replay_plan(channel.plan, spec, slow)
    units = segment.last_unit - segment.first_unit + 1
    exchanges = [e for e in replayed.events if "partial" in e.label]
    assert len(exchanges) == units * len(segment.parts)


def test_channel_exchanges_are_priced_by_the_link() -> None:
    spec = get_spec("resnet34", 200)
    fast = [device(n, 3.0, model="resnet34", bandwidth=1e9) for n in "abcd"]
    slow_links = [device(n, 3.0, model="resnet34", bandwidth=2e6) for n in "abcd"]
    channel = _channel_plan(candidates(spec, fast, leader="a"))
    assert channel is not None
    quick = replay_plan(channel.plan, spec, fast).latency_s
    slowed = replay_plan(channel.plan, spec, slow_links).latency_s
    # Each unit moves whole-map partials: on a 2 MB/s link that dwarfs the compute.
    assert slowed > 2 * quick
    assert "+channels" not in choose(candidates(spec, slow_links, leader="a")).name


def test_channel_tiles_are_fitted_and_priced_by_their_own_model() -> None:
    from edgedi.planner.replay import channel_phases
    from edgedi.planner.unit_costs import channel_tile_macs, fit_channel_times

    spec = get_spec("resnet34", 200)
    spatial = spec.spatial_units
    samples = []
    for unit in spatial:
        if not channel_splittable(unit):
            continue
        width = unit.main[0].out_channels
        for count in (width // 4, width // 2):
            macs = channel_tile_macs(unit, count / width)
            samples.append(_ChannelSample(unit.index, count, 2e-10 * macs + 5e-4))
    fitted = fit_channel_times(spec, samples)
    assert fitted[0] is None and fitted[1] is None  # the stem and the pool
    for unit in spatial[2:]:
        model = fitted[unit.index]
        assert model is not None
        assert model.seconds_per_mac == pytest.approx(2e-10, rel=1e-6)
        assert model.seconds_fixed == pytest.approx(5e-4, rel=1e-6)
    # The replay prices a channel tile with that model: one fixed cost per unit.
    base = device("a", 1.0, model="resnet34")
    times = base.units_for(block_table(spec).digest)
    assert times is not None
    measured = base.model_copy(
        update={"unit_times": {times.digest: times.model_copy(update={"channel_units": fitted})}}
    )
    units = spatial[15:]
    phases = channel_phases(measured, times.digest, units, 0.25)
    expected = [2e-10 * channel_tile_macs(u, 0.25) + 5e-4 for u in units]
    assert phases[:-1] == pytest.approx(expected) and phases[-1] == 0.0


class _ChannelSample:
    def __init__(self, unit: int, channels: int, seconds: float) -> None:
        self.unit, self.channels, self.seconds = unit, channels, seconds


def test_a_tile_without_gates_computes_its_interior_while_its_halo_travels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # VGG-16 split over two devices on a slow link: every boundary's halo takes a
    # while, and the worker computes each tile's interior meanwhile.
    spec = get_spec("vgg16", 200)  # the size `device` measures its units at
    devices = [
        device(name, 1.0, latency_s=0.02, bandwidth=1e7, model="vgg16") for name in ("a", "b")
    ]
    plan = get_strategy("equal").plan(spec, devices, leader="a")
    assert len(plan.segments) > 1
    replay = replay_plan(plan, spec, devices)
    interiors = [e for e in replay.events if e.label.endswith("interior")]
    assert interiors
    for event in interiors:
        segment = event.label.split()[0]
        # Begun before the halo from the other device arrived.
        assert any(
            e.label.startswith(f"{segment} rows") and e.end > event.start
            for e in replay.events
            if e.kind == "send"
        ), event
    # Priced as the worker runs it: each tile waiting for all its rows is slower.
    monkeypatch.setattr("edgedi.planner.replay._interior", lambda *_: None)
    waiting = replay_plan(plan, spec, devices)
    assert not [e for e in waiting.events if e.label.endswith("interior")]
    assert replay.latency_s < waiting.latency_s


def test_the_broker_forwards_one_delivery_at_a_time() -> None:
    """A message alone costs its link; deliveries at once queue at the broker."""
    from edgedi.planner.replay import _Links

    size = 173_056.0  # a ResNet-34 channel unit's partial: 256 x 13 x 13 float32
    names = ("a", "b", "c", "d")
    network = NetworkModel(message_overhead_bytes=0, broker_per_message_s=0.0)
    hop = size / 1e8 + 5e-4  # its bytes over the link, plus the latency
    alone = _Links({n: device(n, 1.0) for n in names}, network)
    assert alone.send(0.0, "a", "b", size, "rows") == pytest.approx(hop)

    # Four devices publish a partial at the same moment, each for the three others:
    # twelve deliveries through the broker, at the fastest probed link's rate.
    storm = _Links({n: device(n, 1.0) for n in names}, network)
    arrivals = [
        max(storm.broadcast(0.0, sender, names, size, "partial").values()) for sender in names
    ]
    assert max(arrivals) == pytest.approx(12 * size / 1e8 + 5e-4)

    # Priced out of time order, an earlier message takes the broker's gap before a
    # later one instead of queueing behind it.
    out_of_order = _Links({n: device(n, 1.0) for n in names}, network)
    out_of_order.send(1.0, "a", "b", size, "later")
    assert out_of_order.send(0.0, "c", "d", size, "earlier") == pytest.approx(hop)
    assert out_of_order.send(1.0, "c", "d", size, "with the later") == pytest.approx(
        1.0 + 2 * size / 1e8 + 5e-4
    )
