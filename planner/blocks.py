"""Separable geometry tables: every fused block's tile costs as array lookups.

For a fused block of units `i..j` and a tile whose output rows are `[s, e)`, every op
of the block computes an interval of rows whose start depends only on `s` and whose
stop depends only on `e`. That holds through strides, padding, residual hulls and
even the attention gates: at a gate a tile's rows are widened to its share of the
map, and the share ends where the next tile's need starts, which is a function of the
same boundary `e` (the next tile starts where this one stops). So, for boundary
values `x = 0..H`, we tabulate per op `start(x)` and `stop(x)` once, and any tile's
MACs by cost class are `A[e] - B[s] + fixed` with `A`, `B` sums of `macs_per_row ×
stop/start` over the block's ops. This reproduces `edgedi.models.units.segment_tiles`
exactly (the tests compare them) at the cost of an index lookup, which is what lets the
DP and the auction price thousands of (block, partition) pairs in milliseconds.

Phases: a gate splits a tile's work into a part before the synchronisation round and a
part after. Phases are numbered from the *end* of the block (the number of gates at
or after an op), so that a block `i..j` and the block `i-1..j` share their numbering
and the tables accumulate as `i` decreases.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgedi.models.units import ModelSpec, Op, Unit
from edgedi.planner.errors import InfeasiblePlanError
from edgedi.planner.profiles import COST_CLASSES

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class OpTrack:
    """One op of a block, its output rows as functions of the tile's boundaries."""

    op: Op
    unit: int
    phase_from_end: int
    out_start: IntArray  # indexed by the tile's start boundary
    out_stop: IntArray  # indexed by the tile's stop boundary


def _op_backwards(
    op: Op, start: IntArray, stop: IntArray, extent_in: int
) -> tuple[IntArray, IntArray]:
    """Input rows (clamped to the map) that output rows [start, stop) of `op` need."""
    in_start = start * op.stride - op.padding
    in_stop = (stop - 1) * op.stride - op.padding + op.dilation * (op.kernel - 1) + 1
    return np.maximum(in_start, 0), np.minimum(in_stop, extent_in)


def _transposed(op: Op) -> Op:
    """The same op seen along the width axis (square kernels in the zoo)."""
    from dataclasses import replace

    return replace(
        op,
        in_height=op.in_width,
        in_width=op.in_height,
        out_height=op.out_width,
        out_width=op.out_height,
    )


def walk_back(
    units: Sequence[Unit], axis: str = "rows"
) -> tuple[list[list[OpTrack]], list[tuple[IntArray, IntArray]]]:
    """Walk `units` (consecutive, spatial) backwards from the last one's output.

    Returns, per unit (in forward order), its op tracks in execution order (main, then
    shortcut), and per unit its input interval functions (start(x), stop(x)). Along
    `axis="cols"` gates are not allowed (grid tiles cannot share a reduction exactly).
    """
    last = units[-1]
    extent = last.out_shape[1] if axis == "rows" else last.out_shape[2]
    boundaries = np.arange(extent + 1, dtype=np.int64)
    start, stop = boundaries.copy(), boundaries.copy()
    per_unit: list[list[OpTrack]] = []
    inputs: list[tuple[IntArray, IntArray]] = []
    gates_after = 0
    for unit in reversed(units):
        out_start, out_stop = start, stop
        tracks: list[OpTrack] = []
        # Shortcut ops run after the main branch: they are later in execution order.
        skip_in: tuple[IntArray, IntArray] | None = None
        if unit.shortcut is not None:
            s_start, s_stop = out_start, out_stop
            for op in reversed(unit.shortcut):
                view = op if axis == "rows" else _transposed(op)
                tracks.append(OpTrack(op, unit.index, gates_after, s_start, s_stop))
                s_start, s_stop = _op_backwards(view, s_start, s_stop, view.in_height)
            skip_in = (s_start, s_stop)
        m_start, m_stop = out_start, out_stop
        for op in reversed(unit.main):
            view = op if axis == "rows" else _transposed(op)
            if op.kind == "gate":
                if axis != "rows":
                    raise InfeasiblePlanError(
                        f"unit {unit.name}: a gate cannot be split by columns"
                    )
                gates_after += 1
                # Widen each tile to its share of the reduced map (see units._shares).
                m_start = m_start.copy()
                m_start[0] = 0
                m_stop = np.maximum(m_stop, m_start)
                m_stop[-1] = view.out_height
            tracks.append(OpTrack(op, unit.index, gates_after, m_start, m_stop))
            m_start, m_stop = _op_backwards(view, m_start, m_stop, view.in_height)
        if skip_in is not None:
            m_start = np.minimum(m_start, skip_in[0])
            m_stop = np.maximum(m_stop, skip_in[1])
        tracks.reverse()
        per_unit.append(tracks)
        inputs.append((m_start, m_stop))
        start, stop = m_start, m_stop
    per_unit.reverse()
    inputs.reverse()
    return per_unit, inputs


