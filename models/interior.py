"""The interior of a row tile: output rows computable before its halo arrives.

On the direct data plane a tile's input comes in pieces: the rows its own device
made in the segment before (the moment that tile ends) and its halo, a few rows on
each side from the neighbouring tiles' devices (a broker hop later, after the
slower of them ends). Until session 11 a tile waited for all of them; every
segment boundary then cost each device the wait for its slowest neighbour.

The output rows whose inputs have all arrived can be computed meanwhile: the
worker (`edgedi.agent.worker`) computes that interior as a tile of its own, and the
edges once the halo is in; the planner's replay (`edgedi.planner.replay`) prices it
the same way. Each part is a tile of the same segment (`models.units.segment_tiles` on a
finer partition of the segment's output), computed from exactly the input rows it
needs, so the stitched output equals the whole tile's up to floating-point
summation order (a convolution over fewer rows may pick another kernel).

Only plain row tiles qualify: a tile with attention gates needs every position's
partial before its first gate (its rows cannot be split in time), and channel
tiles take their whole map from one message.

Pure: geometry and masks, no torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from edgedi.models.units import Rows, TileGeometry, Unit, segment_tiles

__all__ = [
    "EARLY_SHARE",
    "MAX_SPLIT_COST",
    "UnitCosts",
    "interior_to_compute",
    "output_inputs",
    "part_geometry",
    "ready_interior",
    "split_pays",
    "tile_seconds",
]

# An interior worth computing on its own: at least this share of the tile's output
# rows (a sliver costs its fixed per-op costs twice for little overlap).
EARLY_SHARE = 0.25
# ... and its three parts together cost at most this much more than the whole tile,
# by the device's measured unit costs. Each part pays every op's fixed cost: a
# ResNet-34 tile of 13 rows of a 50x50 map took 1.8 ms whole and 3.0 ms in three
# parts on one core, a VGG-16 tile of 50 rows of a 100x100 map hardly more.
MAX_SPLIT_COST = 0.1

UnitCosts = Sequence[tuple[float, float]]
"""Per spatial unit (by index): seconds per multiply-add and seconds per op
invocation, as a device measured them (`UnitProfile.units`, `UnitTimes.units`)."""


def _partition(height: int, parts: Sequence[Rows]) -> list[Rows]:
    """`parts` (consecutive) completed to a partition of [0, height)."""
    outs = [Rows(0, parts[0].start), *parts, Rows(parts[-1].stop, height)]
    return outs


@lru_cache(maxsize=512)
def output_inputs(units: tuple[Unit, ...], out: Rows) -> tuple[Rows, ...]:
    """The segment input rows each output row of `out` needs, row by row."""
    height = units[-1].out_shape[1]
    singles = [Rows(row, row + 1) for row in range(out.start, out.stop)]
    tiles = segment_tiles(units, _partition(height, singles))
    return tuple(tile.in_rows for tile in tiles[1:-1])


@lru_cache(maxsize=512)
def part_geometry(units: tuple[Unit, ...], part: Rows) -> TileGeometry:
    """The geometry of output rows `part` of the segment, as a tile of its own."""
    height = units[-1].out_shape[1]
    return segment_tiles(units, _partition(height, [part]))[1]


def ready_interior(
    inputs: Sequence[Rows], out: Rows, in_start: int, received: npt.NDArray[np.bool_]
) -> Rows | None:
    """The longest run of output rows of `out` whose inputs have all arrived.

    `inputs[k]` is what output row `out.start + k` needs (`output_inputs`);
    `received[i]` says whether input row `in_start + i` is in. None when that run
    is shorter than `EARLY_SHARE` of the tile, or is the whole tile (then the tile
    is not waiting)."""
    missing = np.concatenate(([0], np.cumsum(~received)))
    best: Rows | None = None
    run_start: int | None = None
    for k, rows in enumerate([*inputs, None]):
        ready = rows is not None and (
            missing[rows.stop - in_start] - missing[rows.start - in_start] == 0
        )
        if ready and run_start is None:
            run_start = k
        elif not ready and run_start is not None:
            if best is None or k - run_start > len(best):
                best = Rows(out.start + run_start, out.start + k)
            run_start = None
    if best is None or len(best) == len(out) or len(best) < EARLY_SHARE * len(out):
        return None
    return best


def tile_seconds(geometry: TileGeometry, costs: UnitCosts) -> float:
    """A gate-free tile's compute time by per-unit costs, op by op (as the planner's
    `tile_phases` prices it)."""
    if geometry.empty:
        return 0.0
    total = 0.0
    for unit_rows in geometry.units:
        per_mac, fixed = costs[unit_rows.unit.index]
        for item in (*unit_rows.main, *(unit_rows.shortcut or ())):
            total += per_mac * item.op.macs(len(item.out_rows)) + fixed
    return total


def split_pays(
    units: tuple[Unit, ...], tile: TileGeometry, interior: Rows, costs: UnitCosts
) -> bool:
    """Whether computing `tile` as interior and edges costs at most `MAX_SPLIT_COST`
    more than computing it whole."""
    out = tile.out_rows
    parts = (Rows(out.start, interior.start), interior, Rows(interior.stop, out.stop))
    split = sum(tile_seconds(part_geometry(units, p), costs) for p in parts if not p.empty)
    return split <= (1 + MAX_SPLIT_COST) * tile_seconds(tile, costs)


def interior_to_compute(
    units: tuple[Unit, ...], tile: TileGeometry, received: npt.NDArray[np.bool_], costs: UnitCosts
) -> Rows | None:
    """The output rows of `tile` to compute before the rest of its input is in: as
    many as the input rows `received` so far allow (`received[i]`: row
    `tile.in_rows.start + i`), if splitting the tile pays by `costs`."""
    interior = ready_interior(
        output_inputs(units, tile.out_rows), tile.out_rows, tile.in_rows.start, received
    )
    if interior is None or not split_pays(units, tile, interior, costs):
        return None
    return interior
