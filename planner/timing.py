"""Vectorised timing of fused blocks: the cost model of `cost.py`, many blocks at once.

A *rows partition* of a block gives each of K slots a device and an interval of output
rows; slots are served in order (the coordinator sends input tiles in slot order).
`evaluate_rows` prices a batch of B such partitions — possibly of different blocks — as
(B, K) numpy arrays: the scatter from the coordinator, each tile's compute phase by
phase, the reduction rounds at the attention gates, and the gather to the sink. The
coordinator's link is a first-come-first-served resource per direction (one resource
with `shared_medium`), so sends queue behind each other exactly as in the simulator.

`evaluate_tiles` prices one segment with arbitrary tiles (grid tiles, several tiles on
one device) without reductions, in plain Python; DeepThings-style plans use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

from edgedi.models.units import CostClass
from edgedi.planner.blocks import BlockTable, block_table, column_inputs, column_tracks
from edgedi.planner.cost import (
    GATE_BYTES_PER_CHANNEL,
    PARTIAL_BYTES_PER_CHANNEL,
    NetworkModel,
    message_parts,
    tail_seconds,
)
from edgedi.planner.errors import InfeasiblePlanError
from edgedi.planner.profiles import DeviceProfile

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Fleet:
    """The devices as arrays, aligned with a BlockTable's cost classes."""

    ids: tuple[str, ...]
    profiles: tuple[DeviceProfile, ...]
    rate: FloatArray  # (D, C) seconds per MAC
    fixed: FloatArray  # (D, C) seconds per op invocation
    bandwidth: FloatArray  # (D,)
    latency: FloatArray  # (D,)
    enabled: BoolArray  # (D,) may compute tiles
    capability: FloatArray  # (D,) convolution throughput, 1 / (seconds per 3x3 MAC)
    tail: FloatArray  # (D,) seconds for the tail (pooling + head)
    leader: int
    network: NetworkModel

    @classmethod
    def build(
        cls,
        devices: Sequence[DeviceProfile],
        table: BlockTable,
        network: NetworkModel,
        leader: int,
        enabled: Sequence[bool] | None = None,
    ) -> Fleet:
        tail = np.array([tail_seconds(d, table.tail_ops) for d in devices])
        capability = np.array(
            [1.0 / max(d.time_model("conv3x3").seconds_per_mac, 1e-18) for d in devices]
        )
        if table.in_seconds:
            # Classes are the devices: a table sum is already each device's seconds.
            if table.classes != tuple(d.device for d in devices):
                raise ValueError("a seconds table must list the fleet's devices in order")
            rate = np.eye(len(devices))
            fixed = np.zeros((len(devices), len(devices)))
            units = [d.units_for(table.digest) for d in devices]
            tail = np.array(
                [u.tail_s if u is not None else t for u, t in zip(units, tail, strict=True)]
            )
            whole = table.block(0, table.units - 1)
            seconds = table.full_macs[whole]
            macs = float(block_table(table.spec).full_macs[whole].sum())
            capability = macs / np.maximum(seconds, 1e-12)
        else:
            classes = [cast(CostClass, c) for c in table.classes]
            rate = np.array(
                [[d.time_model(c).seconds_per_mac for c in classes] for d in devices]
            ).reshape(len(devices), len(classes))
            fixed = np.array(
                [[d.time_model(c).seconds_fixed for c in classes] for d in devices]
            ).reshape(len(devices), len(classes))
        return cls(
            ids=tuple(d.device for d in devices),
            profiles=tuple(devices),
            rate=rate,
            fixed=fixed,
            bandwidth=np.array([d.bandwidth for d in devices], dtype=np.float64),
            latency=np.array([d.latency_s for d in devices], dtype=np.float64),
            enabled=np.array(
                [True] * len(devices) if enabled is None else list(enabled), dtype=np.bool_
            ),
            capability=capability,
            tail=tail,
            leader=leader,
            network=network,
        )

    @property
    def size(self) -> int:
        return len(self.ids)


