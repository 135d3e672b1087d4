"""A discrete-event simulator: plays a plan on a modelled cluster, message by message.

It shares the cost model's *definitions* (`cost.message_parts`, `cost.phase_seconds`)
but none of the planner's shortcuts: tile geometry comes from
`edgedi.models.units.segment_tiles`, and every message, link and CPU is an explicit
first-come-first-served resource in an event queue. The planner's predictions and the
simulator agree exactly where the planner's model is exact (tests), and the simulator
is what the Gantt chart draws.

Resources: each device's uplink, downlink and CPU; with `shared_medium`, one medium
that every transfer holds. Requests are served in the order they are made (ties by
slot), so a link or CPU is FIFO. Segments end with a barrier at their sink.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from edgedi.broker.plan import Part, Plan, Segment
from edgedi.models.units import ModelSpec, Op, Rows, TileGeometry, Unit, segment_tiles
from edgedi.planner.cost import (
    GATE_BYTES_PER_CHANNEL,
    PARTIAL_BYTES_PER_CHANNEL,
    NetworkModel,
    compute_seconds,
    message_parts,
    phase_seconds,
    tail_seconds,
)
from edgedi.planner.errors import InfeasiblePlanError
from edgedi.planner.profiles import DeviceProfile

EventKind = Literal["compute", "send", "receive", "tail"]


@dataclass(frozen=True)
class Event:
    """Something a device did from `start` to `end` (seconds from the job's arrival)."""

    device: str
    kind: EventKind
    start: float
    end: float
    segment: int  # -1: the tail, or a whole image
    label: str


@dataclass(frozen=True)
class Timeline:
    latency_s: float
    events: tuple[Event, ...]
    segment_ends: tuple[float, ...]
    bytes_moved: float
    throughput: float  # images per second
    image_latencies: tuple[float, ...] = ()

    def by_device(self) -> dict[str, list[Event]]:
        grouped: dict[str, list[Event]] = defaultdict(list)
        for event in self.events:
            grouped[event.device].append(event)
        return dict(grouped)


class _Engine:
    """Event queue plus FIFO resources."""

    def __init__(self, profiles: dict[str, DeviceProfile], network: NetworkModel) -> None:
        self.profiles = profiles
        self.network = network
        self.queue: list[tuple[float, int, int, Callable[[float], None]]] = []
        self.counter = itertools.count()
        self.free: dict[tuple[str, str], float] = defaultdict(float)
        self.events: list[Event] = []
        self.bytes_moved = 0.0

    def at(self, time: float, priority: int, action: Callable[[float], None]) -> None:
        heapq.heappush(self.queue, (time, priority, next(self.counter), action))

    def run(self) -> None:
        while self.queue:
            time, _priority, _seq, action = heapq.heappop(self.queue)
            action(time)

    def _hold(self, resources: Sequence[tuple[str, str]], time: float, seconds: float) -> float:
        start = max([time, *(self.free[r] for r in resources)])
        for resource in resources:
            self.free[resource] = start + seconds
        return start

    def compute(
        self,
        time: float,
        device: str,
        seconds: float,
        segment: int,
        label: str,
        priority: int,
        then: Callable[[float], None],
    ) -> None:
        def request(now: float) -> None:
            start = self._hold([(device, "cpu")], now, seconds)
            self.events.append(
                Event(
                    device,
                    "compute" if segment >= 0 else "tail",
                    start,
                    start + seconds,
                    segment,
                    label,
                )
            )
            self.at(start + seconds, priority, then)

        self.at(time, priority, request)

    def send(
        self,
        time: float,
        sender: str,
        receiver: str,
        nbytes: float,
        segment: int,
        label: str,
        priority: int,
        then: Callable[[float], None],
    ) -> None:
        """A message through the broker; `then(arrival)` runs when it has arrived."""
        if sender == receiver:
            self.at(time, priority, then)
            return
        net = self.network
        size = nbytes + net.message_overhead_bytes
        self.bytes_moved += size
        s, r = self.profiles[sender], self.profiles[receiver]
        up, down, medium = (sender, "up"), (receiver, "down"), ("", "medium")
        per_message = net.broker_per_message_s
        broker_bw = net.broker_bandwidth or math.inf

        def record(device: str, kind: EventKind, start: float, end: float) -> None:
            self.events.append(Event(device, kind, start, end, segment, label))

        if not net.store_and_forward or net.shared_medium:
            # One transmission holding both links (and the medium, if shared).
            _pre, hold, post = message_parts(
                size, s.bandwidth, s.latency_s, r.bandwidth, r.latency_s, net, "sender"
            )

            def transmit(now: float) -> None:
                resources = [up, down, medium] if net.shared_medium else [up, down]
                start = self._hold(resources, now, float(hold))
                record(sender, "send", start, start + float(hold))
                record(receiver, "receive", start, start + float(hold))
                self.at(start + float(hold) + float(post), priority, then)

            self.at(time, priority, transmit)
            return
        first = size / min(s.bandwidth, broker_bw)
        second = size / min(r.bandwidth, broker_bw)

        def second_hop(now: float) -> None:
            start = self._hold([down], now, second)
            record(receiver, "receive", start, start + second)
            self.at(start + second + r.latency_s, priority, then)

        def first_hop(now: float) -> None:
            start = self._hold([up], now, first)
            record(sender, "send", start, start + first)
            self.at(start + first + s.latency_s + per_message, priority, second_hop)

        self.at(time, priority, first_hop)


def _transposed_units(units: Sequence[Unit]) -> list[Unit]:
    def flip(op: Op) -> Op:
        return replace(
            op,
            in_height=op.in_width,
            in_width=op.in_height,
            out_height=op.out_width,
            out_width=op.out_height,
        )

    flipped = []
    for unit in units:
        ci, hi, wi = unit.in_shape
        co, ho, wo = unit.out_shape
        flipped.append(
            replace(
                unit,
                in_shape=(ci, wi, hi),
                out_shape=(co, wo, ho),
                main=tuple(flip(op) for op in unit.main),
                shortcut=None if unit.shortcut is None else tuple(flip(op) for op in unit.shortcut),
            )
        )
    return flipped


@dataclass(frozen=True)
class _TileWork:
    phases: tuple[float, ...]
    bytes_in: float
    bytes_out: float
    gate_channels: tuple[int, ...]


def _segment_work(
    spec: ModelSpec, segment: Segment, profiles: dict[str, DeviceProfile]
) -> list[_TileWork]:
    units = spec.spatial_units[segment.first_unit : segment.last_unit + 1]
    parts = list(segment.parts)
    height, width = units[-1].out_shape[1], units[-1].out_shape[2]
    gate_channels = tuple(op.out_channels for u in units for op in u.main if op.kind == "gate")
    grid = any(p.cols is not None and tuple(p.cols) != (0, width) for p in parts)
    works: list[_TileWork] = []
    if not grid:
        ordered = sorted(range(len(parts)), key=lambda k: (parts[k].rows, k))
        geometry: dict[int, TileGeometry] = {}
        # segment_tiles wants a partition in row order; empty parts go anywhere.
        tiles = segment_tiles(units, [Rows(*parts[k].rows) for k in ordered])
        for k, tile in zip(ordered, tiles, strict=True):
            geometry[k] = tile
        for k, part in enumerate(parts):
            tile = geometry[k]
            phases = phase_seconds(profiles[part.device], tile)
            works.append(
                _TileWork(tuple(phases), float(tile.in_bytes), float(tile.out_bytes), gate_channels)
            )
        return works
    if gate_channels:
        raise InfeasiblePlanError("grid tiles cannot take part in a reduction")
    flipped = _transposed_units(units)
    for part in parts:
        cs, ce = part.cols if part.cols is not None else (0, width)
        rs, re = part.rows
        if re <= rs or ce <= cs:
            works.append(_TileWork((0.0,), 0.0, 0.0, ()))
            continue
        row_tile = segment_tiles(units, [Rows(0, rs), Rows(rs, re), Rows(re, height)])[1]
        col_tile = segment_tiles(flipped, [Rows(0, cs), Rows(cs, ce), Rows(ce, width)])[1]
        cols = [len(o.out_rows) for o in col_tile.op_rows]
        seconds = sum(phase_seconds(profiles[part.device], row_tile, cols))
        in_cols = len(col_tile.in_rows)
        bytes_in = len(row_tile.in_rows) * units[0].in_row_bytes * in_cols / units[0].in_shape[2]
        bytes_out = (re - rs) * units[-1].out_row_bytes * (ce - cs) / width
        works.append(_TileWork((seconds,), float(bytes_in), float(bytes_out), ()))
    return works


def simulate(
    plan: Plan,
    spec: ModelSpec,
    devices: Sequence[DeviceProfile],
    network: NetworkModel | None = None,
    *,
    images: int | None = None,
) -> Timeline:
    """Play `plan` for one job (rows mode) or a batch of `images` (images mode)."""
    network = network or NetworkModel()
    profiles = {d.device: d for d in devices}
    missing = [d for d in plan.devices if d not in profiles]
    if missing:
        raise InfeasiblePlanError(f"no profile for devices {', '.join(missing)}")
    if plan.model_digest != spec.digest():
        raise InfeasiblePlanError(f"plan is for model {plan.model}, not {spec.name}")
    if any(segment.channel_split for segment in plan.segments):
        # Channel tiles run only on the direct data plane, which planner.replay prices.
        raise InfeasiblePlanError("channel segments are priced by planner.replay, not simulated")
    engine = _Engine(profiles, network)
    tail_ops = [op for unit in spec.tail_units for op in unit.ops]
    if plan.mode == "images":
        return _simulate_images(plan, spec, engine, tail_ops, images)
    clock = 0.0
    ends: list[float] = []
    for number, segment in enumerate(plan.segments):
        clock = _simulate_segment(engine, spec, plan.leader, number, segment, clock)
        ends.append(clock)
    finished: list[float] = []
    seconds = tail_seconds(profiles[plan.tail_device], tail_ops)
    engine.compute(clock, plan.tail_device, seconds, -1, "tail", 0, finished.append)
    engine.run()
    latency = finished[0]
    return Timeline(
        latency,
        tuple(engine.events),
        tuple(ends),
        engine.bytes_moved,
        1.0 / latency if latency > 0 else math.inf,
    )


def _simulate_segment(
    engine: _Engine, spec: ModelSpec, leader: str, number: int, segment: Segment, start: float
) -> float:
    works = _segment_work(spec, segment, engine.profiles)
    parts: list[Part] = list(segment.parts)
    active = [k for k, part in enumerate(parts) if not part.empty]
    if segment.reductions and len({parts[k].device for k in active}) < len(active):
        raise InfeasiblePlanError("tiles sharing a device cannot take part in a reduction")
    rounds = segment.reductions if len(active) > 1 else 0
    arrived_outputs: list[float] = []
    partials: dict[int, list[float]] = defaultdict(list)

    def phase(k: int, index: int, now: float) -> None:
        work = works[k]
        label = f"s{number} {parts[k].device} rows {parts[k].rows[0]}:{parts[k].rows[1]}"
        engine.compute(
            now,
            parts[k].device,
            work.phases[index] if index < len(work.phases) else 0.0,
            number,
            label,
            k,
            lambda t: phase_done(k, index, t),
        )

    def phase_done(k: int, index: int, now: float) -> None:
        work = works[k]
        last = len(work.phases) - 1
        if index < last and rounds == 0:
            phase(k, index + 1, now)
            return
        if index < last:
            channels = work.gate_channels[index]
            engine.send(
                now,
                parts[k].device,
                leader,
                channels * PARTIAL_BYTES_PER_CHANNEL,
                number,
                f"s{number} partial {index}",
                k,
                lambda t: partial_arrived(k, index, t),
            )
            return
        engine.send(
            now,
            parts[k].device,
            segment.sink,
            work.bytes_out,
            number,
            f"s{number} output",
            k,
            arrived_outputs.append,
        )

    def partial_arrived(k: int, index: int, now: float) -> None:
        partials[index].append(now)
        if len(partials[index]) < len(active):
            return
        channels = works[active[0]].gate_channels[index]
        for j in active:
            engine.send(
                now,
                leader,
                parts[j].device,
                channels * GATE_BYTES_PER_CHANNEL,
                number,
                f"s{number} gate {index}",
                j,
                functools.partial(resume, j, index + 1),
            )

    def resume(k: int, index: int, now: float) -> None:
        phase(k, index, now)

    for k in active:
        engine.send(
            start,
            leader,
            parts[k].device,
            works[k].bytes_in,
            number,
            f"s{number} input",
            k,
            functools.partial(resume, k, 0),
        )
    engine.run()
    if len(arrived_outputs) != len(active):
        raise InfeasiblePlanError(f"segment {number} did not complete in the simulation")
    return max(arrived_outputs, default=start)


def _simulate_images(
    plan: Plan, spec: ModelSpec, engine: _Engine, tail_ops: list[Op], images: int | None
) -> Timeline:
    shares = [s for s in plan.images if s.share > 0]
    if images is None:  # one image per device, all dispatched at once
        quota = [1] * len(shares)
    else:  # largest remainder: images in proportion to the shares
        exact = [images * s.share for s in shares]
        quota = [math.floor(x) for x in exact]
        for i in sorted(range(len(shares)), key=lambda i: exact[i] - quota[i], reverse=True)[
            : images - sum(quota)
        ]:
            quota[i] += 1
    spatial = spec.spatial_units
    full = segment_tiles(spatial, [Rows(0, spatial[-1].out_shape[1])])[0]
    latencies: list[float] = []
    order = [
        i
        for round_ in range(max(quota, default=0))
        for i in range(len(shares))
        if quota[i] > round_
    ]
    for number, i in enumerate(order):
        device = shares[i].device
        profile = engine.profiles[device]
        seconds = compute_seconds(profile, full) + tail_seconds(profile, tail_ops)

        def arrived(
            now: float, device: str = device, seconds: float = seconds, number: int = number
        ) -> None:
            engine.compute(now, device, seconds, -1, f"image {number}", number, latencies.append)

        engine.send(
            0.0, plan.leader, device, float(full.in_bytes), -1, f"image {number}", number, arrived
        )
    engine.run()
    makespan = max(latencies, default=0.0)
    mean = sum(latencies) / len(latencies) if latencies else 0.0
    return Timeline(
        mean,
        tuple(engine.events),
        (),
        engine.bytes_moved,
        len(latencies) / makespan if makespan > 0 else 0.0,
        tuple(latencies),
    )
