"""A planning problem: one model, a set of devices, a network, a leader.

Holds the model's block tables and the devices as arrays, prices candidate segments,
and turns a strategy's decision (segments with their tiles, a tail device) into a
validated `Plan` with every step's predicted time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgedi.broker.plan import ImageShare, Part, Plan, Segment, StepTimes
from edgedi.models.units import ModelSpec
from edgedi.planner.blocks import BlockTable, block_table, seconds_table
from edgedi.planner.cost import NetworkModel, message_parts
from edgedi.planner.errors import InfeasiblePlanError
from edgedi.planner.profiles import DeviceProfile
from edgedi.planner.timing import (
    Fleet,
    FloatArray,
    IntArray,
    RowsTiming,
    Tile,
    evaluate_rows,
    evaluate_tiles,
    single_device_costs,
)

# Activations are held roughly twice (input and output of the widest op) plus weights.
ACTIVATION_COPIES = 3


@dataclass(frozen=True)
class SegmentChoice:
    """A strategy's decision for one segment: units `first..last`, its tiles, its sink."""

    first: int
    last: int
    tiles: tuple[Tile, ...]
    sink: int


@dataclass(frozen=True)
class PricedSegment:
    choice: SegmentChoice
    total: float
    scatter: float
    reductions: float
    gather: float
    compute: tuple[float, ...]
    bytes_in: tuple[float, ...]
    bytes_out: tuple[float, ...]
    bytes_moved: float


def _table(spec: ModelSpec, devices: Sequence[DeviceProfile]) -> BlockTable:
    """Measured per-unit costs when every device has them for this model, else the
    per-cost-class micro-benchmark model."""
    digest = block_table(spec).digest  # cached: the digest serialises the whole spec
    units = [d.units_for(digest) for d in devices]
    if any(u is None or len(u.units) != len(spec.spatial_units) for u in units):
        return block_table(spec)
    return seconds_table(
        spec,
        tuple(d.device for d in devices),
        tuple(tuple(m.seconds_per_mac for m in u.units) for u in units if u is not None),
        tuple(tuple(m.seconds_fixed for m in u.units) for u in units if u is not None),
    )


