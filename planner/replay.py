"""Replay a plan as the direct data plane runs it: the latency a client will measure.

The strategies search with fast, vectorised cost models; this module prices one
finished plan step by step, the way `edgedi.agent.direct` and the worker execute
it, with the costs each device measured on itself:

1. the image reaches the leader (one hop);
2. the leader sends the first segment's tiles, remote ones first, one after another
   on its own link;
3. every device computes its tiles phase by phase on its one compute thread; at an
   attention gate (or a channel tile's exchange) each tile publishes its partial
   sums once, the broker fans them out to the segment's other devices, and a
   device goes on once every partial has reached it;
4. at a segment's end each tile sends the rows each next-segment tile needs straight
   to that tile's device (rows kept on the same device cost nothing); a tile without
   gates computes its interior from the rows its own device made while its halo is
   on the way, and its edges once the halo is in (`edgedi.models.interior`);
5. the last segment's tiles send their output to the leader, which runs the tail;
   when the head starts with a linear layer on the whole map (VGG-16), each last
   tile first applies its block of that layer and sends the partial sums instead
   (`edgedi.models.head_split`), and the leader runs only the rest of the head;
6. the result reaches the client (one hop).

Compute comes from the per-unit tile costs (`DeviceProfile.unit_times`, measured
with real tiles) or, for devices without them, the per-class micro-benchmark model.
A message from device `a` to `b` costs `(latency_a + latency_b) / 2` plus its bytes
over the slower of the two links, and holds the sender's link while it is sent;
`latency` is what a device measured for one message through the broker.

Pure: no I/O, no torch.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edgedi.broker.plan import Plan
from edgedi.models.interior import interior_to_compute, part_geometry
from edgedi.models.units import (
    BYTES_PER_ELEMENT,
    ModelSpec,
    Rows,
    TileGeometry,
    Unit,
    segment_tiles,
    splittable_head,
)
from edgedi.planner.cost import (
    PARTIAL_BYTES_PER_CHANNEL,
    NetworkModel,
    op_macs,
    op_seconds,
    phase_seconds,
)
from edgedi.planner.errors import InfeasiblePlanError
from edgedi.planner.profiles import DeviceProfile, UnitTimes
from edgedi.planner.unit_costs import channel_tile_macs

__all__ = ["Replay", "ReplayEvent", "replay_plan", "supports_replay", "tile_phases"]

# What a client's image and a result add to the leader's message latency.
_IMAGE_BYTES_PER_PIXEL = 1  # the demo and `edgedi infer` send uint8 images


@dataclass(frozen=True)
class ReplayEvent:
    """One step of the replayed job on one device (for Gantt charts)."""

    device: str
    kind: str  # "compute", "send", "tail"
    label: str
    start: float
    end: float


@dataclass(frozen=True)
class Replay:
    """The replayed job: latency as the client sees it, and where the time went."""

    latency_s: float
    steps: dict[str, float]
    """scatter (image in + first tiles out), compute (segments, gates and boundaries
    included), tail and result (back to the client)."""
    events: tuple[ReplayEvent, ...] = field(repr=False)
    bytes_moved: float = 0.0
    """Bytes that left a device (a broadcast counted once per receiver)."""


def supports_replay(plan: Plan) -> bool:
    """Row strips only: the direct data plane's plans (grids are relayed)."""
    if plan.mode != "rows":
        return False
    return all(
        part.cols is None or tuple(part.cols) == (0, segment.out_width)
        for segment in plan.segments
        for part in segment.parts
    )


def tile_phases(profile: DeviceProfile, digest: str, geometry: TileGeometry) -> list[float]:
    """Seconds per phase (split at attention gates) of a tile on `profile`'s device."""
    units = profile.units_for(digest)
    if units is None:
        return phase_seconds(profile, geometry)
    phases = [0.0]
    for unit_rows in geometry.units:
        model = units.units[unit_rows.unit.index]
        for item in (*unit_rows.main, *(unit_rows.shortcut or ())):
            if not geometry.empty:
                phases[-1] += model.seconds(op_macs(item.op, len(item.out_rows)))
            if item.op.kind == "gate":
                phases.append(0.0)
    return phases