def fifo(
    entry: FloatArray,
    hold: FloatArray,
    active: BoolArray,
    free: FloatArray,
    in_order: bool = False,
) -> tuple[FloatArray, FloatArray]:
    """One first-come-first-served resource per row: when each message releases it.

    `entry` is when a message reaches the resource, `hold` how long it holds it; ties
    are served in slot order. `in_order` says the entries already come in slot order
    (a burst of sends from the leader), which saves the sort. Returns the release time
    per message (meaningless where inactive) and when the resource is free again.
    """
    key = np.where(active, entry, -np.inf)
    held = np.where(active, hold, 0.0)
    if in_order:
        sorted_entry, sorted_hold, order = key, held, None
    else:
        order = np.argsort(key, axis=1, kind="stable")
        sorted_entry = np.take_along_axis(key, order, axis=1)
        sorted_hold = np.take_along_axis(held, order, axis=1)
    served = np.cumsum(sorted_hold, axis=1)
    # end_k = max(entry_k, end_{k-1}) + hold_k unrolls to
    # end_k = served_k + max over j <= k of (entry_j - served_{j-1})
    wait = np.maximum.accumulate(sorted_entry - (served - sorted_hold), axis=1)
    sorted_end = served + np.maximum(wait, free[:, None])
    if order is None:
        end = sorted_end
    else:
        end = np.empty_like(sorted_end)
        np.put_along_axis(end, order, sorted_end, axis=1)
    released = np.max(np.where(active, end, -np.inf), axis=1, initial=-np.inf)
    return end, np.maximum(free, released)


def _row_max(values: FloatArray, mask: BoolArray) -> FloatArray:
    result: FloatArray = np.max(np.where(mask, values, -np.inf), axis=1, initial=-np.inf)
    return result


@dataclass(frozen=True)
class RowsTiming:
    """Timing of a batch of rows partitions (times from the segment's start)."""

    makespan: FloatArray  # (B,)
    arrival: FloatArray  # (B, K) input tile at its device
    compute: FloatArray  # (B, K) compute seconds of each tile (all phases)
    finish: FloatArray  # (B, K) last phase finished
    done: FloatArray  # (B, K) output at the sink
    scatter: FloatArray  # (B,)
    reductions: FloatArray  # (B,)
    gather: FloatArray  # (B,)
    bytes_in: FloatArray  # (B, K) payload bytes of each input tile
    bytes_out: FloatArray  # (B, K)
    bytes_moved: FloatArray  # (B,) all messages through the broker, envelopes included


