"""Exact tiled execution: run a fused segment on a tile and get exactly the full pass's rows.

A worker gets the rows `geometry.in_rows` of a segment's input (see
`edgedi.models.units.segment_tiles`) and computes the rows `geometry.out_rows` of the
segment's output, bit-for-bit the same computation as the whole forward pass up to
fp32 summation order. Every op sees only its own input rows; the zero padding of a
conv (and the -inf padding of a max pool) is applied only where the tile touches a
true border of the map, and the width axis is padded as usual. A 2-D (grid) tile
adds a column geometry (`segment_tiles(..., axis="width")`), full width by default.

Reductions are not local. At each attention gate the tile stops, hands out a
`GatePartial` (float64 per-channel sums over the rows and columns it *owns* at that
gate, and how many elements that is), and resumes once it is sent the combined
per-channel mean of the whole map. `run_tile` is therefore a generator:

    runner = run_tile(model, geometry, x_tile)
    partial = next(runner)                  # StopIteration at once if no gates
    while True:
        mean = ...                          # combine_partials over all tiles' partials
        try:
            partial = runner.send(mean)
        except StopIteration as done:
            output_tile = done.value
            break

which lets the tiles of a segment live on different threads or devices: only the
partials and the combined means travel. Every tile of a segment yields exactly one
partial per gate of the segment, in order, also a tile with no rows (its partial
is all zeros with a count of 0), so a coordinator can simply wait for all tiles.

`gate_mode="local"` is the EdgeDI approximation (each tile pools the gate input it
holds, no synchronisation); it exists to measure its cost and is never the default.

`run_segment_local` and `run_partitioned` drive all tiles in this process, combining
the partials exactly, and stitch the result; they are the reference the agent's
distributed runtime must agree with.

Everything runs under `torch.inference_mode` with the module's weights through
`torch.nn.functional`, fp32, batch norm in eval mode.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from edgedi.models.reduce import CoverageError, Reduce, combine, stitch_grid
from edgedi.models.units import OpRows, Rows, TileGeometry, Unit, UnitRows, segment_tiles
from edgedi.models.zoo import ConvOp, GateOp, OpModule, PoolOp, ZooModel

__all__ = [
    "GateMode",
    "GatePartial",
    "GateValue",
    "Segment",
    "TileRunner",
    "combine_partials",
    "drive_tiles",
    "full_width",
    "gap_partial",
    "run_partitioned",
    "run_segment_local",
    "run_tail",
    "run_tile",
    "stitch",
]

GateMode = Literal["exact", "local"]
GateValue = npt.NDArray[np.float64] | torch.Tensor
TileRunner = Generator["GatePartial", GateValue, torch.Tensor]


@dataclass(frozen=True, eq=False)
class GatePartial:
    """One tile's share of a reduction: what a worker publishes at a gate.

    `sums` are float64 per-channel sums, shape (batch, channels), over the rows and
    columns the tile owns at this gate; `count` is how many positions that is, and
    `map_count` how many the whole map has (the counts of all tiles add up to it).
    `index` numbers the segment's reductions from 0; `unit_index` / `op_index` say
    which op of the model it is (for the final global pool, the gap unit's op 0).
    """

    index: int
    unit_index: int
    op_index: int
    name: str
    sums: npt.NDArray[Any] = field(repr=False)
    count: int
    map_count: int
    reduce: Reduce = "mean"
    """"mean": an attention gate's per-channel mean; "sum": a channel tile's partial
    sums of a convolution (`edgedi.models.channel_split`), where `count` and
    `map_count` count hidden channels instead of positions."""


def combine_partials(partials: Iterable[GatePartial]) -> npt.NDArray[np.float64]:
    """The exact per-channel mean (batch, channels) from all tiles' partials of one gate
    (for `reduce="sum"` partials: their exact sum, float64, in the order given).

    Raises ValueError when the partials belong to different gates, disagree in shape,
    or do not cover the map exactly once (a tile missing or counted twice).
    """
    partials = list(partials)
    if not partials:
        raise ValueError("no partials to combine")
    first = partials[0]
    for partial in partials:
        if (partial.unit_index, partial.op_index) != (first.unit_index, first.op_index):
            raise ValueError(f"partials of {first.name} and {partial.name} cannot be combined")
        if partial.sums.shape != first.sums.shape:
            raise ValueError(
                f"{first.name}: partial shapes {first.sums.shape} and {partial.sums.shape} differ"
            )
    try:
        return combine(
            ((partial.sums, partial.count) for partial in partials),
            first.sums.shape,
            first.map_count,
            first.reduce,
        )
    except CoverageError as error:
        raise ValueError(f"{first.name}: {error}") from None


# --- One tile --------------------------------------------------------------------------


def full_width(units: Sequence[Unit]) -> TileGeometry:
    """The column geometry of a tile that spans the whole width (a row strip)."""
    width = units[-1].out_shape[2]
    return segment_tiles(units, [Rows(0, width)], axis="width")[0]


def _slice(x: torch.Tensor, cover: tuple[Rows, Rows], rows: Rows, columns: Rows) -> torch.Tensor:
    """The part of `x` (which holds rows × columns `cover`) at `rows` × `columns`."""
    have_rows, have_columns = cover
    if not (have_rows.contains(rows) and have_columns.contains(columns)):
        raise AssertionError(f"tile holds {cover}, op needs {rows} × {columns}")
    if rows == have_rows and columns == have_columns:
        return x
    top, left = rows.start - have_rows.start, columns.start - have_columns.start
    return x[:, :, top : top + len(rows), left : left + len(columns)]


def _border_padding(by_row: OpRows, by_column: OpRows) -> tuple[int, int, int, int]:
    """(left, right, top, bottom): the padding the full pass adds where this tile has it.

    The required window reaches outside the map only at true borders; inside the
    map the tile already holds the rows the window needs, so no padding goes there.
    """
    op = by_row.op
    need_rows = op.required_rows(by_row.out_rows)
    need_columns = op.required_rows(by_column.out_rows, "width")
    return (
        by_column.in_rows.start - need_columns.start,
        need_columns.stop - by_column.in_rows.stop,
        by_row.in_rows.start - need_rows.start,
        need_rows.stop - by_row.in_rows.stop,
    )


def _window_op(
    module: ConvOp | PoolOp, by_row: OpRows, by_column: OpRows, x: torch.Tensor
) -> torch.Tensor:
    left, right, top, bottom = _border_padding(by_row, by_column)
    op = by_row.op
    symmetric = top == bottom and left == right
    padding = (top, left) if symmetric else (0, 0)
    if not symmetric:
        fill = 0.0 if isinstance(module, ConvOp) else float("-inf")
        x = F.pad(x, (left, right, top, bottom), value=fill)
    if isinstance(module, ConvOp):
        conv = module.conv
        y = F.conv2d(x, conv.weight, conv.bias, op.stride, padding, op.dilation, op.groups)
        y = module.finish(y)
    else:
        # max_pool2d pads with -inf itself, like the full pass's pooling does.
        y = F.max_pool2d(x, op.kernel, op.stride, padding, op.dilation)
    expected = (len(by_row.out_rows), len(by_column.out_rows))
    if tuple(y.shape[2:]) != expected:
        raise AssertionError(f"{op.name}: tile made {tuple(y.shape[2:])}, expected {expected}")
    return y


def _gate_step(
    module: GateOp,
    by_row: OpRows,
    by_column: OpRows,
    x: torch.Tensor,
    index: int,
    unit_index: int,
    op_index: int,
    gate_mode: GateMode,
) -> Generator[GatePartial, GateValue, torch.Tensor]:
    op = by_row.op
    if gate_mode == "local":
        with torch.inference_mode():
            # Accumulated in float64 as the exact reduction is, so that a tile that
            # is the whole map gets the very same gate value without a round trip.
            local = x.sum(dim=(2, 3), dtype=torch.float64) / (x.shape[2] * x.shape[3])
            return module.rescale(x, local.to(torch.float32))
    owned_rows, owned_columns = by_row.owned, by_column.owned
    assert owned_rows is not None and owned_columns is not None, op.name
    with torch.inference_mode():
        region = _slice(x, (by_row.in_rows, by_column.in_rows), owned_rows, owned_columns)
        sums = region.sum(dim=(2, 3), dtype=torch.float64).numpy()
    partial = GatePartial(
        index=index,
        unit_index=unit_index,
        op_index=op_index,
        name=op.name,
        sums=sums,
        count=len(owned_rows) * len(owned_columns),
        map_count=op.out_height * op.out_width,
    )
    mean = yield partial
    with torch.inference_mode():
        value = torch.as_tensor(mean).to(torch.float32)
        if value.dim() == 1:
            value = value.unsqueeze(0)
        if tuple(value.shape) != tuple(sums.shape):
            raise ValueError(
                f"{op.name}: gate value of shape {tuple(value.shape)}, expected {tuple(sums.shape)}"
            )
        return module.rescale(x, value)


class _Counter:
    """Numbers the reductions of a segment as a tile meets them."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def _branch(
    modules: Sequence[OpModule],
    by_rows: Sequence[OpRows],
    by_columns: Sequence[OpRows],
    x: torch.Tensor,
    cover: tuple[Rows, Rows],
    unit_index: int,
    counter: _Counter,
    gate_mode: GateMode,
) -> Generator[GatePartial, GateValue, torch.Tensor]:
    for op_index, (module, by_row, by_column) in enumerate(
        zip(modules, by_rows, by_columns, strict=True)
    ):
        x = _slice(x, cover, by_row.in_rows, by_column.in_rows)
        if isinstance(module, GateOp):
            x = yield from _gate_step(
                module, by_row, by_column, x, counter.take(), unit_index, op_index, gate_mode
            )
        elif isinstance(module, ConvOp | PoolOp):
            with torch.inference_mode():
                x = _window_op(module, by_row, by_column, x)
        else:
            raise ValueError(f"{by_row.op.name} ({by_row.op.kind}) cannot run on a tile")
        cover = (by_row.out_rows, by_column.out_rows)
    return x


