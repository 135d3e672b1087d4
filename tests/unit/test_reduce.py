"""models/reduce: the one home of combining tiles' shares (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgedi.models.reduce import CoverageError, combine, pooled_mean, stitch_grid


def test_combine_means_or_sums_in_the_order_given() -> None:
    rng = np.random.default_rng(0)
    parts = [(rng.standard_normal((1, 3)), count) for count in (4, 0, 5)]
    total = parts[0][0] + parts[1][0] + parts[2][0]
    assert np.array_equal(combine(parts, (1, 3), 9, "sum"), total)
    assert np.array_equal(combine(parts, (1, 3), 9), total / 9)
    assert combine(parts, (1, 3), 9).dtype == np.float64


def test_combine_refuses_a_wrong_cover() -> None:
    with pytest.raises(CoverageError) as raised:
        combine([(np.ones((1, 2)), 3)], (1, 2), 4)
    assert (raised.value.covered, raised.value.expected) == (3, 4)


def test_pooled_mean_equals_the_whole_maps_mean() -> None:
    x = np.random.default_rng(1).standard_normal((1, 4, 5, 6)).astype(np.float32)
    tiles = [x[:, :, :2], x[:, :, 2:2], x[:, :, 2:]]
    expected = x.astype(np.float64).mean(axis=(2, 3))
    assert np.allclose(pooled_mean(tiles, (4, 5, 6)), expected, rtol=0, atol=1e-12)
    with pytest.raises(CoverageError):
        pooled_mean(tiles[:2], (4, 5, 6))


def test_stitch_grid_rebuilds_numpy_and_torch_maps_alike() -> None:
    x = np.arange(2 * 7 * 5, dtype=np.float32).reshape(1, 2, 7, 5)
    rows, columns = [(0, 3), (3, 3), (3, 7)], [(0, 2), (2, 5)]
    tiles = [x[:, :, r0:r1, c0:c1] for r0, r1 in rows for c0, c1 in columns]
    stitched = stitch_grid(tiles, 3, 2, lambda pieces, axis: np.concatenate(pieces, axis=axis))
    assert np.array_equal(stitched, x)
    tensors = [torch.from_numpy(np.ascontiguousarray(t)) for t in tiles]
    joined = stitch_grid(tensors, 3, 2, lambda pieces, axis: torch.cat(pieces, dim=axis))
    assert torch.equal(joined, torch.from_numpy(x))
    with pytest.raises(ValueError, match="grid"):
        stitch_grid(tiles[:5], 3, 2, lambda pieces, axis: np.concatenate(pieces, axis=axis))
