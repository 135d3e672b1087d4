"""Exact tiled execution: any fusion and any row (or grid) partition gives the whole pass.

The property is checked for every model of the zoo with random weights, non-trivial
batch-norm statistics and biases, at small inputs (the property does not depend on
200 px; the chosen sizes still round odd maps down somewhere) plus one deterministic
example per model at 200×200, where VGG pools 25 → 12 and ResNet strides 13 → 7.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgedi.agent.cli import main
from edgedi.models.specs import MODEL_NAMES
from edgedi.models.tiling import (
    GatePartial,
    Segment,
    combine_partials,
    drive_tiles,
    run_partitioned,
    run_segment_local,
    run_tile,
)
from edgedi.models.units import Rows, segment_tiles, split_rows
from edgedi.models.zoo import GateOp, ZooModel, build_model, randomize_statistics

TOLERANCE = 1e-5
SMALL_SIZE = {"tiny": 45, "tiny-edgedi": 45, "vgg16": 56, "vgg16-edgedi": 56}
# Tiny models are cheap, so they get many more examples than the big ones.
EXAMPLES = {"tiny": 80, "tiny-edgedi": 80}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # With other jobs on the cores, torch's spinning OpenMP threads slow small convs 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    """A model with random weights, one input and the whole pass's output of every unit."""

    model: ZooModel
    x: torch.Tensor
    outputs: tuple[torch.Tensor, ...]

    def segment_input(self, first: int) -> torch.Tensor:
        return self.x if first == 0 else self.outputs[first - 1]


@lru_cache(maxsize=4)
def case(name: str, size: int) -> Case:
    model = build_model(name, size, seed=11)
    randomize_statistics(model, seed=12)
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(13))
    with torch.inference_mode():
        outputs = tuple(model.unit_outputs(x))
    return Case(model, x, outputs)


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    assert result.shape == expected.shape
    scale = float(expected.abs().max())
    return float((result - expected).abs().max()) / max(scale, 1e-30)


def check_segment(
    c: Case, first: int, last: int, rows: Sequence[Rows], columns: Sequence[Rows] | None
) -> None:
    units = c.model.spec.units[first : last + 1]
    result = run_segment_local(c.model, units, rows, c.segment_input(first), columns=columns)
    error = relative_error(result, c.outputs[last])
    assert error <= TOLERANCE, f"units {first}..{last}, rows {rows}, columns {columns}: {error}"


@st.composite
def partitions(draw: st.DrawFn, extent: int, max_parts: int) -> list[Rows]:
    """1..max_parts contiguous parts with random (uneven, possibly empty) sizes."""
    count = draw(st.integers(1, max_parts))
    cuts = sorted(draw(st.lists(st.integers(0, extent), min_size=count - 1, max_size=count - 1)))
    return [Rows(a, b) for a, b in itertools.pairwise([0, *cuts, extent])]


