"""Combining tiles' shares, exactly: reductions and stitching (numpy only, no torch).

The one home of the arithmetic that the in-process reference (`edgedi.models.tiling`)
and the distributed runtime (the leader's coordinator, each worker on the direct
plane) must do alike, so that a distributed run equals the whole forward pass:

- `combine`: the float64 total of per-tile partial sums in the order given (callers
  pass tile order, so every holder of a segment computes bit-identical values), then
  the per-channel mean (`"mean"`: attention gates, the global average pool) or the
  total itself (`"sum"`: channel tiles' partial sums of a convolution), checked to
  cover the map (or the hidden channels) exactly once;
- `pooled_mean`: the global average pool of a whole map from its disjoint tiles;
- `stitch_grid`: a row-major grid of tiles put back together, for numpy arrays or
  torch tensors alike (the caller gives the concatenation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["CoverageError", "Reduce", "combine", "pooled_mean", "stitch_grid"]

Reduce = Literal["mean", "sum"]
"""How partial sums combine: a per-channel mean, or the plain sum."""


class CoverageError(ValueError):
    """The partials do not cover the map exactly once (a tile missing or counted twice)."""

    def __init__(self, covered: int, expected: int) -> None:
        super().__init__(f"partials cover {covered} positions, the map has {expected}")
        self.covered = covered
        self.expected = expected


def combine(
    parts: Iterable[tuple[npt.NDArray[Any], int]],
    shape: tuple[int, ...],
    expected: int,
    reduce: Reduce = "mean",
) -> npt.NDArray[np.float64]:
    """Combine `(sums, count)` parts, in the order given, into one float64 value.

    `expected` is the count the parts must add up to (`CoverageError` otherwise);
    `"mean"` divides the total by it, `"sum"` returns the total.
    """
    total = np.zeros(shape, dtype=np.float64)
    count = 0
    for sums, part_count in parts:
        total += sums
        count += part_count
    if count != expected:
        raise CoverageError(count, expected)
    if reduce == "sum":
        return total
    mean: npt.NDArray[np.float64] = total / count
    return mean


def pooled_mean(
    tiles: Iterable[npt.NDArray[Any]], shape: tuple[int, int, int]
) -> npt.NDArray[np.float64]:
    """The global average pool (1, channels) of a (channels, height, width) map from
    its disjoint (1, channels, rows, columns) tiles, summed in float64 in the order
    given; `CoverageError` when they do not cover the map."""
    channels, height, width = shape
    return combine(
        (
            (tile.sum(axis=(2, 3), dtype=np.float64), tile.shape[2] * tile.shape[3])
            for tile in tiles
        ),
        (1, channels),
        height * width,
    )


class _Shaped(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


A = TypeVar("A", bound=_Shaped)


def stitch_grid(
    tiles: Sequence[A],
    row_count: int,
    column_count: int,
    concatenate: Callable[[list[A], int], A],
) -> A:
    """Put a row-major `row_count` × `column_count` grid of (batch, channels, rows,
    columns) tiles back together; `concatenate(pieces, axis)` joins arrays.

    Tiles without rows or columns add nothing and are left out.
    """
    if len(tiles) != row_count * column_count:
        raise ValueError(f"{len(tiles)} tiles do not make a {row_count}x{column_count} grid")
    strips = []
    for row in range(row_count):
        pieces = [
            tile
            for tile in tiles[row * column_count : (row + 1) * column_count]
            if tile.shape[2] and tile.shape[3]
        ]
        if pieces:
            strips.append(concatenate(pieces, 3) if len(pieces) > 1 else pieces[0])
    if not strips:
        raise ValueError("every tile of the grid is empty")
    return concatenate(strips, 2) if len(strips) > 1 else strips[0]