def channel_phases(
    profile: DeviceProfile, digest: str, units: Sequence[Unit], share: float
) -> list[float]:
    """Seconds per phase of a channel tile (`edgedi.models.channel_split`) computing
    the fraction `share` of the hidden channels: one phase per unit, each ending in
    an exchange, and a last (nearly free) one that finishes the last unit.

    Each unit's two convolutions cost `share` of their whole-map work; its shortcut
    runs whole on every tile. Priced by the device's measured channel tiles where it
    has them (`UnitTimes.channel_units`), else as row tiles' ops are.
    """
    measured = profile.units_for(digest)
    channel = measured.channel_units if measured is not None else ()
    phases = []
    for unit in units:
        model = channel[unit.index] if unit.index < len(channel) else None
        if model is not None:
            phases.append(model.seconds(channel_tile_macs(unit, share)) if share > 0 else 0.0)
            continue
        seconds = 0.0
        for position, op in enumerate((*unit.main, *(unit.shortcut or ()))):
            fraction = share if position < len(unit.main) else 1.0
            if fraction <= 0.0:
                continue
            macs = op_macs(op, op.out_height) * fraction
            if measured is not None:
                seconds += measured.units[unit.index].seconds(macs)
            else:
                seconds += op_seconds(profile, op, op.out_height) * fraction
        phases.append(seconds)
    phases.append(0.0)
    return phases


def channel_partial_bytes(unit: Unit) -> float:
    """One channel tile's partial of `unit`: its second convolution's whole output."""
    op = unit.main[1]
    return float(op.out_channels * op.out_height * op.out_width * BYTES_PER_ELEMENT)


class _Links:
    """Each device's link: messages leave one after another; hops add latencies.

    The broker forwards one delivery at a time, at `network.broker_bandwidth` or else
    the fastest link any device probed through it (a stream through the broker never
    measured faster than the broker forwards). A message alone is not slowed by it,
    its transfer overlaps the sender's link; deliveries at once queue: four devices
    exchanging a channel unit's 173 KB partials make twelve deliveries, which a replay
    with only the devices' links priced as if they all went in parallel. On a shaped
    LAN the broker's own link is that queue.
    """

    def __init__(self, profiles: dict[str, DeviceProfile], network: NetworkModel) -> None:
        self.profiles = profiles
        self.network = network
        self.free: dict[str, float] = defaultdict(float)
        self.events: list[ReplayEvent] = []
        self.bytes_moved = 0.0
        self.broker_rate = network.broker_bandwidth or max(
            (p.bandwidth for p in profiles.values()), default=float("inf")
        )
        # The broker's busy intervals, sorted and disjoint. The replay does not price
        # messages in time order (device by device, tile by tile), so a delivery takes
        # the first gap from its arrival on that is long enough, not the queue's end.
        self.broker_busy: list[tuple[float, float]] = []

    def _forwarded(self, start: float, size: float) -> float:
        """When the broker is done forwarding one delivery of `size` bytes that reaches
        it at `start`."""
        length = size / self.broker_rate
        busy = self.broker_busy
        index = bisect.bisect_left(busy, (start, start))
        begin = start
        if index > 0:
            begin = max(begin, busy[index - 1][1])
        while index < len(busy) and busy[index][0] < begin + length:
            begin = max(begin, busy[index][1])
            index += 1
        busy.insert(index, (begin, begin + length))
        return begin + length

    def send(self, now: float, sender: str, receiver: str, size: float, label: str) -> float:
        """When a message of `size` bytes sent at `now` reaches `receiver`."""
        if sender == receiver:
            return now
        a, b = self.profiles[sender], self.profiles[receiver]
        self.bytes_moved += size
        size += self.network.message_overhead_bytes
        start = max(now, self.free[sender])
        hold = size / min(a.bandwidth, b.bandwidth)
        self.free[sender] = start + hold
        arrival = max(start + hold, self._forwarded(start, size))
        arrival += (a.latency_s + b.latency_s) / 2 + self.network.broker_per_message_s
        self.events.append(ReplayEvent(sender, "send", f"{label} → {receiver}", start, arrival))
        return arrival

    def broadcast(
        self, now: float, sender: str, receivers: Sequence[str], size: float, label: str
    ) -> dict[str, float]:
        """When one message published once (the broker fans it out) reaches each receiver.

        The sender's link carries it once; each remote receiver's own link then the bytes.
        """
        arrivals = {receiver: now for receiver in receivers if receiver == sender}
        remote = [receiver for receiver in receivers if receiver != sender]
        if not remote:
            return arrivals
        a = self.profiles[sender]
        self.bytes_moved += size * len(remote)
        size += self.network.message_overhead_bytes
        start = max(now, self.free[sender])
        self.free[sender] = start + size / a.bandwidth
        for receiver in remote:
            b = self.profiles[receiver]
            hold = size / min(a.bandwidth, b.bandwidth)
            arrival = max(start + hold, self._forwarded(start, size))
            arrival += (a.latency_s + b.latency_s) / 2
            arrivals[receiver] = arrival + self.network.broker_per_message_s
        end = max(arrivals.values())
        self.events.append(ReplayEvent(sender, "send", f"{label} → {len(remote)}", start, end))
        return arrivals


