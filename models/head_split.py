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
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from edgedi.models.units import splittable_head
from edgedi.models.zoo import LinearOp, ZooModel, _apply_post

__all__ = ["head_partial", "tail_from_head_partials"]

# Weight blocks kept per model: one per row range a device has been given lately.
_BLOCKS_KEPT = 4
_blocks: weakref.WeakKeyDictionary[ZooModel, OrderedDict[tuple[int, int], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _first_linear(model: ZooModel) -> tuple[int, LinearOp]:
    unit = splittable_head(model.spec)
    if unit is None:
        raise ValueError(f"model {model.name} has no head that reads the whole map")
    op = model.unit(unit).main_ops[0]
    assert isinstance(op, LinearOp)
    return unit, op


def _block(model: ZooModel, rows: tuple[int, int]) -> torch.Tensor:
    """The weights that multiply rows `rows` of the map, (out, C·r·W), contiguous."""
    kept = _blocks.setdefault(model, OrderedDict())
    block = kept.get(rows)
    if block is None:
        unit, op = _first_linear(model)
        channels, height, width = model.spec.units[unit].in_shape
        weight = op.linear.weight.detach().view(-1, channels, height, width)
        block = weight[:, :, rows[0] : rows[1], :].reshape(weight.shape[0], -1).contiguous()
        kept[rows] = block
        while len(kept) > _BLOCKS_KEPT:
            kept.popitem(last=False)
    kept.move_to_end(rows)
    return block


def head_partial(
    model: ZooModel, rows: tuple[int, int], x_rows: torch.Tensor
) -> npt.NDArray[np.float32]:
    """Rows `rows` of the last map (1, C, r, W) times their weights: (1, out), no bias."""
    unit, _ = _first_linear(model)
    channels, height, width = model.spec.units[unit].in_shape
    expected = (1, channels, rows[1] - rows[0], width)
    if not 0 <= rows[0] < rows[1] <= height or tuple(x_rows.shape) != expected:
        raise ValueError(f"rows {rows} of shape {tuple(x_rows.shape)}: expected {expected}")
    with torch.inference_mode():
        partial = x_rows.reshape(1, -1).to(torch.float32) @ _block(model, rows).T
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
