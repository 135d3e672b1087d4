"""Output-channel partitions: where a map has too few rows left to split, split the filters.

Late residual units work on small maps (7×7, 13×13) with many channels. Cut into
row strips, every 3×3 convolution widens a strip's input by a halo row on each side,
so a fused run of three units needs nearly the whole map on every device and saves
nothing. A *channel tile* instead takes the whole (small) input map and, in every
residual unit of the segment:

1. computes its share `[start, stop)` of the first convolution's filters (with that
   convolution's batch norm and ReLU, which act channel by channel);
2. applies the second convolution to those channels only: a partial sum with the
   second convolution's every output channel (Megatron-style: first layer split by
   output, second by input);
3. hands the partial out and resumes with the sum of every tile's partial — the
   reduction is a sum, not a mean, and it covers the hidden channels exactly once;
4. finishes the unit itself: bias and batch norm of the second convolution, the
   shortcut (computed whole on every tile: a 1×1 convolution at most), ReLU.

So every tile holds the whole output of every unit, and one exchange per unit is
all the devices share. The runner is a generator with the same protocol as
`edgedi.models.tiling.run_tile` (it yields `GatePartial`s with `reduce="sum"`), so
`drive_tiles` and the runtime's partial exchange drive it unchanged; its return
value is the segment output's rows `out_rows` (a tile "owns" those for routing to
the next segment, as a row tile does).

Exact up to fp32 summation order: partials are summed in float64, in tile order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgedi.models.tiling import GatePartial, TileRunner, drive_tiles
from edgedi.models.units import (
    Rows,
    Unit,
    channel_splittable,
    check_channel_parts,
    hidden_channels,
    reduction_ops,
    unit_share,
)
from edgedi.models.zoo import ConvOp, ZooModel

__all__ = [
    "channel_splittable",
    "check_channel_parts",
    "hidden_channels",
    "reduction_ops",
    "run_channel_segment_local",
    "run_channel_tile",
]


def _conv(
    module: ConvOp, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    op = module.spec
    return F.conv2d(x, weight, bias, op.stride, op.padding, op.dilation, op.groups)


def _finish_slice(module: ConvOp, y: torch.Tensor, share: Rows) -> torch.Tensor:
    """The pointwise steps after a convolution, on output channels `share` only."""
    bn = module.batchnorm
    for step in module.steps:
        if step == "batchnorm":
            assert bn is not None and bn.running_mean is not None and bn.running_var is not None
            y = F.batch_norm(
                y,
                bn.running_mean[share.start : share.stop],
                bn.running_var[share.start : share.stop],
                None if bn.weight is None else bn.weight[share.start : share.stop],
                None if bn.bias is None else bn.bias[share.start : share.stop],
                False,
                0.0,
                bn.eps,
            )
        elif step == "relu":
            y = F.relu(y)
        # dropout is the identity in eval mode
    return y


def run_channel_tile(
    model: ZooModel,
    units: Sequence[Unit],
    share: Rows,
    x: torch.Tensor,
    out_rows: Rows,
    *,
    alone: bool = False,
) -> TileRunner:
    """Run channel share `share` of a segment on its whole input map `x`.

    A generator: yields one `GatePartial` (reduce "sum") per unit and takes back the
    summed partials of every tile; returns the output rows `out_rows`. The only tile
    of a segment (`alone`, its share every hidden channel) computes without yielding.
    """
    channels = hidden_channels(units)
    if not (0 <= share.start <= share.stop <= channels):
        raise ValueError(f"channel share {share} outside [0, {channels})")
    if alone and len(share) != channels:
        raise ValueError(f"a tile alone needs every channel, not {share}")
    expected = units[0].in_shape
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(expected):
        shape = tuple(x.shape)
        raise ValueError(f"channel tile input has shape {shape}, expected (1, *{expected})")
    height = units[-1].out_shape[1]
    if not (0 <= out_rows.start <= out_rows.stop <= height):
        raise ValueError(f"output rows {out_rows} outside the map's {height} rows")
    return _run(model, units, share, x, out_rows, channels, alone)


def _run(
    model: ZooModel,
    units: Sequence[Unit],
    share: Rows,
    x: torch.Tensor,
    out_rows: Rows,
    channels: int,
    alone: bool,
) -> TileRunner:
    base = share
    for number, unit in enumerate(units):
        width = unit.main[0].out_channels
        share = unit_share(base, channels, width)
        module = model.unit(unit.index)
        first, second = module.main_ops
        assert isinstance(first, ConvOp) and isinstance(second, ConvOp)
        with torch.inference_mode():
            if alone:
                total = _conv(second, first(x), second.conv.weight, None)
            elif share.empty:
                made = unit.main[1]
                shape = (x.shape[0], made.out_channels, made.out_height, made.out_width)
                sums = np.zeros(shape, dtype=np.float32)
            else:
                w1 = first.conv.weight[share.start : share.stop]
                b1 = None if first.conv.bias is None else first.conv.bias[share.start : share.stop]
                hidden = _finish_slice(first, _conv(first, x, w1, b1), share)
                w2 = second.conv.weight[:, share.start : share.stop]
                partial = _conv(second, hidden, w2, None)
                sums = partial.numpy()  # float32: what travels; summed in float64
        if not alone:
            combined = yield GatePartial(
                index=number,
                unit_index=unit.index,
                op_index=1,
                name=unit.main[1].name,
                sums=sums,
                count=len(share),
                map_count=width,
                reduce="sum",
            )
            value = torch.as_tensor(np.asarray(combined)).to(torch.float32)
            if tuple(value.shape) != tuple(sums.shape):
                raise ValueError(
                    f"{unit.main[1].name}: summed partial of shape {tuple(value.shape)}, "
                    f"expected {tuple(sums.shape)}"
                )
            total = value
        with torch.inference_mode():
            if second.conv.bias is not None:
                total = total + second.conv.bias[None, :, None, None]
            y = second.finish(total)
            skip = x
            for step in module.shortcut_ops or ():
                skip = step(skip)
            x = F.relu(y + skip)
    return x[:, :, out_rows.start : out_rows.stop, :]


def run_channel_segment_local(
    model: ZooModel, units: Sequence[Unit], shares: Sequence[Rows], x: torch.Tensor
) -> torch.Tensor:
    """The reference: every channel tile of a segment in this process, whole output."""
    check_channel_parts(shares, hidden_channels(units))
    height = units[-1].out_shape[1]
    alone = len(shares) == 1
    runners = [
        run_channel_tile(model, units, share, x, Rows(0, height), alone=alone) for share in shares
    ]
    outputs = drive_tiles(runners)
    return outputs[0]
