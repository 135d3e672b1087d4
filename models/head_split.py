"""The classifier's first linear layer, split by the rows of the map it reads.

VGG-16's head reads the flattened last map (512×6×6 at 200 px) with a 4096×18432
linear layer: 75 M multiply-adds and 300 MB of weights, most of the tail. A linear
layer is a sum over its input features, and a row strip of the map is a disjoint
set of them (features are flattened channel-major: c·H·W + y·W + x). So each tile
of the last segment multiplies its own rows by its block of the weights and sends
a vector of 4096 partial sums instead of its rows; the leader adds the vectors in
tile order (float64), then the bias, and runs the rest of the head. Exact up to
fp32 summation order, like every other split here.

Pure: torch only, no I/O.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from edgedi.models.units import splittable_head
from edgedi.models.zoo import LinearOp, ZooModel, _apply_post

__all__ = ["head_partial", "prepare_head_split", "tail_from_head_partials"]

# The layer's weights once more per model, laid out row by row of the map it reads:
# (out, H, C, W). Any row range is then a strided (out, r·C·W) matrix used where it
# lies. (A copied block per row range cost the first job of every new plan a gather of
# 48-96 MB on each device: 33-53 ms on one core, four times that at a quarter of one.)
_by_rows: weakref.WeakKeyDictionary[ZooModel, torch.Tensor] = weakref.WeakKeyDictionary()


def _first_linear(model: ZooModel) -> tuple[int, LinearOp]:
    unit = splittable_head(model.spec)
    if unit is None:
        raise ValueError(f"model {model.name} has no head that reads the whole map")
    op = model.unit(unit).main_ops[0]
    assert isinstance(op, LinearOp)
    return unit, op


def prepare_head_split(model: ZooModel) -> bool:
    """Lay out the weights `head_partial` reads (once per model; slow: call it at load).

    False for a model whose head cannot be split this way.
    """
    if splittable_head(model.spec) is None:
        return False
    _weights_by_rows(model)
    return True


def _weights_by_rows(model: ZooModel) -> torch.Tensor:
    weight = _by_rows.get(model)
    if weight is None:
        unit, op = _first_linear(model)
        channels, height, width = model.spec.units[unit].in_shape
        with torch.inference_mode():
            weight = (
                op.linear.weight.detach()
                .view(-1, channels, height, width)
                .permute(0, 2, 1, 3)
                .contiguous()
            )
        _by_rows[model] = weight
    return weight


def head_partial(
    model: ZooModel, rows: tuple[int, int], x_rows: torch.Tensor
) -> npt.NDArray[np.float32]:
    """Rows `rows` of the last map (1, C, r, W) times their weights: (1, out), no bias."""
    unit, _ = _first_linear(model)
    channels, height, width = model.spec.units[unit].in_shape
    expected = (1, channels, rows[1] - rows[0], width)
    if not 0 <= rows[0] < rows[1] <= height or tuple(x_rows.shape) != expected:
        raise ValueError(f"rows {rows} of shape {tuple(x_rows.shape)}: expected {expected}")
    weight = _weights_by_rows(model)
    with torch.inference_mode():
        block = weight[:, rows[0] : rows[1]].reshape(weight.shape[0], -1)  # a view
        features = x_rows.to(torch.float32).permute(0, 2, 1, 3).reshape(1, -1)
        partial = features @ block.T
    result: npt.NDArray[np.float32] = partial.numpy()
    return result


def tail_from_head_partials(
    model: ZooModel, partials: Sequence[npt.NDArray[np.floating]]
) -> torch.Tensor:
    """The logits from every tile's partial, added in the order given (tile order)."""
    unit, op = _first_linear(model)
    if not partials:
        raise ValueError("no partials")
    total = np.zeros((1, op.linear.out_features), dtype=np.float64)
    for partial in partials:
        if partial.shape != total.shape:
            raise ValueError(f"a partial of shape {partial.shape}, expected {total.shape}")
        total += partial
    with torch.inference_mode():
        y = torch.from_numpy(total.astype(np.float32))
        if op.linear.bias is not None:
            y = y + op.linear.bias
        y = _apply_post(y, op.steps, None, training=False)
        for rest in model.unit(unit).main_ops[1:]:
            y = rest(y)
        return model.run_units(y, unit + 1)
