"""L1-norm filter pruning of the original VGG/ResNet to a FLOPs budget: EdgeDI's baseline.

As in Li et al. ("Pruning Filters for Efficient ConvNets", 2017) and the EdgeDI code:
the filters with the smallest L1 norm are removed from every conv, together with the
matching input channels of whatever reads that conv's output, and the thinner network
is then fine-tuned (`edgedi.models.training.train`).

Channels that are added together must be pruned together: in a ResNet the shortcut
and the second conv of each block write into one *stream* per stage, so those convs
share one channel group, ranked by the sum of the L1 norms of all the filters that
write into it. Every other conv is a group of its own. One keep ratio applies to every
group; `prune_to_budget` finds the largest ratio whose MACs fit the budget (bisection
over exact MAC counts from `build_spec`).

The pruned model is an ordinary `ZooModel` built from a thinner `Architecture` (same
ops, smaller widths), so tiling, specs and costs work on it unchanged. Its name gets a
``-pruned`` suffix; it is not a zoo model, so it is not saved as a zoo checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from edgedi.models.specs import Architecture, OpConfig, UnitConfig, build_spec
from edgedi.models.zoo import ConvOp, LinearOp, ZooModel

__all__ = [
    "ChannelGroups",
    "PruneResult",
    "channel_groups",
    "filter_importance",
    "prune",
    "prune_to_budget",
]

# The smallest keep ratio the bisection tries (below it convs keep one or two filters).
MIN_RATIO = 0.02


@dataclass(frozen=True)
class ChannelGroups:
    """Which channel group each conv writes (`output`) and reads (`input`; None: the image)."""

    output: dict[str, str]
    input: dict[str, str | None]
    widths: dict[str, int]  # group -> channels in the original network
    head_input: str | None  # the group the first linear layer reads (flattened)


@dataclass(frozen=True)
class PruneResult:
    model: ZooModel
    architecture: Architecture
    kept: dict[str, list[int]]  # group -> indices of the filters kept, ascending
    ratio: float
    macs: int
    original_macs: int
    params: int
    original_params: int


def channel_groups(architecture: Architecture) -> ChannelGroups:
    """Assign every conv of a plain (non-compact) VGG/ResNet-style architecture a group."""
    output: dict[str, str] = {}
    inputs: dict[str, str | None] = {}
    widths: dict[str, int] = {}
    stream: str | None = None
    head_input: str | None = None
    for unit in architecture.units:
        if unit.kind == "conv":
            (op,) = unit.main
            assert op.out_channels is not None
            inputs[op.name], output[op.name] = stream, op.name
            widths[op.name] = op.out_channels
            stream = op.name
        elif unit.kind == "residual":
            convs = [op for op in unit.main if op.kind == "conv"]
            if len(convs) != len(unit.main) or unit.shortcut is None:
                raise ValueError(f"{unit.name}: only plain residual blocks can be pruned")
            block_in = stream
            block_out = stream if unit.shortcut == () else f"{unit.name}.out"
            current = block_in
            for position, op in enumerate(convs):
                assert op.out_channels is not None
                group = block_out if position == len(convs) - 1 else op.name
                assert group is not None
                inputs[op.name], output[op.name] = current, group
                widths[group] = op.out_channels
                current = group
            for op in unit.shortcut:
                assert op.out_channels is not None and block_out is not None
                inputs[op.name], output[op.name] = block_in, block_out
            stream = block_out
        elif unit.kind in ("pool", "gap"):
            continue
        elif unit.kind == "head":
            head_input = stream
        else:
            raise ValueError(f"{unit.name}: {unit.kind} units cannot be pruned by filters")
    return ChannelGroups(output, inputs, widths, head_input)


def _conv_modules(model: ZooModel) -> dict[str, ConvOp]:
    found: dict[str, ConvOp] = {}
    for index in range(len(model.units)):
        unit = model.unit(index)
        for op in [*unit.main_ops, *(unit.shortcut_ops or [])]:
            if isinstance(op, ConvOp):
                found[op.spec.name] = op
    return found


@torch.no_grad()
def filter_importance(model: ZooModel, groups: ChannelGroups) -> dict[str, torch.Tensor]:
    """Per group, the summed L1 norm of every filter writing each channel."""
    scores: dict[str, torch.Tensor] = {
        group: torch.zeros(width) for group, width in groups.widths.items()
    }
    for name, op in _conv_modules(model).items():
        scores[groups.output[name]] += op.conv.weight.abs().sum(dim=(1, 2, 3))
    return scores


def _thin_op(op: OpConfig, widths: dict[str, int], groups: ChannelGroups) -> OpConfig:
    if op.kind != "conv":
        return op
    return dataclasses.replace(op, out_channels=widths[groups.output[op.name]])


def _thin_architecture(
    architecture: Architecture, widths: dict[str, int], groups: ChannelGroups
) -> Architecture:
    units = []
    for unit in architecture.units:
        main = tuple(_thin_op(op, widths, groups) for op in unit.main)
        shortcut = (
            None
            if unit.shortcut is None
            else tuple(_thin_op(op, widths, groups) for op in unit.shortcut)
        )
        units.append(UnitConfig(unit.name, unit.kind, main, shortcut))
    return dataclasses.replace(
        architecture,
        name=f"{architecture.name}-pruned",
        summary=f"{architecture.summary}, L1-pruned",
        units=tuple(units),
    )


def _widths(groups: ChannelGroups, ratio: float) -> dict[str, int]:
    return {group: max(1, round(ratio * width)) for group, width in groups.widths.items()}


@torch.no_grad()
def prune(model: ZooModel, ratio: float) -> PruneResult:
    """Keep `ratio` of the filters (by L1 norm) of every group; weights copied, eval mode."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    groups = channel_groups(model.architecture)
    widths = _widths(groups, ratio)
    scores = filter_importance(model, groups)
    kept = {
        group: sorted(torch.topk(scores[group], widths[group]).indices.tolist())
        for group in groups.widths
    }
    architecture = _thin_architecture(model.architecture, widths, groups)
    input_size = model.spec.input_shape[1]
    thin = ZooModel(architecture, build_spec(architecture, input_size))

    old_convs, new_convs = _conv_modules(model), _conv_modules(thin)
    for name, new in new_convs.items():
        old = old_convs[name]
        out_index = torch.tensor(kept[groups.output[name]])
        source = groups.input[name]
        weight = old.conv.weight[out_index]
        if source is not None:
            weight = weight[:, torch.tensor(kept[source])]
        new.conv.weight.copy_(weight)
        if old.conv.bias is not None and new.conv.bias is not None:
            new.conv.bias.copy_(old.conv.bias[out_index])
        if old.batchnorm is not None and new.batchnorm is not None:
            for attribute in ("weight", "bias", "running_mean", "running_var"):
                getattr(new.batchnorm, attribute).copy_(
                    getattr(old.batchnorm, attribute)[out_index]
                )
            assert old.batchnorm.num_batches_tracked is not None
            assert new.batchnorm.num_batches_tracked is not None
            new.batchnorm.num_batches_tracked.copy_(old.batchnorm.num_batches_tracked)

    head_index = len(model.units) - 1
    old_linears = [op for op in model.unit(head_index).main_ops if isinstance(op, LinearOp)]
    new_linears = [op for op in thin.unit(head_index).main_ops if isinstance(op, LinearOp)]
    _, height, width = model.spec.units[head_index].in_shape
    for position, (old_linear, new_linear) in enumerate(zip(old_linears, new_linears, strict=True)):
        weight = old_linear.linear.weight
        if position == 0 and groups.head_input is not None:
            # The first linear reads the flattened map, channel-major: c*h*w + y*w + x.
            channels = torch.tensor(kept[groups.head_input])
            pixels = torch.arange(height * width)
            features = (channels[:, None] * height * width + pixels[None, :]).reshape(-1)
            weight = weight[:, features]
        new_linear.linear.weight.copy_(weight)
        if old_linear.linear.bias is not None and new_linear.linear.bias is not None:
            new_linear.linear.bias.copy_(old_linear.linear.bias)

    return PruneResult(
        model=thin.eval(),
        architecture=architecture,
        kept=kept,
        ratio=ratio,
        macs=thin.spec.macs,
        original_macs=model.spec.macs,
        params=thin.spec.params,
        original_params=model.spec.params,
    )


def prune_to_budget(model: ZooModel, target_macs: int, steps: int = 24) -> PruneResult:
    """Prune with the largest uniform keep ratio whose MACs are at most `target_macs`."""
    groups = channel_groups(model.architecture)
    input_size = model.spec.input_shape[1]

    def macs_at(ratio: float) -> int:
        architecture = _thin_architecture(model.architecture, _widths(groups, ratio), groups)
        return build_spec(architecture, input_size).macs

    if macs_at(1.0) <= target_macs:
        return prune(model, 1.0)
    if macs_at(MIN_RATIO) > target_macs:
        raise ValueError(
            f"{model.name}: even keeping {MIN_RATIO:.0%} of the filters costs "
            f"{macs_at(MIN_RATIO)} MACs, over the budget of {target_macs}"
        )
    low, high = MIN_RATIO, 1.0  # macs_at(low) fits, macs_at(high) does not
    for _ in range(steps):
        middle = (low + high) / 2
        if macs_at(middle) <= target_macs:
            low = middle
        else:
            high = middle
    return prune(model, low)