class PlanningProblem:
    """Everything a strategy needs, precomputed once per plan request."""

    def __init__(
        self,
        spec: ModelSpec,
        devices: Sequence[DeviceProfile],
        network: NetworkModel | None = None,
        leader: str | None = None,
        tail_on_leader: bool = False,
    ) -> None:
        if not devices:
            raise InfeasiblePlanError("no devices to plan for")
        ids = [d.device for d in devices]
        if len(set(ids)) != len(ids):
            raise InfeasiblePlanError("device ids must be unique")
        if leader is None:
            leader = ids[0]
        if leader not in ids:
            raise InfeasiblePlanError(f"leader {leader} is not among the devices")
        self.spec = spec
        self.devices = tuple(devices)
        # By default a plan may end on another device that then runs the tail (no
        # transfer back); runtimes that always finish on the leader set this.
        self.tail_on_leader = tail_on_leader
        self.network = network or NetworkModel()
        self.table: BlockTable = _table(spec, devices)
        weights = spec.params * 4
        need = weights + ACTIVATION_COPIES * spec.largest_activation_bytes
        enabled = [d.memory_bytes >= need for d in devices]
        if not any(enabled):
            raise InfeasiblePlanError(
                f"{spec.name} needs about {need / 1e6:.0f} MB; no device has that much memory"
            )
        self.fleet = Fleet.build(devices, self.table, self.network, ids.index(leader), enabled)
        self.leader = self.fleet.leader
        self.units = self.table.units

    # --- speeds -------------------------------------------------------------------

    def block_compute(self, blocks: IntArray) -> FloatArray:
        """(B, D) seconds to compute each block whole on each device (no transfers)."""
        table, fleet = self.table, self.fleet
        seconds = table.full_macs[blocks] @ fleet.rate.T + table.full_count[blocks] @ fleet.fixed.T
        # A profile of zeros would divide by zero wherever speeds are 1 / seconds.
        result: FloatArray = np.maximum(seconds, 1e-12)
        return result

    def model_compute(self) -> FloatArray:
        """(D,) seconds for all spatial units plus the tail on each device."""
        whole = np.array([self.table.block(0, self.units - 1)])
        result: FloatArray = self.block_compute(whole)[0] + self.fleet.tail
        return result

    def canonical_order(self) -> IntArray:
        """Slot order for rows partitions: the leader first, then the fastest devices.

        The leader's tile needs no transfer; the devices served first by the leader's
        link start first, so the fastest go first. Disabled devices come last.
        """
        speed = self.model_compute()
        others = [d for d in range(self.fleet.size) if d != self.leader]
        others.sort(key=lambda d: (not self.fleet.enabled[d], speed[d], d))
        return np.array([self.leader, *others], dtype=np.int64)

    # --- pricing ------------------------------------------------------------------

    def evaluate_counts(
        self, blocks: IntArray, order: IntArray, counts: IntArray, sinks: IntArray | None = None
    ) -> RowsTiming:
        """Price rows partitions given as row counts per slot (contiguous, in slot order)."""
        stops = np.cumsum(counts, axis=1)
        starts = stops - counts
        if sinks is None:
            sinks = np.full(len(blocks), self.leader, dtype=np.int64)
        if order.ndim == 1:
            order = np.broadcast_to(order, counts.shape)
        return evaluate_rows(self.table, self.fleet, blocks, order, starts, stops, sinks)

    def single_costs(self, blocks: IntArray, sink_is_device: bool = False) -> FloatArray:
        """(B, D) each block on one device alone; disabled devices cost infinity."""
        sinks = None if sink_is_device else np.full(len(blocks), self.leader, dtype=np.int64)
        costs = single_device_costs(self.table, self.fleet, blocks, sinks)
        return np.where(self.fleet.enabled[None, :], costs, np.inf)

    def final_sink(self, device: int) -> int:
        """Where a last segment run whole on `device` is gathered (and the tail runs)."""
        return self.leader if self.tail_on_leader else device

    def final_single_costs(self, blocks: IntArray) -> FloatArray:
        """(B, D): blocks ending the network run whole on each device, then the tail.

        The tail runs where the block ran (no transfer back), or on the leader when
        `tail_on_leader` is set.
        """
        if self.tail_on_leader:
            costs: FloatArray = self.single_costs(blocks) + self.fleet.tail[self.leader]
            return costs
        costs = self.single_costs(blocks, sink_is_device=True) + self.fleet.tail[None, :]
        return costs

    def price(self, choice: SegmentChoice) -> PricedSegment:
        """Exact predicted timing of one segment."""
        tiles = choice.tiles
        devices = [t.device for t in tiles]
        block = self.table.block(choice.first, choice.last)
        width = int(self.table.width[block])
        plain = all(t.cols is None or t.cols == (0, width) for t in tiles)
        if plain and len(set(devices)) == len(devices):
            timing = evaluate_rows(
                self.table,
                self.fleet,
                np.array([block]),
                np.array([devices], dtype=np.int64),
                np.array([[t.rows[0] for t in tiles]], dtype=np.int64),
                np.array([[t.rows[1] for t in tiles]], dtype=np.int64),
                np.array([choice.sink], dtype=np.int64),
            )
            total = float(timing.makespan[0])
            return PricedSegment(
                choice,
                total,
                float(timing.scatter[0]),
                float(timing.reductions[0]),
                float(timing.gather[0]),
                tuple(float(x) for x in timing.compute[0]),
                tuple(float(x) for x in timing.bytes_in[0]),
                tuple(float(x) for x in timing.bytes_out[0]),
                float(timing.bytes_moved[0]),
            )
        tiled = evaluate_tiles(
            self.table, self.fleet, choice.first, choice.last, tiles, choice.sink
        )
        return PricedSegment(
            choice,
            tiled.makespan,
            tiled.scatter,
            0.0,
            tiled.gather,
            tiled.compute,
            tiled.bytes_in,
            tiled.bytes_out,
            tiled.bytes_moved,
        )

    # --- plans --------------------------------------------------------------------

    def build_plan(
        self,
        strategy: str,
        choices: Sequence[SegmentChoice],
        tail_device: int | None = None,
        *,
        epoch: int = 0,
        plan_id: str | None = None,
        created_at: float | None = None,
    ) -> Plan:
        """A validated rows-mode plan with predictions for `choices`."""
        tail_device = self.leader if tail_device is None else tail_device
        if self.tail_on_leader and tail_device != self.leader:
            raise InfeasiblePlanError("this problem runs the tail on the leader")
        if choices and choices[-1].sink != tail_device:
            raise InfeasiblePlanError("the last segment must be gathered on the tail device")
        ids = self.fleet.ids
        segments = []
        latency = 0.0
        moved = 0.0
        for choice in choices:
            priced = self.price(choice)
            block = self.table.block(choice.first, choice.last)
            parts = tuple(
                Part(
                    device=ids[tile.device],
                    rows=tile.rows,
                    cols=tile.cols,
                    compute_s=priced.compute[k],
                    bytes_in=round(priced.bytes_in[k]),
                    bytes_out=round(priced.bytes_out[k]),
                )
                for k, tile in enumerate(choice.tiles)
            )
            compute = max(0.0, priced.total - priced.scatter - priced.reductions - priced.gather)
            segments.append(
                Segment(
                    first_unit=choice.first,
                    last_unit=choice.last,
                    out_height=int(self.table.height[block]),
                    out_width=int(self.table.width[block]),
                    reductions=int(self.table.gates[block]),
                    sink=ids[choice.sink],
                    parts=parts,
                    predicted=StepTimes(
                        scatter_s=priced.scatter,
                        compute_s=compute,
                        reductions_s=priced.reductions,
                        gather_s=priced.gather,
                        total_s=priced.total,
                    ),
                )
            )
            latency += priced.total
            moved += priced.bytes_moved
        tail = float(self.fleet.tail[tail_device])
        latency += tail
        return Plan(
            plan_id=plan_id or uuid.uuid4().hex,
            epoch=epoch,
            strategy=strategy,
            model=self.spec.name,
            model_digest=self.table.digest,
            input_shape=self.spec.input_shape,
            created_at=time.time() if created_at is None else created_at,
            leader=ids[self.leader],
            devices=ids,
            mode="rows",
            segments=tuple(segments),
            tail_device=ids[tail_device],
            tail_s=tail,
            predicted_latency_s=latency,
            predicted_throughput=1.0 / latency if latency > 0 else 0.0,
            predicted_bytes=round(moved),
        )

    def build_images_plan(
        self,
        strategy: str,
        *,
        epoch: int = 0,
        plan_id: str | None = None,
        created_at: float | None = None,
    ) -> Plan:
        """Whole-image dispatch: every usable device takes images in proportion to speed.

        Predicted latency is the mean over devices of one image each, all sent at once
        (the leader's link serves them in order); throughput is the steady state: the
        devices' summed rates, capped by the leader's link.
        """
        fleet = self.fleet
        compute = self.model_compute()
        usable = [d for d in self.canonical_order() if fleet.enabled[d]]
        table = self.table
        whole = table.block(0, self.units - 1)
        size = float(table.in_stop[whole, table.height[whole]] - table.in_start[whole, 0])
        size = size * float(table.in_row_bytes[whole])
        net = self.network
        leader = self.leader
        link_free = 0.0
        latency: dict[int, float] = {}
        link_seconds = 0.0
        for d in usable:
            if d == leader:
                latency[d] = float(compute[d])
                continue
            pre, hold, post = message_parts(
                size + net.message_overhead_bytes,
                fleet.bandwidth[leader],
                fleet.latency[leader],
                fleet.bandwidth[d],
                fleet.latency[d],
                net,
                "sender",
            )
            start = max(float(pre), link_free)
            link_free = start + float(hold)
            latency[d] = link_free + float(post) + float(compute[d])
        rates = {d: 1.0 / float(compute[d]) for d in usable}
        total_rate = sum(rates.values())
        for d in usable:
            if d != leader:
                link_seconds += (
                    rates[d]
                    / total_rate
                    * float(
                        message_parts(
                            size + net.message_overhead_bytes,
                            fleet.bandwidth[leader],
                            fleet.latency[leader],
                            fleet.bandwidth[d],
                            fleet.latency[d],
                            net,
                            "sender",
                        )[1]
                    )
                )
        throughput = total_rate if link_seconds == 0 else min(total_rate, 1.0 / link_seconds)
        shares = [
            ImageShare(device=fleet.ids[d], share=rates[d] / total_rate, latency_s=latency[d])
            for d in usable
        ]
        # Rounding can leave the shares a hair off 1; the schema insists on the sum.
        drift = 1.0 - sum(s.share for s in shares)
        shares[0] = shares[0].model_copy(update={"share": shares[0].share + drift})
        mean = sum(latency.values()) / len(latency)
        moved = sum(size + net.message_overhead_bytes for d in usable if d != leader)
        return Plan(
            plan_id=plan_id or uuid.uuid4().hex,
            epoch=epoch,
            strategy=strategy,
            model=self.spec.name,
            model_digest=self.table.digest,
            input_shape=self.spec.input_shape,
            created_at=time.time() if created_at is None else created_at,
            leader=fleet.ids[leader],
            devices=fleet.ids,
            mode="images",
            tail_device=fleet.ids[leader],
            images=tuple(shares),
            predicted_latency_s=mean,
            predicted_throughput=throughput,
            predicted_bytes=round(moved),
        )
