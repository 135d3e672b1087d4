"""Torch-free descriptions of a model: a chain of units, their footprints and costs.

This module is the contract between `edgedi.models` (which builds the torch modules
and runs tiles) and `edgedi.planner` (which must not import torch). Everything here
is plain frozen data plus pure arithmetic on row intervals.

Vocabulary
----------
* An **op** is one primitive along the height axis: a convolution (with its batch
  norm and activation, which are pointwise), a pooling window, an attention gate
  (a channel-wise scale computed from a global pooling: a *reduction*), a global
  average pool, or a linear layer.
* A **unit** is what the planner may cut between: a plain conv, an EdgeDI compact
  block, a pooling layer, a residual block (main branch + shortcut), the final
  global pooling, or the classifier head. Units are the chain; ops are their insides.
* A **segment** is a run of consecutive spatial units fused together: devices
  exchange rows only at segment boundaries; inside a segment each device works on
  its own tile, which grows backwards by the halo that the footprints require.

Rows are half-open intervals `[start, stop)` along the height axis. Rows outside
`[0, height)` are the zero padding of the full computation, so tiles are clamped to
the map and padding is applied only at true image borders.

The same arithmetic works along the width axis (the zoo's windows are square), so
the functions that walk footprints take `axis="width"` to describe columns; a 2-D
(DeepThings-style) tile is then a row geometry times a column geometry, and `Rows`
holds columns there.

Reductions inside a segment (the attention gate) pool over *all* rows of the map,
so at every gate each tile also owns a disjoint share of the rows, and the shares
cover the map: the partial sums of the shares add up to the exact global sum.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

OpKind = Literal["conv", "maxpool", "avgpool", "gate", "gap", "linear"]
Axis = Literal["height", "width"]
UnitKind = Literal["conv", "compact", "pool", "residual", "gap", "head"]
# Ops whose running time the planner models separately (a per-kind time model).
CostClass = Literal["conv1x1", "conv3x3", "convkxk", "depthwise", "pool", "gate", "fc"]

BYTES_PER_ELEMENT = 4  # fp32 activations


@dataclass(frozen=True, order=True)
class Rows:
    """A half-open interval of rows `[start, stop)`; empty when `stop <= start`."""

    start: int
    stop: int

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    @property
    def empty(self) -> bool:
        return self.stop <= self.start

    def hull(self, other: Rows) -> Rows:
        """The smallest interval containing both (an empty side is ignored)."""
        if self.empty:
            return other
        if other.empty:
            return self
        return Rows(min(self.start, other.start), max(self.stop, other.stop))

    def clamp(self, height: int) -> Rows:
        return Rows(max(0, self.start), min(height, self.stop))

    def contains(self, other: Rows) -> bool:
        return other.empty or (self.start <= other.start and other.stop <= self.stop)

    def shift(self, offset: int) -> Rows:
        return Rows(self.start - offset, self.stop - offset)


@dataclass(frozen=True)
class Op:
    """One primitive operation, described along the height axis.

    `kernel/stride/padding/dilation` are the height-axis window (square kernels in
    the zoo, so the width axis uses the same numbers). Shapes are (channels, height,
    width) of the whole map, not of a tile.
    """

    name: str
    kind: OpKind
    in_channels: int
    out_channels: int
    in_height: int
    in_width: int
    out_height: int
    out_width: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    params: int = 0

    @property
    def is_reduction(self) -> bool:
        """Needs a sum over the whole map before the computation can go on."""
        return self.kind in ("gate", "gap")

    @property
    def cost_class(self) -> CostClass:
        if self.kind == "conv":
            if self.groups > 1 and self.groups == self.in_channels:
                return "depthwise"
            if self.kernel == 1:
                return "conv1x1"
            return "conv3x3" if self.kernel == 3 else "convkxk"
        if self.kind in ("maxpool", "avgpool"):
            return "pool"
        if self.kind == "linear":
            return "fc"
        return "gate"  # gate and global average pool: pooling + small dense work

    def in_extent(self, axis: Axis = "height") -> int:
        return self.in_height if axis == "height" else self.in_width

    def out_extent(self, axis: Axis = "height") -> int:
        return self.out_height if axis == "height" else self.out_width

    def required_rows(self, out: Rows, axis: Axis = "height") -> Rows:
        """Input rows (unclamped, may reach into the padding) that `out` needs."""
        if out.empty:
            return Rows(0, 0)
        if self.kind in ("gap", "linear"):
            return Rows(0, self.in_extent(axis))
        start = out.start * self.stride - self.padding
        stop = (out.stop - 1) * self.stride - self.padding + self.dilation * (self.kernel - 1) + 1
        return Rows(start, stop)

    def input_rows(self, out: Rows, axis: Axis = "height") -> Rows:
        """Input rows that exist in the map (clamped) and that `out` needs."""
        return self.required_rows(out, axis).clamp(self.in_extent(axis))

    @property
    def macs_per_row(self) -> int:
        """Multiply-accumulates (or comparisons, for pools) per output row."""
        window = self.kernel * self.kernel
        if self.kind == "conv":
            return self.out_width * self.out_channels * (self.in_channels // self.groups) * window
        if self.kind in ("maxpool", "avgpool"):
            return self.out_width * self.out_channels * window
        if self.kind == "gate":
            # Pooling the row and scaling it; the tiny dense layer is per map, see `fixed_macs`.
            return 2 * self.out_width * self.out_channels
        if self.kind == "gap":
            # Its single output "row" reads the whole map.
            return self.in_height * self.in_width * self.in_channels
        return self.in_channels * self.out_channels  # linear: one "row"

    @property
    def fixed_macs(self) -> int:
        """Work done once per map, whatever the tile (the gate's dense layer)."""
        if self.kind == "gate":
            return self.in_channels * self.in_channels
        return 0

    def macs(self, out_rows: int | None = None) -> int:
        rows = self.out_height if out_rows is None else out_rows
        if self.kind in ("gap", "linear"):
            return self.macs_per_row if rows else 0
        return self.macs_per_row * rows + self.fixed_macs

    @property
    def out_row_bytes(self) -> int:
        return self.out_channels * self.out_width * BYTES_PER_ELEMENT

    @property
    def in_row_bytes(self) -> int:
        return self.in_channels * self.in_width * BYTES_PER_ELEMENT


Shape = tuple[int, int, int]  # (channels, height, width)


@dataclass(frozen=True)
class Unit:
    """A cut point for the planner: a fused segment is a run of consecutive units.

    `shortcut` is None for a plain chain, `()` for an identity skip connection, and
    the shortcut's ops for a projection (e.g. a strided 1x1 conv). Spatial units can
    be split by rows; `gap` and `head` units work on whole vectors.
    """

    index: int
    name: str
    kind: UnitKind
    in_shape: Shape
    out_shape: Shape
    main: tuple[Op, ...]
    shortcut: tuple[Op, ...] | None = None

    @property
    def spatial(self) -> bool:
        return self.kind not in ("gap", "head")

    @property
    def ops(self) -> tuple[Op, ...]:
        return self.main + (self.shortcut or ())

    @property
    def params(self) -> int:
        return sum(op.params for op in self.ops)

    @property
    def macs(self) -> int:
        return sum(op.macs() for op in self.ops)

    @property
    def reductions(self) -> int:
        """Synchronisation rounds this unit needs inside a segment (attention gates)."""
        return sum(1 for op in self.main if op.kind == "gate")

    @property
    def out_bytes(self) -> int:
        channels, height, width = self.out_shape
        return channels * height * width * BYTES_PER_ELEMENT

    @property
    def in_bytes(self) -> int:
        channels, height, width = self.in_shape
        return channels * height * width * BYTES_PER_ELEMENT

    @property
    def peak_bytes(self) -> int:
        """Largest single tensor the unit holds (input, output or an inner map)."""
        inner = [op.out_channels * op.out_height * op.out_width for op in self.ops]
        return max([self.in_bytes, self.out_bytes, *(n * BYTES_PER_ELEMENT for n in inner)])

    @property
    def out_row_bytes(self) -> int:
        channels, _height, width = self.out_shape
        return channels * width * BYTES_PER_ELEMENT

    @property
    def in_row_bytes(self) -> int:
        channels, _height, width = self.in_shape
        return channels * width * BYTES_PER_ELEMENT

    def input_rows(self, out: Rows, axis: Axis = "height") -> Rows:
        """Input rows needed for `out`, ignoring gate ownership (see `segment_tiles`)."""
        rows = out
        for op in reversed(self.main):
            rows = op.input_rows(rows, axis)
        if self.shortcut is not None:
            skip = out
            for op in reversed(self.shortcut):
                skip = op.input_rows(skip, axis)
            rows = rows.hull(skip)
        return rows


@dataclass(frozen=True)
class ModelSpec:
    """A model as the planner sees it: the chain of units and the input shape."""

    name: str
    input_shape: Shape
    num_classes: int
    units: tuple[Unit, ...]

    def __post_init__(self) -> None:
        previous = self.input_shape
        for position, unit in enumerate(self.units):
            if unit.index != position:
                raise ValueError(f"{self.name}: unit {unit.name} has index {unit.index}")
            if unit.in_shape != previous:
                raise ValueError(
                    f"{self.name}: unit {unit.name} takes {unit.in_shape}, "
                    f"the previous unit gives {previous}"
                )
            previous = unit.out_shape
        spatial = [unit.spatial for unit in self.units]
        if spatial != sorted(spatial, reverse=True):
            raise ValueError(f"{self.name}: spatial units must come before gap/head units")

    @property
    def spatial_units(self) -> tuple[Unit, ...]:
        return tuple(unit for unit in self.units if unit.spatial)

    @property
    def tail_units(self) -> tuple[Unit, ...]:
        """Units after the last spatial one (global pooling, head): run on one device."""
        return tuple(unit for unit in self.units if not unit.spatial)

    @property
    def macs(self) -> int:
        return sum(unit.macs for unit in self.units)

    @property
    def params(self) -> int:
        return sum(unit.params for unit in self.units)

    @property
    def largest_activation_bytes(self) -> int:
        return max(unit.peak_bytes for unit in self.units)

    def digest(self) -> str:
        """A stable hash of the architecture (not the weights): plans and checkpoints cite it."""
        units = [asdict(unit) for unit in self.units]
        payload = json.dumps(
            {"name": self.name, "input": self.input_shape, "units": units}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --- Geometry of a fused segment -------------------------------------------------


@dataclass(frozen=True)
class OpRows:
    """What one tile computes for one op: input rows used, output rows made.

    `owned` is set for reductions: the tile's disjoint share of the op's output
    rows, over which it sums its partial (the shares of all tiles cover the map).
    """

    op: Op
    in_rows: Rows
    out_rows: Rows
    owned: Rows | None = None


@dataclass(frozen=True)
class UnitRows:
    unit: Unit
    in_rows: Rows
    out_rows: Rows
    main: tuple[OpRows, ...]
    shortcut: tuple[OpRows, ...] | None


@dataclass(frozen=True)
class TileGeometry:
    """Everything one tile of a segment computes, unit by unit, op by op."""

    in_rows: Rows
    out_rows: Rows
    units: tuple[UnitRows, ...]

    @property
    def empty(self) -> bool:
        return self.out_rows.empty

    @property
    def op_rows(self) -> tuple[OpRows, ...]:
        return tuple(o for u in self.units for o in (*u.main, *(u.shortcut or ())))

    def macs(self) -> int:
        """Work for this tile, the halo's redundant rows included."""
        if self.empty:
            return 0
        return sum(o.op.macs(len(o.out_rows)) for o in self.op_rows)

    def macs_by_cost_class(self) -> dict[CostClass, int]:
        totals: dict[CostClass, int] = {}
        if self.empty:
            return totals
        for o in self.op_rows:
            cls = o.op.cost_class
            totals[cls] = totals.get(cls, 0) + o.op.macs(len(o.out_rows))
        return totals

    @property
    def in_bytes(self) -> int:
        return len(self.in_rows) * self.units[0].unit.in_row_bytes if self.units else 0

    @property
    def out_bytes(self) -> int:
        return len(self.out_rows) * self.units[-1].unit.out_row_bytes if self.units else 0

    @property
    def reductions(self) -> tuple[OpRows, ...]:
        return tuple(o for u in self.units for o in u.main if o.op.is_reduction)


def check_partition(parts: Sequence[Rows], height: int) -> None:
    """Raise ValueError unless `parts` are contiguous, in order, and cover `[0, height)`.

    Empty parts (a device that gets no rows) are allowed anywhere.
    """
    cursor = 0
    for part in parts:
        if part.empty:
            continue
        if part.start != cursor:
            raise ValueError(f"rows {part} do not continue from row {cursor}")
        cursor = part.stop
    if cursor != height:
        raise ValueError(f"partition ends at row {cursor}, the map has {height} rows")


def _shares(needed: Sequence[Rows], height: int) -> list[Rows]:
    """Disjoint shares of `[0, height)`, one per tile, each starting where its need starts.

    Tiles with nothing to compute own nothing; the last non-empty tile owns up to the end.
    """
    active = [i for i, rows in enumerate(needed) if not rows.empty]
    shares = [Rows(0, 0) for _ in needed]
    for position, i in enumerate(active):
        start = 0 if position == 0 else needed[i].start
        stop = height if position == len(active) - 1 else needed[active[position + 1]].start
        shares[i] = Rows(start, max(start, stop))
    return shares


def _ops_backwards(
    ops: Sequence[Op], outs: list[Rows], axis: Axis = "height"
) -> tuple[list[list[OpRows]], list[Rows]]:
    """Walk a branch backwards for all tiles at once; gates widen tiles to their shares."""
    per_tile: list[list[OpRows]] = [[] for _ in outs]
    current = list(outs)
    for op in reversed(ops):
        owned: list[Rows | None] = [None] * len(current)
        if op.is_reduction:
            shares = _shares(current, op.out_extent(axis))
            owned = list(shares)
            current = [rows.hull(share) for rows, share in zip(current, shares, strict=True)]
        ins = [op.input_rows(rows, axis) for rows in current]
        for i, rows in enumerate(current):
            per_tile[i].append(OpRows(op, ins[i], rows, owned[i]))
        current = ins
    for ops_rows in per_tile:
        ops_rows.reverse()
    return per_tile, current


def segment_tiles(
    units: Sequence[Unit], out_parts: Sequence[Rows], axis: Axis = "height"
) -> list[TileGeometry]:
    """The geometry of each tile of a fused segment, given the output row partition.

    `units` are consecutive spatial units; `out_parts` partition the segment's output
    rows (one per device, possibly empty). Each tile's input rows are derived
    backwards through the footprints, widened at each reduction so that the tiles'
    shares cover the reduced map exactly once.

    With `axis="width"` everything is about columns instead (a 2-D grid tile is a
    row geometry times a column geometry; its share of a gate is the product of
    the row share and the column share).
    """
    if not units:
        raise ValueError("a segment needs at least one unit")
    for unit in units:
        if not unit.spatial:
            raise ValueError(f"unit {unit.name} ({unit.kind}) cannot be split by rows")
    for before, after in itertools.pairwise(units):
        if after.index != before.index + 1:
            raise ValueError("segment units must be consecutive")
    check_partition(out_parts, units[-1].out_shape[1 if axis == "height" else 2])

    outs = list(out_parts)
    per_unit: list[list[UnitRows]] = [[] for _ in outs]
    for unit in reversed(units):
        main, main_in = _ops_backwards(unit.main, outs, axis)
        if unit.shortcut is not None:
            skip, skip_in = _ops_backwards(unit.shortcut, outs, axis)
            ins = [m.hull(s) for m, s in zip(main_in, skip_in, strict=True)]
        else:
            skip = [[] for _ in outs]
            ins = main_in
        for i in range(len(outs)):
            shortcut = tuple(skip[i]) if unit.shortcut is not None else None
            per_unit[i].append(UnitRows(unit, ins[i], outs[i], tuple(main[i]), shortcut))
        outs = ins
    tiles = []
    for i, unit_rows in enumerate(per_unit):
        unit_rows.reverse()
        empty = out_parts[i].empty
        in_rows = Rows(0, 0) if empty else unit_rows[0].in_rows
        tiles.append(TileGeometry(in_rows, out_parts[i], tuple(unit_rows)))
    return tiles


def grid_tile_macs(rows: TileGeometry, columns: TileGeometry) -> int:
    """Work for the 2-D tile `rows × columns` (halos included), from the two geometries.

    `rows` comes from `segment_tiles(...)` and `columns` from `segment_tiles(...,
    axis="width")` over the same units. Per-row MACs scale with the share of the
    output width the tile computes; the gate's dense layer is counted once per tile.
    """
    if rows.empty or columns.empty:
        return 0
    total = 0
    for by_row, by_column in zip(rows.op_rows, columns.op_rows, strict=True):
        op = by_row.op
        if op.kind in ("gap", "linear"):
            total += op.macs(len(by_row.out_rows))
            continue
        per_element = op.macs_per_row * len(by_row.out_rows) // op.out_width
        total += per_element * len(by_column.out_rows) + op.fixed_macs
    return total


def split_rows(height: int, weights: Sequence[float]) -> list[Rows]:
    """Split `[0, height)` into contiguous parts proportional to `weights` (largest remainder)."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    exact = [height * w / total for w in weights]
    counts = [int(x) for x in exact]
    leftovers = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in leftovers[: height - sum(counts)]:
        counts[i] += 1
    parts, cursor = [], 0
    for count in counts:
        parts.append(Rows(cursor, cursor + count))
        cursor += count
    return parts


def splittable_head(spec: ModelSpec) -> int | None:
    """The head unit whose first op is a linear layer on the whole last map, or None.

    Such a head can be split by the rows of the map it reads (`models.head_split`).

    Only when the head follows the last spatial unit directly: a global average
    pool in between already makes the tail small.
    """
    tail = spec.tail_units
    if len(tail) != 1 or tail[0].kind != "head" or tail[0].main[0].kind != "linear":
        return None
    return spec.units.index(tail[0])


# --- Channel tiles (see edgedi.models.channel_split) ---------------------------------


def channel_splittable(unit: Unit) -> bool:
    """A residual unit of two plain convolutions (a ResNet basic block)."""
    if unit.shortcut is None or len(unit.main) != 2:
        return False
    first, second = unit.main
    if first.kind != "conv" or second.kind != "conv" or first.groups != 1 or second.groups != 1:
        return False
    return all(op.kind == "conv" for op in unit.shortcut)


def hidden_channels(units: Sequence[Unit]) -> int:
    """The channel count a segment's channel parts divide: its first unit's hidden
    width (a later, wider unit takes each part scaled, see `unit_share`).

    Raises ValueError when a unit cannot be split by channels.
    """
    if not units:
        raise ValueError("a channel segment needs units")
    for unit in units:
        if not channel_splittable(unit):
            raise ValueError(f"unit {unit.index} ({unit.name}) cannot be split by channels")
    return units[0].main[0].out_channels


def unit_share(share: Rows, base: int, width: int) -> Rows:
    """Channel part `share` of `base` channels, scaled to a unit `width` channels wide.

    Floor scaling keeps the parts of a partition contiguous and covering: 0 stays 0
    and `base` becomes `width`.
    """
    return Rows(share.start * width // base, share.stop * width // base)


def reduction_ops(units: Sequence[Unit]) -> tuple[Op, ...]:
    """The op of each exchange, in order: every unit's second convolution."""
    return tuple(unit.main[1] for unit in units)


def check_channel_parts(parts: Sequence[Rows], channels: int) -> None:
    """Raise ValueError unless `parts` cover `[0, channels)` in order, once."""
    check_partition(parts, channels)