@dataclass
class BlockTable:
    """Tables for every block `i..j` of a model's spatial units (see module docstring).

    Arrays are indexed by block number `b` (see `index`), phase-from-end `q`, cost
    class `c` (in `classes`) and boundary `x` (padded to the tallest block).
    """

    spec: ModelSpec
    classes: tuple[str, ...]
    """Cost classes; in a seconds table (`seconds_table`), the devices instead."""
    first: IntArray  # (NB,)
    last: IntArray
    height: IntArray  # output rows of the block
    width: IntArray
    in_height: IntArray
    in_row_bytes: FloatArray
    out_row_bytes: FloatArray
    in_start: IntArray  # (NB, X)
    in_stop: IntArray
    stop_sum: FloatArray  # A: (NB, Q, X, C), classes last so a lookup reads one run
    start_sum: FloatArray  # B: (NB, Q, X, C)
    fixed: FloatArray  # (NB, Q, C) per-map MACs (the gate's dense layer)
    count: FloatArray  # (NB, Q, C) op invocations
    gates: IntArray  # (NB,) reduction rounds inside the block
    gate_channels: FloatArray  # (NB, Q): channels of the gate ending phase q (q >= 1)
    full_macs: FloatArray  # (NB, C): the whole block as one tile
    full_count: FloatArray  # (NB, C)
    index: IntArray  # (n, n): block number of i..j, -1 if i > j
    tail_ops: tuple[Op, ...]
    digest: str  # ModelSpec.digest(), computed once (it serialises the whole spec)
    tracks: list[list[list[OpTrack]]] = field(repr=False)  # per j: per unit <= j: tracks
    unit_rate: FloatArray | None = None
    """Seconds table only: (D, units) seconds per MAC of each unit on each device."""
    unit_fixed: FloatArray | None = None
    """Seconds table only: (D, units) seconds per op invocation of each unit."""

    @property
    def in_seconds(self) -> bool:
        """The sums are seconds per device (classes are devices), not MACs per class."""
        return self.unit_rate is not None

    @property
    def units(self) -> int:
        return int(self.index.shape[0])

    def block(self, first: int, last: int) -> int:
        number = int(self.index[first, last])
        if number < 0:
            raise ValueError(f"no block {first}..{last}")
        return number

    def block_tracks(self, first: int, last: int) -> list[OpTrack]:
        return [t for unit in self.tracks[last][first:] for t in unit]

    def tile_macs(self, block: int, start: int, stop: int) -> dict[str, int]:
        """MACs by cost class of the tile with output rows [start, stop) (for tests)."""
        if stop <= start:
            return {}
        gates = int(self.gates[block])
        totals: dict[str, int] = {}
        for c, cost_class in enumerate(self.classes):
            value = 0.0
            for q in range(gates + 1):
                value += self.stop_sum[block, q, stop, c] - self.start_sum[block, q, start, c]
                value += self.fixed[block, q, c]
            if self.count[block, : gates + 1, c].sum() > 0:
                totals[cost_class] = round(value)
        return totals


def _class_index(classes: Sequence[str]) -> dict[str, int]:
    return {c: i for i, c in enumerate(classes)}


@functools.lru_cache(maxsize=32)
def block_table(spec: ModelSpec) -> BlockTable:
    """The tables of `spec` (cached: specs are frozen and hashable)."""
    spatial = spec.spatial_units
    if not spatial:
        raise InfeasiblePlanError(f"{spec.name}: no spatial units to partition")
    present = {op.cost_class for unit in spatial for op in unit.ops}
    classes = tuple(c for c in COST_CLASSES if c in present)
    return _build(spec, classes, None, None)


@functools.lru_cache(maxsize=16)
def seconds_table(
    spec: ModelSpec,
    devices: tuple[str, ...],
    unit_rate: tuple[tuple[float, ...], ...],
    unit_fixed: tuple[tuple[float, ...], ...],
) -> BlockTable:
    """Tables in *seconds per device*: measured per-unit costs folded in.

    Each device is one "class": a tile's sum for class `d` is what it costs on device
    `d`, each op weighted by its unit's measured seconds per MAC, plus the unit's
    per-invocation overhead in `fixed`. A fleet over this table has the identity as
    its rate (`Fleet.build`), so every strategy prices tiles unchanged.
    """
    spatial = spec.spatial_units
    if not spatial:
        raise InfeasiblePlanError(f"{spec.name}: no spatial units to partition")
    rate = np.array(unit_rate, dtype=np.float64).reshape(len(devices), len(spatial))
    fixed = np.array(unit_fixed, dtype=np.float64).reshape(len(devices), len(spatial))
    return _build(spec, devices, rate, fixed)