def _unit_step(
    model: ZooModel,
    by_row: UnitRows,
    by_column: UnitRows,
    x: torch.Tensor,
    counter: _Counter,
    gate_mode: GateMode,
) -> Generator[GatePartial, GateValue, torch.Tensor]:
    unit = by_row.unit
    module = model.unit(unit.index)
    cover = (by_row.in_rows, by_column.in_rows)
    y = yield from _branch(
        module.main_ops, by_row.main, by_column.main, x, cover, unit.index, counter, gate_mode
    )
    shortcut = module.shortcut_ops
    if shortcut is None:
        return y
    assert by_row.shortcut is not None and by_column.shortcut is not None
    if shortcut:
        skip = yield from _branch(
            shortcut,
            by_row.shortcut,
            by_column.shortcut,
            x,
            cover,
            unit.index,
            counter,
            gate_mode,
        )
    else:
        skip = _slice(x, cover, by_row.out_rows, by_column.out_rows)
    with torch.inference_mode():
        return F.relu(y + skip)


def _empty_tile(
    model: ZooModel,
    geometry: TileGeometry,
    columns: TileGeometry,
    x: torch.Tensor,
    gate_mode: GateMode,
) -> Generator[GatePartial, GateValue, torch.Tensor]:
    """A tile with no output still takes part in every gate round, with nothing to add."""
    batch = x.shape[0]
    index = 0
    if gate_mode == "exact":
        for unit_rows in geometry.units:
            for op_index, op in enumerate(unit_rows.unit.main):
                if op.kind != "gate":
                    continue
                sums = np.zeros((batch, op.out_channels), dtype=np.float64)
                map_count = op.out_height * op.out_width
                yield GatePartial(
                    index, unit_rows.unit.index, op_index, op.name, sums, 0, map_count
                )
                index += 1
    channels = geometry.units[-1].unit.out_shape[0]
    return torch.zeros(batch, channels, len(geometry.out_rows), len(columns.out_rows))


