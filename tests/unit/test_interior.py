"""Which output rows of a direct tile can be computed before its halo arrives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgedi.models.interior import EARLY_SHARE, output_inputs, part_geometry, ready_interior
from edgedi.models.specs import get_spec
from edgedi.models.tiling import run_tile
from edgedi.models.units import Rows, TileGeometry, Unit, segment_tiles
from edgedi.models.zoo import ZooModel, build_model

SIZE = 64


def _tile(
    model: str, first: int, last: int, parts: list[Rows], index: int
) -> tuple[tuple[Unit, ...], TileGeometry]:
    units = tuple(get_spec(model, SIZE).units[first : last + 1])
    return units, segment_tiles(units, parts)[index]


def test_each_output_row_needs_the_rows_its_receptive_field_covers() -> None:
    units, tile = _tile("resnet18", 2, 2, [Rows(0, 6), Rows(6, 12), Rows(12, 16)], 1)
    inputs = output_inputs(units, tile.out_rows)
    assert len(inputs) == len(tile.out_rows)
    # A residual block of two 3x3 convolutions: two rows on each side.
    assert inputs[0] == Rows(4, 9) and inputs[-1] == Rows(9, 14)
    hull = inputs[0].hull(inputs[-1])
    assert hull == tile.in_rows


def test_the_interior_is_what_the_own_rows_alone_give() -> None:
    units, tile = _tile("resnet18", 2, 2, [Rows(0, 4), Rows(4, 14), Rows(14, 16)], 1)
    out, first = tile.out_rows, tile.in_rows.start
    inputs = output_inputs(units, out)
    received = np.zeros(len(tile.in_rows), dtype=bool)
    assert ready_interior(inputs, out, first, received) is None  # nothing yet
    received[out.start - first : out.stop - first] = True  # its own rows
    assert ready_interior(inputs, out, first, received) == Rows(6, 12)
    received[:] = True
    assert ready_interior(inputs, out, first, received) is None  # not waiting: whole
    received[:] = False
    received[: 2 + 3] = True  # the upper halo and three own rows: one row computable
    assert ready_interior(inputs, out, first, received) is None  # below EARLY_SHARE
    assert EARLY_SHARE * len(out) > 1


@pytest.mark.parametrize(("model", "first", "last"), [("resnet18", 1, 3), ("vgg16", 0, 3)])
def test_parts_stitched_equal_the_whole_tile(model: str, first: int, last: int) -> None:
    net = build_model(model, SIZE, seed=0)
    units = tuple(net.spec.units[first : last + 1])
    height = units[-1].out_shape[1]
    parts = [Rows(0, height // 3), Rows(height // 3, height), Rows(height, height)]
    tile = segment_tiles(units, parts)[1]
    x = torch.randn(1, units[0].in_shape[0], len(tile.in_rows), units[0].in_shape[2])
    with torch.no_grad():
        whole = _run(net, tile, x)
        interior = Rows(tile.out_rows.start + 2, tile.out_rows.stop - 3)
        pieces = []
        for part in (
            Rows(tile.out_rows.start, interior.start),
            interior,
            Rows(interior.stop, tile.out_rows.stop),
        ):
            geometry = part_geometry(units, part)
            assert tile.in_rows.contains(geometry.in_rows)
            rows = x[
                :,
                :,
                geometry.in_rows.start - tile.in_rows.start : geometry.in_rows.stop
                - tile.in_rows.start,
            ]
            pieces.append(_run(net, geometry, rows))
    stitched = torch.cat(pieces, dim=2)
    torch.testing.assert_close(stitched, whole, rtol=0, atol=1e-5)


def _run(net: ZooModel, geometry: TileGeometry, x: torch.Tensor) -> torch.Tensor:
    runner = run_tile(net, geometry, x)
    try:
        next(runner)
    except StopIteration as done:
        return done.value
    raise AssertionError("a tile without gates stopped at a gate")
