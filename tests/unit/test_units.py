"""The torch-free model description: row intervals, partitions, tile geometry, zoo specs."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgedi.models.specs import MODEL_NAMES, UnknownModelError, get_spec
from edgedi.models.units import (
    ModelSpec,
    Rows,
    TileGeometry,
    Unit,
    check_partition,
    grid_tile_macs,
    segment_tiles,
    split_rows,
)

# Small inputs with odd map sizes somewhere (floor pooling, stride-2 rounding).
SMALL_SIZE = {"tiny": 45, "tiny-edgedi": 45, "vgg16": 56, "vgg16-edgedi": 56}
RESNET_SIZE = 72


def small_spec(name: str) -> ModelSpec:
    return get_spec(name, SMALL_SIZE.get(name, RESNET_SIZE))


# --- Rows ------------------------------------------------------------------------------


def test_rows_basics() -> None:
    assert len(Rows(3, 7)) == 4
    assert len(Rows(5, 2)) == 0 and Rows(5, 2).empty and Rows(4, 4).empty
    assert Rows(2, 4).hull(Rows(6, 9)) == Rows(2, 9)
    assert Rows(0, 0).hull(Rows(6, 9)) == Rows(6, 9)
    assert Rows(6, 9).hull(Rows(3, 3)) == Rows(6, 9)
    assert Rows(-2, 12).clamp(10) == Rows(0, 10)
    assert Rows(2, 8).contains(Rows(3, 8)) and not Rows(2, 8).contains(Rows(1, 3))
    assert Rows(2, 8).contains(Rows(20, 20))  # the empty interval is everywhere
    assert Rows(5, 9).shift(5) == Rows(0, 4)


# --- Partitions ---------------------------------------------------------------------------


def test_check_partition_accepts_empty_parts_anywhere() -> None:
    check_partition([Rows(0, 0), Rows(0, 4), Rows(4, 4), Rows(4, 10), Rows(0, 0)], 10)
    check_partition([Rows(0, 10)], 10)


@pytest.mark.parametrize(
    "parts",
    [
        [Rows(0, 4), Rows(5, 10)],  # gap
        [Rows(0, 5), Rows(4, 10)],  # overlap
        [Rows(0, 4), Rows(4, 9)],  # short
        [Rows(4, 10), Rows(0, 4)],  # out of order
        [Rows(0, 11)],  # too long
        [],
    ],
)
def test_check_partition_rejects(parts: list[Rows]) -> None:
    with pytest.raises(ValueError):
        check_partition(parts, 10)


@given(
    height=st.integers(0, 300),
    weights=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=9).filter(
        lambda w: sum(w) > 0
    ),
)
def test_split_rows_is_a_proportional_partition(height: int, weights: list[float]) -> None:
    parts = split_rows(height, weights)
    assert len(parts) == len(weights)
    check_partition(parts, height)
    total = sum(weights)
    for part, weight in zip(parts, weights, strict=True):
        assert abs(len(part) - height * weight / total) < 1.0 + 1e-9
        if weight == 0:
            assert part.empty


@pytest.mark.parametrize("weights", [[], [0.0, 0.0], [1.0, -1.0]])
def test_split_rows_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError):
        split_rows(10, weights)


# --- Zoo specs ----------------------------------------------------------------------------


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError) as caught:
        get_spec("vgg19")
    assert isinstance(caught.value, KeyError)
    message = str(caught.value)
    assert "vgg19" in message and all(name in message for name in MODEL_NAMES)


def test_input_too_small_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        get_spec("vgg16", 16)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_spec_is_a_consistent_chain(name: str) -> None:
    spec = get_spec(name)
    assert spec.input_shape == (1, 200, 200) and spec.num_classes == 6
    assert spec.units[-1].kind == "head" and spec.units[-1].out_shape == (6, 1, 1)
    assert spec.digest() == get_spec(name).digest()
    for unit in spec.units:
        for op in unit.ops:
            assert op.params >= 0 and op.macs() > 0
    gates = sum(unit.reductions for unit in spec.units)
    assert (gates > 0) == name.endswith("-edgedi")


def test_odd_sizes_at_200_pixels() -> None:
    vgg = {unit.name: unit for unit in get_spec("vgg16").units}
    assert vgg["pool4"].in_shape[1:] == (25, 25) and vgg["pool4"].out_shape[1:] == (12, 12)
    assert vgg["head"].in_shape == (512, 6, 6)
    resnet = {unit.name: unit for unit in get_spec("resnet18").units}
    assert resnet["layer3.0"].out_shape == (256, 13, 13)
    assert resnet["layer4.0"].out_shape == (512, 7, 7)


def test_compact_models_are_small_and_cheap() -> None:
    for plain in ("vgg16", "resnet18", "resnet34"):
        full, compact = get_spec(plain), get_spec(f"{plain}-edgedi")
        assert compact.params * 4 < 5 * 2**20  # a checkpoint of a few MB
        assert compact.macs * 4 < full.macs
    block = {unit.name: unit for unit in get_spec("resnet18-edgedi").units}["layer2.0"]
    assert block.reductions == 2
    assert block.shortcut is not None and block.shortcut[0].stride == 2


# --- Tile geometry -----------------------------------------------------------------------


@st.composite
def partitions(draw: st.DrawFn, height: int, max_parts: int = 8) -> list[Rows]:
    count = draw(st.integers(1, max_parts))
    cuts = sorted(draw(st.lists(st.integers(0, height), min_size=count - 1, max_size=count - 1)))
    bounds = [0, *cuts, height]
    return [Rows(a, b) for a, b in itertools.pairwise(bounds)]


@st.composite
def segments(draw: st.DrawFn) -> tuple[tuple[Unit, ...], list[Rows]]:
    spec = small_spec(draw(st.sampled_from(MODEL_NAMES)))
    spatial = spec.spatial_units
    first = draw(st.integers(0, len(spatial) - 1))
    last = draw(st.integers(first, min(len(spatial) - 1, first + 6)))
    units = spatial[first : last + 1]
    return units, draw(partitions(units[-1].out_shape[1]))


def _owned_cover_each_gate_once(tiles: list[TileGeometry]) -> None:
    per_gate = zip(*(tile.op_rows for tile in tiles), strict=True)
    for ops in per_gate:
        op = ops[0].op
        if not op.is_reduction:
            assert all(o.owned is None for o in ops)
            continue
        owned = [o.owned for o in ops]
        assert all(rows is not None for rows in owned)
        check_partition([rows for rows in owned if rows is not None], op.out_height)
        for o in ops:
            assert o.owned is not None and o.out_rows.contains(o.owned)
            assert o.in_rows.contains(o.owned)


@settings(max_examples=150, deadline=None)
@given(segments())
def test_segment_tiles_invariants(segment: tuple[tuple[Unit, ...], list[Rows]]) -> None:
    units, parts = segment
    tiles = segment_tiles(units, parts)
    assert [tile.out_rows for tile in tiles] == parts
    _owned_cover_each_gate_once(tiles)
    for tile, part in zip(tiles, parts, strict=True):
        if part.empty:
            assert tile.empty and tile.in_rows.empty and tile.macs() == 0
            continue
        # Units chain up, and inside a unit each op reads only rows its producer made.
        assert tile.units[0].in_rows == tile.in_rows
        for before, after in itertools.pairwise(tile.units):
            assert before.out_rows == after.in_rows
        for unit_rows in tile.units:
            assert unit_rows.main[-1].out_rows == unit_rows.out_rows
            branches = [unit_rows.main]
            if unit_rows.shortcut is not None:
                branches.append(unit_rows.shortcut)
            for branch in branches:
                have = unit_rows.in_rows
                for op_rows in branch:
                    assert have.contains(op_rows.in_rows)
                    assert op_rows.in_rows == op_rows.in_rows.clamp(op_rows.op.in_height)
                    have = op_rows.out_rows
                assert have.contains(unit_rows.out_rows)
    # Halos only ever add work. One tile does the segment's work, minus rows that floor
    # rounding leaves unused (a 2x2 pool on 45 rows never reads row 44).
    height = units[-1].out_shape[1]
    one_tile = segment_tiles(units, [Rows(0, height)])[0].macs()
    assert sum(tile.macs() for tile in tiles) >= one_tile
    assert one_tile <= sum(unit.macs for unit in units)


def test_shares_cover_each_gate_map_exactly_once_with_an_empty_part() -> None:
    spec = get_spec("resnet18-edgedi")
    units = spec.spatial_units[2:7]
    height = units[-1].out_shape[1]
    parts = [Rows(0, 3), Rows(3, 3), Rows(3, 10), Rows(10, height)]
    tiles = segment_tiles(units, parts)
    gates = [o for o in tiles[0].op_rows if o.op.kind == "gate"]
    assert len(gates) == sum(unit.reductions for unit in units) == 10
    for position, gate in enumerate(o for o in tiles[0].op_rows if o.op.is_reduction):
        owned = [[o for o in tile.op_rows if o.op.is_reduction][position].owned for tile in tiles]
        covered = [
            row for rows in owned if rows is not None for row in range(rows.start, rows.stop)
        ]
        assert sorted(covered) == list(range(gate.op.out_height))
    assert tiles[1].empty and tiles[1].reductions[0].owned == Rows(0, 0)


@settings(max_examples=40, deadline=None)
@given(segments())
def test_width_axis_mirrors_height_on_square_maps(
    segment: tuple[tuple[Unit, ...], list[Rows]],
) -> None:
    units, parts = segment
    assert segment_tiles(units, parts, axis="width") == segment_tiles(units, parts)


def test_grid_macs() -> None:
    units = get_spec("tiny-edgedi", 45).spatial_units
    height = units[-1].out_shape[1]
    whole = sum(unit.macs for unit in units)
    one = segment_tiles(units, [Rows(0, height)])[0]
    one_column = segment_tiles(units, [Rows(0, height)], axis="width")[0]
    assert grid_tile_macs(one, one_column) == whole
    rows = segment_tiles(units, split_rows(height, [1, 1, 1]))
    columns = segment_tiles(units, split_rows(height, [1, 2]), axis="width")
    grid = sum(grid_tile_macs(r, c) for r in rows for c in columns)
    assert grid > whole
    assert (
        grid_tile_macs(
            rows[0], segment_tiles(units, [Rows(0, 0), Rows(0, height)], axis="width")[0]
        )
        == 0
    )


def test_segment_tiles_rejects_bad_segments() -> None:
    spec = get_spec("tiny")
    spatial = spec.spatial_units
    with pytest.raises(ValueError):
        segment_tiles([], [Rows(0, 1)])
    with pytest.raises(ValueError):
        segment_tiles([spatial[0], spatial[2]], [Rows(0, spatial[2].out_shape[1])])
    with pytest.raises(ValueError):
        segment_tiles([spec.tail_units[0]], [Rows(0, 1)])
    with pytest.raises(ValueError):
        segment_tiles([spatial[0]], [Rows(0, 5)])