def _check_tile(
    model: ZooModel, geometry: TileGeometry, columns: TileGeometry, x: torch.Tensor
) -> None:
    if not geometry.units or len(geometry.units) != len(columns.units):
        raise ValueError("row and column geometries must describe the same, non-empty segment")
    for by_row, by_column in zip(geometry.units, columns.units, strict=True):
        unit = by_row.unit
        if unit.index >= len(model.spec.units) or model.spec.units[unit.index] != unit:
            raise ValueError(
                f"unit {unit.index} ({unit.name}) is not a unit of {model.name} "
                f"at {model.spec.input_shape[1]} px"
            )
        if by_column.unit != unit:
            raise ValueError("row and column geometries describe different units")
    channels = geometry.units[0].unit.in_shape[0]
    expected = (channels, len(geometry.in_rows), len(columns.in_rows))
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"tile input has shape {tuple(x.shape)}, expected (batch, *{expected})")


def run_tile(
    model: ZooModel,
    geometry: TileGeometry,
    x_tile: torch.Tensor,
    *,
    columns: TileGeometry | None = None,
    gate_mode: GateMode = "exact",
) -> TileRunner:
    """Run one tile of a fused segment: a generator, see the module docstring.

    `x_tile` holds rows `geometry.in_rows` (and columns `columns.in_rows`, the whole
    width by default; without `columns` it may hold every column of the map) of the
    segment's input; the generator's return value holds rows
    `geometry.out_rows` × columns `columns.out_rows` of the segment's output. The
    arguments are checked here, before the first step.
    """
    if gate_mode not in ("exact", "local"):
        raise ValueError(f"gate mode must be 'exact' or 'local', got {gate_mode!r}")
    if columns is None:
        columns = full_width([unit_rows.unit for unit_rows in geometry.units])
        # A strip may come with every column of the map although floor rounding leaves
        # the last ones unread (a 2x2 pool on 25 columns reads 24): take what is needed.
        width = geometry.units[0].unit.in_shape[2]
        needed = columns.in_rows
        if x_tile.dim() == 4 and x_tile.shape[3] == width != len(needed):
            x_tile = x_tile[:, :, :, needed.start : needed.stop]
    _check_tile(model, geometry, columns, x_tile)
    if geometry.empty or columns.empty:
        return _empty_tile(model, geometry, columns, x_tile, gate_mode)
    return _run_tile(model, geometry, columns, x_tile, gate_mode)