def _build(
    spec: ModelSpec,
    classes: tuple[str, ...],
    unit_rate: FloatArray | None,
    unit_fixed: FloatArray | None,
) -> BlockTable:
    spatial = spec.spatial_units
    n = len(spatial)
    cindex = _class_index(classes)
    C = len(classes)
    heights = [u.out_shape[1] for u in spatial]
    X = max(heights) + 1
    total_gates = sum(u.reductions for u in spatial)
    Q = total_gates + 1
    blocks = [(i, j) for j in range(n) for i in range(j + 1)]
    NB = len(blocks)
    index = np.full((n, n), -1, dtype=np.int64)
    for b, (i, j) in enumerate(blocks):
        index[i, j] = b

    stop_sum = np.zeros((NB, Q, C, X))
    start_sum = np.zeros((NB, Q, C, X))
    fixed = np.zeros((NB, Q, C))
    count = np.zeros((NB, Q, C))
    gate_channels = np.zeros((NB, Q))
    in_start = np.zeros((NB, X), dtype=np.int64)
    in_stop = np.zeros((NB, X), dtype=np.int64)
    all_tracks: list[list[list[OpTrack]]] = []

    def pad(values: IntArray) -> IntArray:
        return np.pad(values, (0, X - len(values)), mode="edge")

    for j in range(n):
        per_unit, inputs = walk_back(spatial[: j + 1])
        all_tracks.append(per_unit)
        # Contributions of each unit u <= j to the tables of blocks ending at j.
        u_stop = np.zeros((j + 1, Q, C, X))
        u_start = np.zeros((j + 1, Q, C, X))
        u_fixed = np.zeros((j + 1, Q, C))
        u_count = np.zeros((j + 1, Q, C))
        u_gate = np.zeros((j + 1, Q))
        for u, tracks in enumerate(per_unit):
            for track in tracks:
                op, q = track.op, track.phase_from_end
                per_row = float(op.macs_per_row)
                if unit_rate is not None and unit_fixed is not None:
                    # Seconds per device: every class (device) at once.
                    rate = unit_rate[:, u]
                    u_stop[u, q] += rate[:, None] * per_row * pad(track.out_stop)[None, :]
                    u_start[u, q] += rate[:, None] * per_row * pad(track.out_start)[None, :]
                    u_fixed[u, q] += rate * op.fixed_macs + unit_fixed[:, u]
                else:
                    c = cindex[op.cost_class]
                    u_stop[u, q, c] += per_row * pad(track.out_stop)
                    u_start[u, q, c] += per_row * pad(track.out_start)
                    u_fixed[u, q, c] += op.fixed_macs
                    u_count[u, q, c] += 1
                if op.kind == "gate":
                    u_gate[u, q] = op.out_channels
        for arrays in (u_stop, u_start, u_fixed, u_count, u_gate):
            arrays[:] = np.flip(np.cumsum(np.flip(arrays, 0), axis=0), 0)
        for i in range(j + 1):
            b = index[i, j]
            stop_sum[b], start_sum[b] = u_stop[i], u_start[i]
            fixed[b], count[b] = u_fixed[i], u_count[i]
            # u_gate accumulated too, but each q has exactly one gate per block ending at j.
            gate_channels[b] = u_gate[i]
            in_start[b], in_stop[b] = pad(inputs[i][0]), pad(inputs[i][1])

    first = np.array([i for i, _ in blocks], dtype=np.int64)
    last = np.array([j for _, j in blocks], dtype=np.int64)
    gates_per_unit = np.array([u.reductions for u in spatial], dtype=np.int64)
    gate_prefix = np.concatenate([[0], np.cumsum(gates_per_unit)])
    gates = gate_prefix[last + 1] - gate_prefix[first]
    height = np.array([heights[j] for j in last], dtype=np.int64)
    rows = np.arange(NB)
    full_macs = (stop_sum[rows, :, :, height] - start_sum[rows, :, :, 0] + fixed).sum(axis=1)
    full_count = count.sum(axis=1)
    return BlockTable(
        spec=spec,
        classes=classes,
        first=first,
        last=last,
        height=height,
        width=np.array([spatial[j].out_shape[2] for j in last], dtype=np.int64),
        in_height=np.array([spatial[i].in_shape[1] for i in first], dtype=np.int64),
        in_row_bytes=np.array([float(spatial[i].in_row_bytes) for i in first]),
        out_row_bytes=np.array([float(spatial[j].out_row_bytes) for j in last]),
        in_start=in_start,
        in_stop=in_stop,
        stop_sum=np.ascontiguousarray(stop_sum.transpose(0, 1, 3, 2)),
        start_sum=np.ascontiguousarray(start_sum.transpose(0, 1, 3, 2)),
        fixed=fixed,
        count=count,
        gates=gates,
        gate_channels=gate_channels,
        full_macs=full_macs,
        full_count=full_count,
        index=index,
        tail_ops=tuple(op for unit in spec.tail_units for op in unit.ops),
        digest=spec.digest(),
        tracks=all_tracks,
        unit_rate=unit_rate,
        unit_fixed=unit_fixed,
    )


@functools.lru_cache(maxsize=64)
def column_tracks(spec: ModelSpec, first: int, last: int) -> tuple[OpTrack, ...]:
    """Op tracks of block `first..last` along the width (grid tiles; no gates allowed)."""
    spatial = spec.spatial_units
    per_unit, _inputs = walk_back(spatial[first : last + 1], axis="cols")
    return tuple(t for unit in per_unit for t in unit)


def column_inputs(spec: ModelSpec, first: int, last: int) -> tuple[IntArray, IntArray]:
    spatial = spec.spatial_units
    _per_unit, inputs = walk_back(spatial[first : last + 1], axis="cols")
    return inputs[0]