def _interior(
    units: Sequence[Unit], tile: TileGeometry, made: Rows, measured: UnitTimes | None
) -> Rows | None:
    """The output rows of `tile` computable from input rows `made` alone, as the
    worker computes them ahead when its measured costs say that splitting pays
    (None: the tile runs whole)."""
    if tile.empty or made.empty or measured is None:
        return None
    received = np.zeros(len(tile.in_rows), dtype=np.bool_)
    start = tile.in_rows.start
    received[max(0, made.start - start) : max(0, made.stop - start)] = True
    costs = [(m.seconds_per_mac, m.seconds_fixed) for m in measured.units]
    return interior_to_compute(tuple(units), tile, received, costs)


def replay_plan(
    plan: Plan,
    spec: ModelSpec,
    devices: Sequence[DeviceProfile],
    network: NetworkModel | None = None,
    *,
    split_head: bool = True,
) -> Replay:
    """The client-side latency of one job run with `plan` on the direct data plane.

    `split_head` as the runtime's `jobs.split_head` (on by default there too).
    """
    network = network or NetworkModel()
    if not supports_replay(plan):
        raise InfeasiblePlanError("only row-strip plans run on the direct data plane")
    profiles = {d.device: d for d in devices}
    missing = sorted(set(plan.devices_used) - set(profiles))
    if missing:
        raise InfeasiblePlanError(f"no profile for devices {', '.join(missing)}")
    digest = plan.model_digest
    leader = plan.leader
    links = _Links(profiles, network)
    cpu: dict[str, float] = defaultdict(float)
    events: list[ReplayEvent] = []

    def compute(device: str, ready: float, seconds: float, label: str) -> float:
        start = max(ready, cpu[device])
        cpu[device] = start + seconds
        events.append(ReplayEvent(device, "compute", label, start, start + seconds))
        return start + seconds

    def tail_of(device: str) -> float:
        """The whole tail on `device`: measured there, else the plan's (the leader's)."""
        measured = profiles[device].units_for(digest)
        return measured.tail_s if measured is not None else plan.tail_s

    head = splittable_head(spec) if split_head else None
    head_share, head_bytes = 0.0, 0.0
    if head is not None:
        ops = spec.units[head].main
        head_share = ops[0].macs() / max(1, sum(op.macs() for op in ops))
        head_bytes = float(ops[0].out_channels * 4)  # a float32 vector of partial sums

    lead = profiles[leader]
    height, width = spec.input_shape[1], spec.input_shape[2]
    arrived = lead.latency_s + height * width * _IMAGE_BYTES_PER_PIXEL / lead.bandwidth
    cpu[leader] = arrived

    spatial = spec.spatial_units
    geometries = []
    shares: list[list[float] | None] = []
    for segment in plan.segments:
        units = spatial[segment.first_unit : segment.last_unit + 1]
        parts = sorted((p for p in segment.parts if not p.empty), key=lambda p: p.rows)
        strips = segment_tiles(units, [Rows(*p.rows) for p in parts])
        if segment.channel_split:
            # Channel tiles read the whole input map; their rows are what they send on.
            whole = segment_tiles(units, [Rows(0, segment.out_height)])[0]
            strips = [TileGeometry(whole.in_rows, strip.out_rows, whole.units) for strip in strips]
            hidden = units[0].main[0].out_channels
            shares.append([len(Rows(*(p.channels or (0, 0)))) / hidden for p in parts])
        else:
            shares.append(None)
        geometries.append([(p.device, strip) for p, strip in zip(parts, strips, strict=True)])

    # The first segment's tiles, remote ones first, from the leader's link.
    ready: dict[int, float] = {}
    first = geometries[0]
    order = sorted(range(len(first)), key=lambda k: first[k][0] == leader)
    for k in order:
        device, tile = first[k]
        ready[k] = links.send(arrived, leader, device, float(tile.in_bytes), f"s0 tile {k}")
    scatter = max(ready.values())

    outputs: list[float] = []
    own: dict[int, tuple[float, Rows]] = {}  # the first segment's input all comes at once
    for number, (segment, tiles) in enumerate(zip(plan.segments, geometries, strict=True)):
        units = spatial[segment.first_unit : segment.last_unit + 1]
        fractions = shares[number]
        if fractions is None:
            phases = [tile_phases(profiles[d], digest, tile) for d, tile in tiles]
        else:
            phases = [
                channel_phases(profiles[d], digest, units, fraction)
                for (d, _), fraction in zip(tiles, fractions, strict=True)
            ]
        for (device, tile), tile_phase in zip(tiles, phases, strict=True):
            # The worker converts the tile's input before and its output after.
            measured = profiles[device].units_for(digest)
            per_byte = measured.copy_s_per_byte if measured is not None else 0.0
            tile_phase[0] += per_byte * tile.in_bytes
            tile_phase[-1] += per_byte * tile.out_bytes
        count = len(tiles)
        rounds = max(len(p) for p in phases) - 1
        finish = dict(ready)
        priced_ahead = rounds == 0 and fractions is None and bool(own)
        if priced_ahead:
            # Interiors first, from the rows each device made itself, then the rest
            # of each tile once all its rows are in.
            rest = [p[0] for p in phases]
            ahead: dict[int, float] = {}
            for k in sorted(own, key=lambda k: own[k][0]):
                device, tile = tiles[k]
                interior = _interior(units, tile, own[k][1], profiles[device].units_for(digest))
                if interior is None:
                    continue
                seconds = tile_phases(profiles[device], digest, part_geometry(units, interior))[0]
                ahead[k] = compute(device, own[k][0], seconds, f"s{number} tile {k} interior")
                whole_s = tile_phases(profiles[device], digest, tile)[0]
                edges_s = sum(
                    tile_phases(profiles[device], digest, part_geometry(units, part))[0]
                    for part in (
                        Rows(tile.out_rows.start, interior.start),
                        Rows(interior.stop, tile.out_rows.stop),
                    )
                    if not part.empty
                )
                rest[k] += edges_s - whole_s
            for k in sorted(range(count), key=lambda k: finish[k]):
                start = max(finish[k], ahead.get(k, 0.0))
                finish[k] = compute(tiles[k][0], start, rest[k], f"s{number} tile {k} p0")
        for phase in range(0 if priced_ahead else rounds + 1):  # else: priced above
            for k in sorted(range(count), key=lambda k: finish[k]):
                device = tiles[k][0]
                seconds = phases[k][phase] if phase < len(phases[k]) else 0.0
                finish[k] = compute(device, finish[k], seconds, f"s{number} tile {k} p{phase}")
            if phase == rounds or count == 1:
                continue
            if fractions is not None:
                size = channel_partial_bytes(units[phase])
            else:
                gate = [op for unit in units for op in unit.main if op.kind == "gate"][phase]
                size = gate.out_channels * PARTIAL_BYTES_PER_CHANNEL
            holders = sorted({d for d, _ in tiles})
            at = dict.fromkeys(holders, 0.0)
            inbox: dict[str, list[float]] = {d: [] for d in holders}
            for k in range(count):  # each partial is published once (devices/<id>/partials)
                arrivals = links.broadcast(
                    finish[k], tiles[k][0], holders, size, f"s{number} partial {phase}"
                )
                for device, arrival in arrivals.items():
                    at[device] = max(at[device], arrival)
                    if device != tiles[k][0]:
                        inbox[device].append(arrival)
            if fractions is not None:
                # A channel tile's partial is a whole map: each holder decodes, checks
                # and adds every other one, one after another.
                for device in holders:
                    measured = profiles[device].units_for(digest)
                    per_partial = size * (measured.copy_s_per_byte if measured else 0.0)
                    free = 0.0
                    for arrival in sorted(inbox[device]):
                        free = max(free, arrival) + per_partial
                    at[device] = max(at[device], free)
            finish = {k: at[tiles[k][0]] + network.gate_round_s for k in range(count)}
        if number == len(plan.segments) - 1:
            row_bytes = float(spatial[segment.last_unit].out_row_bytes)
            for k, (device, tile) in enumerate(tiles):
                out_bytes = len(tile.out_rows) * row_bytes
                if head is not None and len(tile.out_rows) > 0:
                    share = len(tile.out_rows) / spatial[segment.last_unit].out_shape[1]
                    seconds = tail_of(device) * head_share * share
                    finish[k] = compute(device, finish[k], seconds, f"s{number} tile {k} head")
                    out_bytes = head_bytes
                outputs.append(
                    links.send(finish[k], device, leader, out_bytes, f"s{number} output")
                )
            break
        consumers = geometries[number + 1]
        row_bytes = float(spatial[segment.last_unit].out_row_bytes)
        needs: dict[int, float] = {}
        # Per consumer: when the rows its own device made are in, and which they are.
        own = {}
        for k, (device, tile) in enumerate(tiles):
            made = tile.out_rows
            for j, (target, other) in enumerate(consumers):
                wanted = other.in_rows
                shared = min(made.stop, wanted.stop) - max(made.start, wanted.start)
                if shared <= 0:
                    continue
                reached = links.send(
                    finish[k], device, target, shared * row_bytes, f"s{number + 1} rows"
                )
                needs[j] = max(needs.get(j, 0.0), reached)
                if target == device:
                    own_at, own_rows = own.get(j, (0.0, Rows(0, 0)))
                    own[j] = (max(own_at, reached), own_rows.hull(made))
        ready = needs

    tail_ready = max(outputs)
    tail_s = tail_of(leader) * (1.0 - head_share if head is not None else 1.0)
    done = compute(leader, tail_ready, tail_s, "tail")
    latency = done + lead.latency_s
    return Replay(
        latency_s=latency,
        steps={
            "scatter": scatter,
            "compute": tail_ready - scatter,
            "tail": done - tail_ready,
            "result": lead.latency_s,
        },
        events=tuple(sorted([*events, *links.events], key=lambda e: e.start)),
        bytes_moved=links.bytes_moved,
    )