def _run_tile(
    model: ZooModel,
    geometry: TileGeometry,
    columns: TileGeometry,
    x: torch.Tensor,
    gate_mode: GateMode,
) -> TileRunner:
    counter = _Counter()
    for by_row, by_column in zip(geometry.units, columns.units, strict=True):
        x = yield from _unit_step(model, by_row, by_column, x, counter, gate_mode)
    return x


# --- All tiles of a segment, in this process ----------------------------------------------


def drive_tiles(runners: Sequence[TileRunner]) -> list[torch.Tensor]:
    """Advance all tiles of a segment in lock step, combining each gate's partials exactly."""
    results: list[torch.Tensor | None] = [None] * len(runners)
    pending: dict[int, GatePartial] = {}
    for position, runner in enumerate(runners):
        try:
            pending[position] = next(runner)
        except StopIteration as done:
            results[position] = done.value
    while pending:
        if len(pending) != len(runners):
            raise RuntimeError("the tiles of a segment disagree on the number of gates")
        mean = combine_partials(pending.values())
        waiting: dict[int, GatePartial] = {}
        for position in pending:
            try:
                waiting[position] = runners[position].send(mean)
            except StopIteration as done:
                results[position] = done.value
        pending = waiting
    finished = [result for result in results if result is not None]
    if len(finished) != len(runners):
        raise RuntimeError("a tile stopped without an output")
    return finished


def stitch(tiles: Sequence[torch.Tensor], row_count: int, column_count: int = 1) -> torch.Tensor:
    """Put the tiles of a grid (row-major, `row_count` × `column_count`) back together."""
    return stitch_grid(tiles, row_count, column_count, _cat)


def _cat(pieces: list[torch.Tensor], axis: int) -> torch.Tensor:
    return torch.cat(pieces, dim=axis)


def _tile_outputs(
    model: ZooModel,
    units: Sequence[Unit],
    parts: Sequence[Rows],
    x: torch.Tensor,
    columns: Sequence[Rows] | None,
    gate_mode: GateMode,
) -> list[torch.Tensor]:
    row_tiles = segment_tiles(units, parts)
    if columns is None:
        column_tiles = [full_width(units)]
    else:
        column_tiles = segment_tiles(units, columns, axis="width")
    runners = []
    for by_row in row_tiles:
        for by_column in column_tiles:
            rows, cols = by_row.in_rows, by_column.in_rows
            tile_input = x[:, :, rows.start : rows.stop, cols.start : cols.stop]
            runners.append(
                run_tile(model, by_row, tile_input, columns=by_column, gate_mode=gate_mode)
            )
    return drive_tiles(runners)