def evaluate_rows(
    table: BlockTable,
    fleet: Fleet,
    blocks: IntArray,
    devices: IntArray,
    starts: IntArray,
    stops: IntArray,
    sinks: IntArray,
) -> RowsTiming:
    """Price B rows partitions: slot k of row b is `devices[b, k]` computing rows
    `[starts[b, k], stops[b, k])` of block `blocks[b]`, output gathered on `sinks[b]`.

    One slot per device per row (several tiles on one device: `evaluate_tiles`).
    """
    batch = devices.shape[0]
    net = fleet.network
    leader = fleet.leader
    overhead = float(net.message_overhead_bytes)
    block_col = blocks[:, None]
    nonempty = stops > starts
    remote = nonempty & (devices != leader)
    lead_bw, lead_lat = fleet.bandwidth[leader], fleet.latency[leader]
    dev_bw, dev_lat = fleet.bandwidth[devices], fleet.latency[devices]

    rows_in = table.in_stop[block_col, stops] - table.in_start[block_col, starts]
    bytes_in = np.where(nonempty, rows_in * table.in_row_bytes[block_col], 0.0)
    bytes_out = np.where(nonempty, (stops - starts) * table.out_row_bytes[block_col], 0.0)
    moved = np.where(remote, bytes_in + overhead, 0.0).sum(axis=1)

    zeros = np.zeros(batch)
    pre, hold, post = message_parts(
        bytes_in + overhead, lead_bw, lead_lat, dev_bw, dev_lat, net, "sender"
    )
    end, up = fifo(pre, hold, remote, zeros, in_order=True)
    down = up if net.shared_medium else zeros
    arrival = np.where(remote, end + post, 0.0)

    rate = fleet.rate[devices]
    fixed = fleet.fixed[devices]
    gates = table.gates[blocks]
    rounds_max = int(gates.max()) if batch else 0
    several = nonempty.sum(axis=1) > 1
    ready = arrival
    compute = np.zeros_like(arrival)
    reductions = zeros.copy()
    finish = ready
    for phase in range(rounds_max + 1):
        q = gates - phase
        valid = q >= 0
        q_col = np.maximum(q, 0)[:, None]
        macs = (
            table.stop_sum[block_col, q_col, stops]
            - table.start_sum[block_col, q_col, starts]
            + table.fixed[block_col, q_col]
        )
        seconds = np.einsum("bkc,bkc->bk", macs, rate) + np.einsum(
            "bc,bkc->bk", table.count[blocks, q_col[:, 0]], fixed
        )
        seconds = np.where(nonempty & valid[:, None], seconds, 0.0)
        finish = ready + seconds
        compute = compute + seconds
        rounds = valid & (q >= 1) & several
        if phase == rounds_max or not rounds.any():
            ready = finish
            continue
        channels = table.gate_channels[blocks, q_col[:, 0]][:, None]
        talking = remote & rounds[:, None]
        pre, hold, post = message_parts(
            channels * PARTIAL_BYTES_PER_CHANNEL + overhead + 0.0 * finish,
            dev_bw,
            dev_lat,
            lead_bw,
            lead_lat,
            net,
            "receiver",
        )
        end, down = fifo(finish + pre, hold, talking, down)
        if net.shared_medium:
            up = down
        got = np.where(talking, end + post, finish)
        combine = _row_max(got, nonempty)
        pre, hold, post = message_parts(
            channels * GATE_BYTES_PER_CHANNEL + overhead + 0.0 * finish,
            lead_bw,
            lead_lat,
            dev_bw,
            dev_lat,
            net,
            "sender",
        )
        end, up = fifo(combine[:, None] + pre, hold, talking, up, in_order=True)
        if net.shared_medium:
            down = up
        gate_arrival = np.where(talking, end + post, combine[:, None])
        ready = np.where(rounds[:, None], gate_arrival, finish)
        reductions += np.where(rounds, _row_max(ready, nonempty) - _row_max(finish, nonempty), 0.0)
        per_round = channels * (PARTIAL_BYTES_PER_CHANNEL + GATE_BYTES_PER_CHANNEL) + 2 * overhead
        moved += np.where(talking, per_round, 0.0).sum(axis=1)

    sink_col = sinks[:, None]
    leaving = nonempty & (devices != sink_col)
    pre, hold, post = message_parts(
        bytes_out + overhead,
        dev_bw,
        dev_lat,
        fleet.bandwidth[sink_col],
        fleet.latency[sink_col],
        net,
        "receiver",
    )
    free = down if net.shared_medium else np.where(sinks == leader, down, 0.0)
    end, _ = fifo(finish + pre, hold, leaving, free)
    done = np.where(leaving, end + post, finish)
    moved += np.where(leaving, bytes_out + overhead, 0.0).sum(axis=1)

    makespan = np.maximum(_row_max(done, nonempty), 0.0)
    scatter = np.maximum(_row_max(arrival, nonempty), 0.0)
    gather = np.maximum(makespan - np.maximum(_row_max(finish, nonempty), 0.0), 0.0)
    return RowsTiming(
        makespan=makespan,
        arrival=arrival,
        compute=compute,
        finish=finish,
        done=done,
        scatter=scatter,
        reductions=reductions,
        gather=gather,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        bytes_moved=moved,
    )


