"""Output-channel tiles equal the whole forward pass, and the shares are checked."""

from __future__ import annotations

import pytest
import torch

from edgedi.models.channel_split import (
    channel_splittable,
    hidden_channels,
    run_channel_segment_local,
    run_channel_tile,
)
from edgedi.models.tiling import combine_partials, drive_tiles
from edgedi.models.units import Rows, split_rows
from edgedi.models.zoo import build_model, randomize_statistics

TOLERANCE = 1e-5


def _model(name: str, size: int = 64):
    model = build_model(name, size, seed=3)
    randomize_statistics(model, seed=4)
    return model


def _splittable_runs(model):
    """Runs of consecutive channel-splittable units of equal width (one per stage),
    then the whole residual part as one run (its units widen twice)."""
    runs, current = [], []
    for unit in model.spec.spatial_units:
        ok = channel_splittable(unit)
        same = current and ok and unit.main[0].out_channels == current[-1].main[0].out_channels
        if ok and (not current or same):
            current.append(unit)
            continue
        if current:
            runs.append(current)
        current = [unit] if ok else []
    if current:
        runs.append(current)
    return [*runs, [unit for run in runs for unit in run]]


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
@pytest.mark.parametrize("weights", [(1, 1), (3, 2, 1), (0.4, 0.4, 0.25, 0.25)])
def test_channel_tiles_equal_the_whole_pass(name: str, weights: tuple[float, ...]) -> None:
    model = _model(name)
    x = torch.randn(1, *model.spec.input_shape, generator=torch.Generator().manual_seed(5))
    maps = model.unit_outputs(x)
    runs = _splittable_runs(model)
    assert len(runs) >= 5  # one per stage (the stride-2 first units included), and all
    for run in runs:
        first, last = run[0].index, run[-1].index
        source = x if first == 0 else maps[first - 1]
        shares = split_rows(hidden_channels(run), weights)
        got = run_channel_segment_local(model, run, shares, source)
        want = maps[last]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= TOLERANCE * max(1.0, want.abs().max().item())


def test_a_tile_returns_its_routing_rows_and_an_empty_share_still_exchanges() -> None:
    model = _model("resnet18")
    x = torch.randn(1, *model.spec.input_shape, generator=torch.Generator().manual_seed(6))
    maps = model.unit_outputs(x)
    run = _splittable_runs(model)[-2]
    channels = hidden_channels(run)
    shares = [Rows(0, channels), Rows(channels, channels)]  # the second tile has none
    height = run[-1].out_shape[1]
    routing = [Rows(0, 1), Rows(1, height)]
    source = maps[run[0].index - 1]
    runners = [
        run_channel_tile(model, run, share, source, rows)
        for share, rows in zip(shares, routing, strict=True)
    ]
    outputs = drive_tiles(runners)
    whole = torch.cat(outputs, dim=2)
    assert (whole - maps[run[-1].index]).abs().max().item() <= TOLERANCE


def test_partials_must_cover_the_hidden_channels_once() -> None:
    model = _model("resnet18")
    run = _splittable_runs(model)[-2]
    channels = hidden_channels(run)
    source = torch.randn(1, *run[0].in_shape)
    height = run[-1].out_shape[1]
    left = run_channel_tile(model, run, Rows(0, channels // 2), source, Rows(0, height))
    partial = next(left)
    assert partial.reduce == "sum" and partial.count == channels // 2
    with pytest.raises(ValueError, match="cover"):
        combine_partials([partial])  # half the channels is not the sum
    with pytest.raises(ValueError, match="cover"):
        combine_partials([partial, partial, partial])


def test_bad_shares_and_inputs_are_refused() -> None:
    model = _model("resnet18")
    run = _splittable_runs(model)[-1]
    channels = hidden_channels(run)
    source = torch.randn(1, *run[0].in_shape)
    rows = Rows(0, run[-1].out_shape[1])
    with pytest.raises(ValueError, match="outside"):
        run_channel_tile(model, run, Rows(0, channels + 1), source, rows)
    with pytest.raises(ValueError, match="shape"):
        run_channel_tile(model, run, Rows(0, 8), source[:, :, :-1], rows)
    with pytest.raises(ValueError, match="cannot be split"):
        hidden_channels(model.spec.spatial_units[:1])  # the stem
    vgg = build_model("vgg16", 64, seed=1)
    assert not any(channel_splittable(unit) for unit in vgg.spec.spatial_units)


def test_split_channels_is_proportional_and_exact() -> None:
    parts = split_rows(512, [0.4, 0.4, 0.25, 0.25])
    assert parts[0].start == 0 and parts[-1].stop == 512
    assert [len(p) for p in parts] == [158, 158, 98, 98]
    assert [len(p) for p in split_rows(10, [1, 0, 1])] == [5, 0, 5]
    with pytest.raises(ValueError):
        split_rows(10, [0, 0])


def test_calibration_times_channel_tiles_of_the_splittable_units() -> None:
    from edgedi.models.calibration import channel_counts, time_model_tiles

    model = _model("resnet18", 32)
    timing = time_model_tiles(model, repeats=1, window_s=0.0)
    splittable = [u for u in model.spec.spatial_units if channel_splittable(u)]
    assert {t.unit for t in timing.channel_tiles} == {u.index for u in splittable}
    for unit in splittable:
        counts = {t.channels for t in timing.channel_tiles if t.unit == unit.index}
        assert counts == set(channel_counts(unit.main[0].out_channels))
    assert all(t.seconds > 0 for t in timing.channel_tiles)