def run_segment_local(
    model: ZooModel,
    units: Sequence[Unit],
    parts: Sequence[Rows],
    x: torch.Tensor,
    *,
    columns: Sequence[Rows] | None = None,
    gate_mode: GateMode = "exact",
) -> torch.Tensor:
    """Run a fused segment as `len(parts)` row tiles (× `len(columns)` column tiles).

    `x` is the segment's whole input map; `parts` (and `columns`) partition its output
    rows (columns). All tiles run in this process; the stitched output is returned.
    """
    tiles = _tile_outputs(model, units, parts, x, columns, gate_mode)
    return stitch(tiles, len(parts), 1 if columns is None else len(columns))


class Segment(NamedTuple):
    """A fused run of units `first..last` (inclusive) and how its output is partitioned."""

    first: int
    last: int
    rows: Sequence[Rows]
    columns: Sequence[Rows] | None = None


def gap_partial(model: ZooModel, tile_output: torch.Tensor, index: int = 0) -> GatePartial:
    """A tile's share of the final global average pool (its output rows are disjoint)."""
    tail = model.spec.tail_units
    if not tail or tail[0].kind != "gap":
        raise ValueError(f"{model.name} does not start its tail with a global average pool")
    gap = tail[0]
    with torch.inference_mode():
        sums = tile_output.sum(dim=(2, 3), dtype=torch.float64).numpy()
    _channels, height, width = gap.in_shape
    count = tile_output.shape[2] * tile_output.shape[3]
    return GatePartial(index, gap.index, 0, gap.main[0].name, sums, count, height * width)


def run_tail(
    model: ZooModel,
    first: int,
    x: torch.Tensor | None = None,
    *,
    pooled: GateValue | None = None,
) -> torch.Tensor:
    """Run units `first..` on one device: from the whole map `x`, or, when unit `first`
    is the global average pool, from its combined per-channel mean `pooled`."""
    with torch.inference_mode():
        if pooled is not None:
            if model.spec.units[first].kind != "gap":
                raise ValueError(f"unit {first} is not a global average pool")
            value = torch.as_tensor(pooled).to(torch.float32)
            return model.run_units(value[:, :, None, None], first + 1)
        if x is None:
            raise ValueError("run_tail needs the map x or the pooled vector")
        return model.run_units(x, first)


def _check_segments(model: ZooModel, segments: Sequence[Segment]) -> None:
    spatial = len(model.spec.spatial_units)
    cursor = 0
    for segment in segments:
        if segment.first != cursor or segment.last < segment.first:
            raise ValueError(
                f"segment {segment.first}..{segment.last} does not continue from unit {cursor}"
            )
        cursor = segment.last + 1
    if cursor != spatial:
        raise ValueError(
            f"segments end at unit {cursor - 1}; {model.name} has spatial units 0..{spatial - 1}"
        )


def run_partitioned(
    model: ZooModel,
    segments: Sequence[
        Segment
        | tuple[int, int, Sequence[Rows]]
        | tuple[int, int, Sequence[Rows], Sequence[Rows] | None]
    ],
    x: torch.Tensor,
    *,
    gate_mode: GateMode = "exact",
) -> torch.Tensor:
    """The logits of `model` on `x`, every spatial segment run as tiles, the tail whole.

    `segments` cover the spatial units in order. When the tail starts with a global
    average pool, the last segment's tiles are never stitched: the pool is combined
    from their partial sums, as a distributed run would do it.
    """
    plan = [Segment(*segment) for segment in segments]
    _check_segments(model, plan)
    for position, segment in enumerate(plan):
        units = model.spec.units[segment.first : segment.last + 1]
        tiles = _tile_outputs(model, units, segment.rows, x, segment.columns, gate_mode)
        last = position == len(plan) - 1
        tail = model.spec.tail_units
        if last and tail and tail[0].kind == "gap":
            pooled = combine_partials(gap_partial(model, tile) for tile in tiles)
            return run_tail(model, segment.last + 1, pooled=pooled)
        columns = 1 if segment.columns is None else len(segment.columns)
        x = stitch(tiles, len(segment.rows), columns)
    return run_tail(model, plan[-1].last + 1, x)