def single_device_costs(
    table: BlockTable, fleet: Fleet, blocks: IntArray, sinks: IntArray | None = None
) -> FloatArray:
    """(B, D): each block run whole on each device, input from the leader, output to the sink.

    `sinks=None` gathers on the device itself (no output transfer: the last block with
    the tail on that device). Equals `evaluate_rows` with one slot holding every row.
    """
    net = fleet.network
    leader = fleet.leader
    overhead = float(net.message_overhead_bytes)
    compute = table.full_macs[blocks] @ fleet.rate.T + table.full_count[blocks] @ fleet.fixed.T
    rows_in = (table.in_stop[blocks, table.height[blocks]] - table.in_start[blocks, 0]).astype(
        np.float64
    )
    size_in = (rows_in * table.in_row_bytes[blocks])[:, None] + overhead
    pre, hold, post = message_parts(
        size_in,
        fleet.bandwidth[leader],
        fleet.latency[leader],
        fleet.bandwidth[None, :],
        fleet.latency[None, :],
        net,
        "sender",
    )
    send = np.where(np.arange(fleet.size)[None, :] == leader, 0.0, pre + hold + post)
    total = send + compute
    if sinks is None:
        return total
    size_out = (table.height[blocks] * table.out_row_bytes[blocks])[:, None] + overhead
    sink_col = sinks[:, None]
    pre, hold, post = message_parts(
        size_out,
        fleet.bandwidth[None, :],
        fleet.latency[None, :],
        fleet.bandwidth[sink_col],
        fleet.latency[sink_col],
        net,
        "receiver",
    )
    back = np.where(np.arange(fleet.size)[None, :] == sink_col, 0.0, pre + hold + post)
    return total + back


@dataclass(frozen=True)
class Tile:
    """One tile of a segment for `evaluate_tiles`: a device and an output block."""

    device: int
    rows: tuple[int, int]
    cols: tuple[int, int] | None = None


@dataclass(frozen=True)
class TilesTiming:
    makespan: float
    arrival: tuple[float, ...]
    compute: tuple[float, ...]
    finish: tuple[float, ...]
    done: tuple[float, ...]
    scatter: float
    gather: float
    bytes_in: tuple[float, ...]
    bytes_out: tuple[float, ...]
    bytes_moved: float


