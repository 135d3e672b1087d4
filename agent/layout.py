"""The tiles of a fused segment, as both the coordinator and the workers see them.

A tile task is self-contained: it names the model, the segment's units
(`first..last`), the segment's whole output partition (row parts, and column parts
for a grid) and the tile's index. From that alone any device recomputes the same
geometry with `edgedi.models.units.segment_tiles` — which rows and columns of the
input the tile needs, and which share of every attention gate's map it owns — so
a task can be re-dispatched to another device unchanged.

Tiles are numbered row-major: tile `k` is row part `k // columns` × column part
`k % columns` (one column part, the full width, for row strips). Empty parts are
left out of the partition: a tile with no output rows computes and owns nothing,
so dropping it changes nothing for the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from edgedi.broker.plan import Part as PlanPart
from edgedi.broker.plan import Segment as PlanSegment
from edgedi.models.units import (
    ModelSpec,
    Op,
    Rows,
    TileGeometry,
    Unit,
    check_channel_parts,
    hidden_channels,
    reduction_ops,
    segment_tiles,
    unit_share,
)

__all__ = [
    "LayoutError",
    "SegmentLayout",
    "TileAssignment",
    "plan_segment_layout",
    "segment_layout",
]


class LayoutError(ValueError):
    """A segment description that does not make a valid set of tiles."""


@dataclass(frozen=True)
class SegmentLayout:
    """All tiles of one segment of one model at one input size."""

    first: int
    last: int
    row_parts: tuple[Rows, ...]
    column_parts: tuple[Rows, ...] | None
    """None: row strips over the full width."""
    row_tiles: tuple[TileGeometry, ...]
    column_tiles: tuple[TileGeometry, ...]
    gates: tuple[Op, ...]
    """The segment's reductions in the order the tiles meet them: its attention gates,
    or for channel tiles every unit's second convolution (summed, not averaged)."""
    in_channels: int
    out_channels: int
    channel_parts: tuple[Rows, ...] | None = None
    """Channel tiles (`edgedi.models.channel_split`): tile k computes these hidden
    channels from the whole input map; `row_tiles[k]` then spans the whole input and
    its `out_rows` are the rows it sends on. None: row (or grid) tiles."""

    @property
    def sums(self) -> bool:
        """The reductions are channel tiles' partial sums, not gate means."""
        return self.channel_parts is not None

    def partial_shape(self, gate: int) -> tuple[int, ...]:
        """Shape of one tile's partial for reduction `gate`."""
        op = self.gates[gate]
        if self.sums:
            return (1, op.out_channels, op.out_height, op.out_width)
        return (1, op.out_channels)

    def partial_total(self, gate: int) -> int:
        """What the tiles' partials of reduction `gate` cover together: map positions of
        a gate, hidden channels of a channel segment."""
        if self.channel_parts is not None:
            return self.gates[gate].in_channels  # the unit's hidden width
        op = self.gates[gate]
        return op.out_height * op.out_width

    @property
    def count(self) -> int:
        return len(self.row_tiles) * len(self.column_tiles)

    def tile(self, index: int) -> tuple[TileGeometry, TileGeometry]:
        """(row geometry, column geometry) of tile `index`."""
        if not 0 <= index < self.count:
            raise LayoutError(f"tile {index} is outside the segment's {self.count} tiles")
        columns = len(self.column_tiles)
        return self.row_tiles[index // columns], self.column_tiles[index % columns]

    def gate_positions(self, index: int, gate: int) -> int:
        """Map positions tile `index` sums over for gate `gate` (its disjoint share);
        for channel tiles, the hidden channels it contributes."""
        if self.channel_parts is not None:
            base = self.channel_parts[-1].stop
            share = self.channel_parts[index]
            return len(unit_share(share, base, self.gates[gate].in_channels))
        rows, columns = self.tile(index)
        name = self.gates[gate].name
        for by_row, by_column in zip(rows.op_rows, columns.op_rows, strict=True):
            if by_row.op.name == name:
                if by_row.owned is None or by_column.owned is None:
                    return 0
                return len(by_row.owned) * len(by_column.owned)
        raise LayoutError(f"gate {name} is not in tile {index}")

    def input_shape(self, index: int) -> tuple[int, int, int, int]:
        """(batch 1, channels, rows, columns) of tile `index`'s input tensor."""
        rows, columns = self.tile(index)
        return (1, self.in_channels, len(rows.in_rows), len(columns.in_rows))


def _as_rows(intervals: Sequence[tuple[int, int]]) -> tuple[Rows, ...]:
    return tuple(Rows(int(start), int(stop)) for start, stop in intervals)


@lru_cache(maxsize=256)
def _cached_layout(
    spec: ModelSpec,
    first: int,
    last: int,
    row_parts: tuple[Rows, ...],
    column_parts: tuple[Rows, ...] | None,
    channel_parts: tuple[Rows, ...] | None = None,
) -> SegmentLayout:
    spatial = len(spec.spatial_units)
    if not 0 <= first <= last < spatial:
        raise LayoutError(
            f"units {first}..{last} are not a segment of {spec.name} "
            f"(spatial units 0..{spatial - 1})"
        )
    units: tuple[Unit, ...] = spec.units[first : last + 1]
    if not row_parts or any(part.empty for part in row_parts):
        raise LayoutError("a segment needs non-empty row parts")
    if column_parts is not None and (not column_parts or any(part.empty for part in column_parts)):
        raise LayoutError("column parts must be non-empty")
    if channel_parts is not None:
        return _channel_layout(spec, first, last, units, row_parts, column_parts, channel_parts)
    try:
        row_tiles = tuple(segment_tiles(units, row_parts))
        if column_parts is None:
            width = units[-1].out_shape[2]
            column_tiles = tuple(segment_tiles(units, [Rows(0, width)], axis="width"))
        else:
            column_tiles = tuple(segment_tiles(units, column_parts, axis="width"))
    except ValueError as error:
        raise LayoutError(f"units {first}..{last}: {error}") from error
    gates = tuple(op for unit in units for op in unit.main if op.kind == "gate")
    if gates and len(column_tiles) > 1:
        # The gate shares of a grid are row share × column share; they cover the map
        # exactly once only for a full product grid, which this layout is, but the
        # planners never emit it and it is not tested: refuse rather than guess.
        raise LayoutError("a segment with attention gates must be split into row strips")
    return SegmentLayout(
        first=first,
        last=last,
        row_parts=row_parts,
        column_parts=column_parts,
        row_tiles=row_tiles,
        column_tiles=column_tiles,
        gates=gates,
        in_channels=units[0].in_shape[0],
        out_channels=units[-1].out_shape[0],
    )


def _channel_layout(
    spec: ModelSpec,
    first: int,
    last: int,
    units: tuple[Unit, ...],
    row_parts: tuple[Rows, ...],
    column_parts: tuple[Rows, ...] | None,
    channel_parts: tuple[Rows, ...],
) -> SegmentLayout:
    """Channel tiles: each reads the whole input map and sends on its row part."""
    if column_parts is not None:
        raise LayoutError("channel tiles are row strips")
    if len(channel_parts) != len(row_parts):
        raise LayoutError(
            f"{len(channel_parts)} channel parts for {len(row_parts)} row parts: one each"
        )
    try:
        check_channel_parts(channel_parts, hidden_channels(units))
        height = units[-1].out_shape[1]
        whole = segment_tiles(units, [Rows(0, height)])[0]
        segment_tiles(units, row_parts)  # the routing rows partition the output
        width = units[-1].out_shape[2]
        column_tiles = tuple(segment_tiles(units, [Rows(0, width)], axis="width"))
    except ValueError as error:
        raise LayoutError(f"units {first}..{last}: {error}") from error
    row_tiles = tuple(
        TileGeometry(in_rows=whole.in_rows, out_rows=part, units=whole.units) for part in row_parts
    )
    return SegmentLayout(
        first=first,
        last=last,
        row_parts=row_parts,
        column_parts=None,
        row_tiles=row_tiles,
        column_tiles=column_tiles,
        gates=reduction_ops(units),
        in_channels=units[0].in_shape[0],
        out_channels=units[-1].out_shape[0],
        channel_parts=channel_parts,
    )


def segment_layout(
    spec: ModelSpec,
    first: int,
    last: int,
    row_parts: Sequence[tuple[int, int]],
    column_parts: Sequence[tuple[int, int]] | None = None,
    channel_parts: Sequence[tuple[int, int]] | None = None,
) -> SegmentLayout:
    """The layout a tile task describes (cached: every tile of a job asks for it)."""
    columns = None if column_parts is None else _as_rows(column_parts)
    channels = None if channel_parts is None else _as_rows(channel_parts)
    return _cached_layout(spec, first, last, _as_rows(row_parts), columns, channels)


@dataclass(frozen=True)
class TileAssignment:
    """Which device computes tile `index` of a segment."""

    index: int
    device: str
    compute_s: float = 0.0
    """The plan's predicted compute time of the tile on `device` (0: no prediction)."""
    expected_s: float = 0.0
    """The plan's predicted time from scatter to the tile's output (its segment's)."""


def plan_segment_layout(
    spec: ModelSpec, segment: PlanSegment
) -> tuple[SegmentLayout, tuple[TileAssignment, ...]]:
    """A plan segment's layout and who computes which tile.

    The plan's parts must form a product grid: every pair of a distinct row interval
    and a distinct column interval is exactly one part (row strips are the grid with
    one column). Parts without output are dropped.
    """
    width = segment.out_width
    parts = [part for part in segment.parts if not part.empty]
    if not parts:
        raise LayoutError(f"segment {segment.first_unit}..{segment.last_unit} has no tiles")
    full = all(part.cols is None or tuple(part.cols) == (0, width) for part in parts)
    rows = sorted({tuple(part.rows) for part in parts})
    columns = [(0, width)] if full else sorted({tuple(part.cols or (0, width)) for part in parts})
    owner: dict[tuple[tuple[int, int], tuple[int, int]], PlanPart] = {}
    for part in parts:
        key = (tuple(part.rows), (0, width) if full else tuple(part.cols or (0, width)))
        if key in owner:
            raise LayoutError(f"two parts compute rows {key[0]} × columns {key[1]}")
        owner[key] = part  # type: ignore[index]
    if len(owner) != len(rows) * len(columns):
        raise LayoutError(
            f"segment {segment.first_unit}..{segment.last_unit}: the parts are not a product grid"
        )
    channels = None
    if segment.channel_split:
        by_rows = {tuple(part.rows): part.channels for part in parts}
        channels = [by_rows[row] for row in rows]
    layout = segment_layout(
        spec,
        segment.first_unit,
        segment.last_unit,
        rows,  # type: ignore[arg-type]
        None if full else columns,  # type: ignore[arg-type]
        channels,  # type: ignore[arg-type]
    )
    assignments = []
    for index in range(layout.count):
        row_index, column_index = divmod(index, len(columns))
        part = owner[(rows[row_index], columns[column_index])]  # type: ignore[index]
        expected = segment.predicted.total_s or part.compute_s
        assignments.append(TileAssignment(index, part.device, part.compute_s, expected))
    return layout, tuple(assignments)
