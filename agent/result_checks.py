"""Checks of what reaches the leader: a job's image, and the tiles' results.

A job that cannot complete raises `JobFailed`, whose message becomes the error
result's text; a bad tile result is described (a string) so the coordinator can
re-send the tile elsewhere, or give up on a direct run and relay it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edgedi.agent.layout import SegmentLayout
from edgedi.agent.model_store import HeldModel
from edgedi.broker.messages import TileResult
from edgedi.broker.tensors import Tensor
from edgedi.models.units import splittable_head

__all__ = ["JobFailed", "check_head_partial", "check_image", "check_output"]

_IMAGE_DTYPES = ("uint8", "float32", "float64")
_TILE_DTYPES = ("float32", "float16")


class JobFailed(Exception):
    """The job cannot complete; the message becomes the error result's text.

    `permanent` errors (bad input, unknown model) are answered from the result cache
    when the job is resubmitted; a transient one (no workers, tiles lost, deadline)
    is run again, since the cluster may have recovered since.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def check_image(image: Tensor, size: int) -> npt.NDArray[Any]:
    """The image as (1, size, size); `JobFailed` for a wrong shape, dtype or values."""
    if image.dtype not in _IMAGE_DTYPES:
        raise JobFailed(
            f"bad image: dtype {image.dtype} is not one of {', '.join(_IMAGE_DTYPES)}",
            permanent=True,
        )
    shape = image.shape
    squeezed = tuple(size for size in shape if size != 1) if len(shape) > 2 else shape
    if len(shape) > 4 or squeezed != (size, size):
        raise JobFailed(
            f"bad image: shape {list(shape)}; the model takes one grayscale {size}x{size} image "
            f"(shape [{size}, {size}] or [1, {size}, {size}])",
            permanent=True,
        )
    if not image.is_finite():
        raise JobFailed("bad image: it holds NaN or infinite values", permanent=True)
    # A writable copy: torch warns about (and must not write into) read-only buffers.
    return np.array(image.array.reshape(1, size, size))


def check_head_partial(held: HeldModel, layout: SegmentLayout, result: TileResult) -> str | None:
    rows, _ = layout.tile(result.tile)
    if tuple(result.output_rows) != (rows.out_rows.start, rows.out_rows.stop):
        return f"output rows {result.output_rows}, expected {rows.out_rows}"
    unit = splittable_head(held.spec)
    if unit is None:
        return "a head partial of a model whose head cannot be split"
    expected = (1, held.spec.units[unit].main[0].out_channels)
    if result.tensor.shape != expected:
        return f"head partial of shape {list(result.tensor.shape)}, expected {list(expected)}"
    if result.tensor.dtype not in _TILE_DTYPES:
        return f"output dtype {result.tensor.dtype}"
    if not result.tensor.is_finite():
        return "output holds NaN or infinite values"
    return None


def check_output(layout: SegmentLayout, result: TileResult) -> str | None:
    rows, columns = layout.tile(result.tile)
    expected = (1, layout.out_channels, len(rows.out_rows), len(columns.out_rows))
    if result.tensor.shape != expected:
        return f"output shape {list(result.tensor.shape)}, expected {list(expected)}"
    if result.tensor.dtype not in _TILE_DTYPES:
        return f"output dtype {result.tensor.dtype}"
    if tuple(result.output_rows) != (rows.out_rows.start, rows.out_rows.stop):
        return f"output rows {result.output_rows}, expected {rows.out_rows}"
    if not result.tensor.is_finite():
        return "output holds NaN or infinite values"
    return None