class TileCosts:
    """Work of arbitrary tiles (grid tiles included) of one block, vectorised over ops."""

    def __init__(self, table: BlockTable, fleet: Fleet, first: int, last: int) -> None:
        self.table, self.fleet = table, fleet
        self.block = table.block(first, last)
        tracks = table.block_tracks(first, last)
        self.width = int(table.width[self.block])
        self.height = int(table.height[self.block])
        self.row_start = np.stack([t.out_start for t in tracks])
        self.row_stop = np.stack([t.out_stop for t in tracks])
        self.per_row = np.array([t.op.macs_per_row for t in tracks], dtype=np.int64)
        self.out_width = np.array([t.op.out_width for t in tracks], dtype=np.int64)
        self.fixed_macs = np.array([t.op.fixed_macs for t in tracks], dtype=np.int64)
        if table.unit_rate is not None:
            # A seconds table: price each op by its unit's measured rate per device.
            self.class_count = table.units
            self.classes = np.array([t.unit for t in tracks], dtype=np.int64)
        else:
            index = {c: i for i, c in enumerate(table.classes)}
            self.class_count = len(table.classes)
            self.classes = np.array([index[t.op.cost_class] for t in tracks], dtype=np.int64)
        self.counts = np.bincount(self.classes, minlength=self.class_count).astype(np.float64)
        self.first, self.last = first, last
        self._cols: tuple[IntArray, IntArray, IntArray, IntArray] | None = None
        unit = table.spec.spatial_units[first]
        self.in_element_bytes = float(unit.in_row_bytes) / unit.in_shape[2]

    def _columns(self) -> tuple[IntArray, IntArray, IntArray, IntArray]:
        if self._cols is None:
            spec = self.table.spec
            tracks = column_tracks(spec, self.first, self.last)
            col_in = column_inputs(spec, self.first, self.last)
            self._cols = (
                np.stack([t.out_start for t in tracks]),
                np.stack([t.out_stop for t in tracks]),
                col_in[0],
                col_in[1],
            )
        return self._cols

    def work(self, tile: Tile) -> tuple[FloatArray, float, float]:
        """MACs by cost class, input bytes and output bytes of `tile`."""
        s, e = tile.rows
        cs, ce = tile.cols if tile.cols is not None else (0, self.width)
        if e <= s or ce <= cs:
            return np.zeros(self.class_count), 0.0, 0.0
        rows = self.row_stop[:, e] - self.row_start[:, s]
        rows_in = float(self.table.in_stop[self.block, e] - self.table.in_start[self.block, s])
        if (cs, ce) == (0, self.width):
            macs = self.per_row * rows + self.fixed_macs
            bytes_in = rows_in * float(self.table.in_row_bytes[self.block])
        else:
            col_start, col_stop, in_start, in_stop = self._columns()
            cols = col_stop[:, ce] - col_start[:, cs]
            macs = self.per_row * rows * cols // self.out_width + self.fixed_macs
            bytes_in = rows_in * float(in_stop[ce] - in_start[cs]) * self.in_element_bytes
        by_class: FloatArray = np.bincount(
            self.classes, weights=macs.astype(np.float64), minlength=self.class_count
        ).astype(np.float64)
        bytes_out = (e - s) * float(self.table.out_row_bytes[self.block]) * (ce - cs) / self.width
        return by_class, bytes_in, bytes_out

    def seconds(self, macs: FloatArray) -> FloatArray:
        """(D,) seconds of a tile with `macs` by class on every device."""
        table = self.table
        if table.unit_rate is not None and table.unit_fixed is not None:
            by_unit: FloatArray = table.unit_rate @ macs + table.unit_fixed @ self.counts
            return by_unit
        result: FloatArray = self.fleet.rate @ macs + self.fleet.fixed @ self.counts
        return result


def tile_work(
    table: BlockTable, fleet: Fleet, first: int, last: int, tiles: Sequence[Tile]
) -> tuple[list[float], list[float], list[float]]:
    """Compute seconds, input bytes and output bytes of each tile (grid tiles allowed)."""
    costs = TileCosts(table, fleet, first, last)
    seconds, bytes_in, bytes_out = [], [], []
    for tile in tiles:
        macs, size_in, size_out = costs.work(tile)
        seconds.append(float(costs.seconds(macs)[tile.device]) if size_out > 0 else 0.0)
        bytes_in.append(size_in)
        bytes_out.append(size_out)
    return seconds, bytes_in, bytes_out