@st.composite
def plans(draw: st.DrawFn, name: str) -> list[Segment]:
    """Random fusion boundaries over the spatial units; a partition (or grid) per segment."""
    spec = case(name, SMALL_SIZE.get(name, 72)).model.spec
    count = len(spec.spatial_units)
    cuts = draw(st.lists(st.booleans(), min_size=count - 1, max_size=count - 1))
    ends = [i for i, cut in enumerate(cuts) if cut] + [count - 1]
    segments = []
    first = 0
    for last in ends:
        _channels, height, width = spec.units[last].out_shape
        rows = draw(partitions(height, 8))
        columns = None
        if draw(st.integers(0, 3)) == 0:  # sometimes a 2-D grid, DeepThings style
            columns = draw(partitions(width, 3))
        segments.append(Segment(first, last, rows, columns))
        first = last + 1
    return segments


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_random_partitions_equal_the_whole_pass(name: str) -> None:
    size = SMALL_SIZE.get(name, 72)

    @settings(
        max_examples=EXAMPLES.get(name, 15),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(plan=plans(name))
    def check(plan: list[Segment]) -> None:
        c = case(name, size)
        for segment in plan:
            check_segment(c, segment.first, segment.last, segment.rows, segment.columns)

    check()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_partitioned_logits_at_200_pixels(name: str) -> None:
    """Deterministic: fused runs of three units, uneven parts with an empty one."""
    c = case(name, 200)
    spec = c.model.spec
    count = len(spec.spatial_units)
    segments = []
    for first in range(0, count, 3):
        last = min(first + 2, count - 1)
        _channels, height, width = spec.units[last].out_shape
        rows = split_rows(height, [3, 0, 1, 2])
        columns = split_rows(width, [1, 2]) if first % 2 else None
        check_segment(c, first, last, rows, columns)
        segments.append(Segment(first, last, rows, columns))
    logits = run_partitioned(c.model, segments, c.x)
    assert relative_error(logits, c.outputs[-1]) <= TOLERANCE


def test_odd_maps_at_200_pixels_are_split_across_the_rounding() -> None:
    vgg = case("vgg16", 200)
    names = [unit.name for unit in vgg.model.spec.units]
    pool4 = names.index("pool4")  # 25 rows -> 12: the last input row is never read
    check_segment(vgg, pool4 - 1, pool4 + 1, [Rows(0, 5), Rows(5, 6), Rows(6, 12)], None)
    resnet = case("resnet18-edgedi", 200)
    names = [unit.name for unit in resnet.model.spec.units]
    first, last = names.index("layer3.0"), names.index("layer4.0")  # 25 -> 13 -> 7
    check_segment(resnet, first, last, [Rows(0, 3), Rows(3, 4), Rows(4, 7)], None)


# --- Gates ---------------------------------------------------------------------------------


def _gate_inputs(c: Case, unit_index: int) -> list[torch.Tensor]:
    """The whole pass's input of every gate in unit `unit_index`, by running its ops."""
    module = c.model.unit(unit_index)
    found = []
    y = c.segment_input(unit_index)
    with torch.inference_mode():
        for op in module.main_ops:
            if isinstance(op, GateOp):
                found.append(y)
            y = op(y)
    return found


def test_gate_partials_combine_to_the_exact_mean() -> None:
    c = case("tiny-edgedi", 45)
    spec = c.model.spec
    unit = spec.units[2]
    assert unit.kind == "compact"
    parts = [Rows(0, 4), Rows(4, 4), Rows(4, 17), Rows(17, 23)]
    tiles = segment_tiles([unit], parts)
    x = c.segment_input(2)
    runners = [
        run_tile(c.model, tile, x[:, :, tile.in_rows.start : tile.in_rows.stop]) for tile in tiles
    ]
    partials = [next(runner) for runner in runners]
    assert [p.count for p in partials][1] == 0
    assert sum(p.count for p in partials) == partials[0].map_count == 23 * 23
    assert all(p.sums.dtype == np.float64 and p.index == 0 for p in partials)
    (gate_input,) = _gate_inputs(c, 2)
    expected = gate_input.double().mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(combine_partials(partials), expected, rtol=1e-6, atol=1e-9)
    # A missing tile or a tile counted twice is caught, not silently averaged.
    with pytest.raises(ValueError, match="cover"):
        combine_partials(partials[:-1])
    with pytest.raises(ValueError, match="cover"):
        combine_partials([*partials, partials[0]])


def test_partials_of_different_gates_do_not_combine() -> None:
    first = GatePartial(0, 2, 2, "a.gate", np.zeros((1, 2)), 4, 4)
    second = GatePartial(1, 3, 2, "b.gate", np.zeros((1, 2)), 4, 4)
    with pytest.raises(ValueError, match="cannot be combined"):
        combine_partials([first, second])
    with pytest.raises(ValueError):
        combine_partials([])


@pytest.mark.parametrize("name", ["tiny-edgedi", "resnet18-edgedi"])
def test_local_gates_differ_but_exact_gates_equal_the_whole_pass(name: str) -> None:
    c = case(name, SMALL_SIZE.get(name, 72))
    units = c.model.spec.spatial_units
    last = len(units) - 1
    parts = split_rows(units[last].out_shape[1], [1, 1, 1])
    x = c.x
    exact = run_segment_local(c.model, units, parts, x)
    local = run_segment_local(c.model, units, parts, x, gate_mode="local")
    assert relative_error(exact, c.outputs[last]) <= TOLERANCE
    assert relative_error(local, c.outputs[last]) > 1e-3


@pytest.mark.parametrize("name", ["tiny-edgedi", "resnet18-edgedi", "vgg16-edgedi"])
def test_local_gates_are_exact_on_a_tile_that_is_the_whole_map(name: str) -> None:
    # What a worker relies on to skip the gate round trips of a single-tile segment.
    c = case(name, SMALL_SIZE.get(name, 72))
    units = c.model.spec.spatial_units
    last = len(units) - 1
    whole = [Rows(0, units[last].out_shape[1])]
    local = run_segment_local(c.model, units, whole, c.x, gate_mode="local")
    assert relative_error(local, c.outputs[last]) <= TOLERANCE


def test_a_batch_of_images_runs_as_one_tile_set() -> None:
    c = case("tiny-edgedi", 45)
    units = c.model.spec.spatial_units
    parts = split_rows(units[-1].out_shape[1], [2, 1, 3])
    x = torch.randn(3, 1, 45, 45, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = c.model.run_units(x, 0, len(units))
        logits = c.model(x)
    result = run_segment_local(c.model, units, parts, x, columns=[Rows(0, 5), Rows(5, 12)])
    assert relative_error(result, expected) <= TOLERANCE
    segments = [Segment(0, len(units) - 1, parts)]
    assert relative_error(run_partitioned(c.model, segments, x), logits) <= TOLERANCE


def test_tiles_can_move_between_threads_between_gates() -> None:
    """The distributed runtime resumes tiles wherever the combined value arrives."""
    c = case("resnet18-edgedi", 72)
    units = c.model.spec.spatial_units[2:6]
    height = units[-1].out_shape[1]
    parts = [Rows(0, 2), Rows(2, 7), Rows(7, height)]
    x = c.segment_input(2)
    tiles = segment_tiles(units, parts)
    runners = [
        run_tile(c.model, tile, x[:, :, tile.in_rows.start : tile.in_rows.stop]) for tile in tiles
    ]
    threads: set[int] = set()

    def step(position: int, value: np.ndarray | None) -> GatePartial | torch.Tensor:
        threads.add(threading.get_ident())
        runner = runners[position]
        try:
            return next(runner) if value is None else runner.send(value)
        except StopIteration as done:
            assert isinstance(done.value, torch.Tensor)
            return done.value

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(step, range(3), [None] * 3))
        rounds = 0
        while isinstance(results[0], GatePartial):
            partials = [r for r in results if isinstance(r, GatePartial)]
            assert len(partials) == 3 and {p.index for p in partials} == {rounds}
            mean = combine_partials(partials)
            # Resume each tile on a different worker than the one that paused it.
            order = [(position + rounds + 1) % 3 for position in range(3)]
            resumed = list(pool.map(step, order, [mean] * 3))
            results = [resumed[order.index(position)] for position in range(3)]
            rounds += 1
    assert rounds == sum(unit.reductions for unit in units) == 8
    assert not torch.is_inference_mode_enabled()  # nothing leaks out of a paused tile
    outputs = [r for r in results if isinstance(r, torch.Tensor)]
    stitched = torch.cat(outputs, dim=2)
    assert relative_error(stitched, c.outputs[5]) <= TOLERANCE


def test_empty_tile_takes_part_in_every_gate_round() -> None:
    c = case("resnet18-edgedi", 72)
    units = c.model.spec.spatial_units[2:4]
    height = units[-1].out_shape[1]
    tiles = segment_tiles(units, [Rows(0, height), Rows(height, height)])
    x = c.segment_input(2)
    runner = run_tile(c.model, tiles[1], x[:, :, 0:0])
    partials = []
    value: np.ndarray | None = None
    while True:
        try:
            partial = next(runner) if value is None else runner.send(value)
        except StopIteration as done:
            output = done.value
            break
        partials.append(partial)
        value = np.zeros((1, partial.sums.shape[1]))
    assert len(partials) == 4 and all(p.count == 0 and not p.sums.any() for p in partials)
    assert tuple(output.shape) == (1, 64, 0, units[-1].out_shape[2])
    assert len(drive_tiles([])) == 0


def test_a_strip_may_carry_columns_that_floor_rounding_never_reads() -> None:
    c = case("tiny", 45)
    units = c.model.spec.units[1:2]  # a 2x2 pool on 45 columns reads only 44
    tile = segment_tiles(units, [Rows(0, 10), Rows(10, 22)])[1]
    x = c.outputs[0][:, :, tile.in_rows.start : tile.in_rows.stop]
    assert x.shape[3] == 45
    output = drive_tiles([run_tile(c.model, tile, x)])[0]
    assert torch.equal(output, c.outputs[1][:, :, 10:22])


# --- Argument checks --------------------------------------------------------------------


def test_run_tile_checks_its_arguments() -> None:
    c = case("tiny-edgedi", 45)
    units = c.model.spec.spatial_units[:2]
    tile = segment_tiles(units, [Rows(0, 23)])[0]
    with pytest.raises(ValueError, match="shape"):
        run_tile(c.model, tile, c.x[:, :, :10])
    with pytest.raises(ValueError, match="gate mode"):
        run_tile(c.model, tile, c.x, gate_mode="approximate")  # type: ignore[arg-type]
    other = case("tiny-edgedi", 32).model
    with pytest.raises(ValueError, match="not a unit"):
        run_tile(other, tile, c.x)


def test_run_partitioned_checks_the_segments() -> None:
    c = case("tiny", 45)
    spec = c.model.spec
    with pytest.raises(ValueError, match="continue"):
        run_partitioned(c.model, [(1, 3, [Rows(0, 11)])], c.x)
    with pytest.raises(ValueError, match="spatial units"):
        run_partitioned(c.model, [(0, 2, [Rows(0, spec.units[2].out_shape[1])])], c.x)


# --- The `edgedi verify` command ------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        ["tiny-edgedi", "--parts", "3", "--size", "45"],
        ["tiny", "--grid", "2x3", "--fused", "2", "--size", "45"],
        ["resnet18-edgedi", "--parts", "4", "--segments", "3,7", "--size", "72"],
    ],
)
def test_verify_command_passes(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", *arguments]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_command_fails_for_local_gates(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["verify", "tiny-edgedi", "--parts", "4", "--size", "45", "--gate-mode", "local"]) == 1
    )
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["alexnet", "--parts", "2"], "known models"),
        (["tiny", "--parts", "0"], "at least 1"),
        (["tiny"], "--parts"),
        (["tiny", "--parts", "2", "--segments", "2,1"], "increasing"),
        (["tiny", "--parts", "2", "--segments", "7"], "0..3"),
        (["tiny", "--grid", "2by2"], "RxC"),
        (["tiny", "--parts", "2", "--fused", "0"], "at least 1"),
        (["vgg16", "--parts", "2", "--size", "16"], "too small"),
    ],
)
def test_verify_command_rejects_bad_arguments(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", *arguments]) == 2
    assert message in capsys.readouterr().err