class _Links:
    """The links as first-come-first-served resources, for `evaluate_tiles`.

    The same semantics as the simulator's: a transmission holds the sender's uplink
    and the receiver's downlink (and the medium, if shared) for its whole duration;
    with store-and-forward, the first hop holds the uplink and the second, once at the
    broker, the downlink. Requests must be made in time order per resource.
    """

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.free: dict[tuple[int, str], float] = {}
        self.moved = 0.0

    def _hold(self, resources: list[tuple[int, str]], time: float, seconds: float) -> float:
        start = max([time, *(self.free.get(r, 0.0) for r in resources)])
        for resource in resources:
            self.free[resource] = start + seconds
        return start + seconds

    def _split(self, sender: int, receiver: int, size: float) -> tuple[float, float, float]:
        net, fleet = self.fleet.network, self.fleet
        broker = net.broker_bandwidth or float("inf")
        return (
            size / min(float(fleet.bandwidth[sender]), broker),
            size / min(float(fleet.bandwidth[receiver]), broker),
            net.broker_per_message_s,
        )

    def _one_hold(self, sender: int, receiver: int, size: float) -> tuple[float, float]:
        fleet, net = self.fleet, self.fleet.network
        _pre, hold, post = message_parts(
            size,
            fleet.bandwidth[sender],
            fleet.latency[sender],
            fleet.bandwidth[receiver],
            fleet.latency[receiver],
            net,
            "sender",
        )
        return float(hold), float(post)

    def send(self, time: float, sender: int, receiver: int, size: float) -> float:
        """Arrival time of one message (`size` includes the envelope)."""
        return dict(self.send_many([(time, 0, sender, receiver, size)]))[0]

    def send_many(
        self, requests: list[tuple[float, int, int, int, float]]
    ) -> list[tuple[int, float]]:
        """Arrivals of messages (ready, key, sender, receiver, size), in request order."""
        net, fleet = self.fleet.network, self.fleet
        results: list[tuple[int, float]] = []
        self.moved += sum(r[4] for r in requests)
        if not net.store_and_forward or net.shared_medium:
            for ready, key, sender, receiver, size in requests:
                hold, post = self._one_hold(sender, receiver, size)
                resources = [(sender, "up"), (receiver, "down")]
                if net.shared_medium:
                    resources.append((-1, "medium"))
                results.append((key, self._hold(resources, ready, hold) + post))
            return results
        at_broker = []
        for ready, key, sender, receiver, size in requests:
            first, second, per_message = self._split(sender, receiver, size)
            end = self._hold([(sender, "up")], ready, first)
            at_broker.append(
                (end + float(fleet.latency[sender]) + per_message, key, receiver, second)
            )
        for at, key, receiver, second in sorted(at_broker):
            end = self._hold([(receiver, "down")], at, second)
            results.append((key, end + float(fleet.latency[receiver])))
        return results


def evaluate_tiles(
    table: BlockTable,
    fleet: Fleet,
    first: int,
    last: int,
    tiles: Sequence[Tile],
    sink: int,
    work: tuple[list[float], list[float], list[float]] | None = None,
) -> TilesTiming:
    """Price one segment given as arbitrary tiles (no reductions inside).

    Tiles are sent in order; each device computes its tiles in arrival order; outputs
    queue on the sink's link in the order they reach it.
    """
    block = table.block(first, last)
    if int(table.gates[block]) and len({t.device for t in tiles}) < len(tiles):
        raise InfeasiblePlanError("tiles sharing a device cannot take part in a reduction")
    if int(table.gates[block]) and any(t.cols is not None for t in tiles):
        raise InfeasiblePlanError("grid tiles cannot take part in a reduction")
    net = fleet.network
    leader = fleet.leader
    overhead = float(net.message_overhead_bytes)
    seconds, bytes_in, bytes_out = work or tile_work(table, fleet, first, last, tiles)
    count = len(tiles)
    active = [k for k in range(count) if bytes_out[k] > 0.0]
    links = _Links(fleet)
    arrival = [0.0] * count
    for k in active:  # all sent at once, in tile order
        if tiles[k].device != leader:
            arrival[k] = links.send(0.0, leader, tiles[k].device, bytes_in[k] + overhead)
    cpu_free: dict[int, float] = {}
    finish = [0.0] * count
    for k in sorted(active, key=lambda k: (arrival[k], k)):
        device = tiles[k].device
        start = max(arrival[k], cpu_free.get(device, 0.0))
        finish[k] = start + seconds[k]
        cpu_free[device] = finish[k]
    done = list(finish)
    leaving = sorted((finish[k], k) for k in active if tiles[k].device != sink)
    for k, at in links.send_many(
        [(ready, k, tiles[k].device, sink, bytes_out[k] + overhead) for ready, k in leaving]
    ):
        done[k] = at
    makespan = max((done[k] for k in active), default=0.0)
    last_finish = max((finish[k] for k in active), default=0.0)
    return TilesTiming(
        makespan=makespan,
        arrival=tuple(arrival),
        compute=tuple(seconds),
        finish=tuple(finish),
        done=tuple(done),
        scatter=max((arrival[k] for k in active), default=0.0),
        gather=makespan - last_finish,
        bytes_in=tuple(bytes_in),
        bytes_out=tuple(bytes_out),
        bytes_moved=links.moved,
    )
