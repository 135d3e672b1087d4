"""The model zoo's architectures as plain data, and the `ModelSpec` each one yields.

This module is torch-free on purpose: the planner calls `get_spec` to cost a model
without importing torch, and `edgedi.models.zoo` builds the torch modules from the
very same `Architecture` objects. One definition feeds both, so the planner's view
(shapes, parameters, MACs) cannot drift from what actually runs; a unit test runs
every module and compares it with its spec.

The task is NEU-CLS: six classes of steel surface defects, 1×200×200 grayscale input.

Models
------
* ``vgg16``, ``resnet18``, ``resnet34``: the classic architectures with batch norm
  after every conv, adapted to one input channel and six classes. VGG-16 keeps its
  4096-wide classifier on the flattened final map (512×6×6 at 200×200).
* ``vgg16-edgedi``, ``resnet18-edgedi``, ``resnet34-edgedi``: the EdgeDI compact
  counterparts. Every 3x3 conv (except the very first one, on the 1-channel image)
  becomes a *compact* op chain: 1x1 conv down to C/8, 3x3 conv at C/8 (with the
  original stride), channel-attention gate (global average pool → one bias-free
  (C/8)×(C/8) linear layer → sigmoid → channel scale), 1x1 conv up to C, ReLU,
  BatchNorm (the order of the EdgeDI code). C is the output width of the conv that
  is replaced. In the residual blocks each of the two 3x3 convs becomes such a
  chain, so a block holds two gates; shortcuts stay 1x1 conv + BatchNorm. The
  compact models end in a small head (global average pool → one linear layer to 6
  classes) instead of VGG's 4096-wide classifier, so that a checkpoint is a few MB:
  the classifier alone would otherwise be ~90 % of the parameters.
* ``tiny`` and ``tiny-edgedi``: a few thousand parameters, for fast tests. ``tiny``
  has a 2×2 pool, a strided conv and an identity residual block; ``tiny-edgedi`` has
  a ResNet-style 3×3/s2 max pool (padding at the border), one compact block (one
  gate) and a residual block with a strided 1×1 projection shortcut.

Exceptions::

    KeyError
     └── UnknownModelError   a model name that is not in the zoo
    ValueError               an input size too small for the architecture
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from edgedi.models.units import ModelSpec, Op, OpKind, Shape, Unit, UnitKind

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "MODEL_NAMES",
    "NUM_CLASSES",
    "Architecture",
    "OpConfig",
    "PostOp",
    "UnitConfig",
    "UnknownModelError",
    "get_architecture",
    "get_spec",
    "minimum_input_size",
]

NUM_CLASSES = 6
INPUT_CHANNELS = 1
DEFAULT_INPUT_SIZE = 200
# EdgeDI's reduction ratio for VGG-16 and ResNet-18/34 (FIELD-NOTES: r = 8).
COMPACT_RATIO = 8

# Pointwise steps applied, in order, after an op's main computation.
PostOp = Literal["batchnorm", "relu", "dropout"]


@dataclass(frozen=True)
class OpConfig:
    """One op of an architecture, before shapes are known.

    `out_channels` is None for ops that keep the channel count (pools, gates, the
    global average pool). A `linear` op flattens its input first, so the first
    linear of a head sees channels × height × width features.
    """

    name: str
    kind: OpKind
    out_channels: int | None = None
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    bias: bool = False
    post: tuple[PostOp, ...] = ()


@dataclass(frozen=True)
class UnitConfig:
    """One unit: its main branch and, for a residual block, its shortcut.

    `shortcut` follows `Unit.shortcut`: None for a plain chain, `()` for an identity
    skip, the projection's ops otherwise. Residual blocks apply ReLU after the sum.
    """

    name: str
    kind: UnitKind
    main: tuple[OpConfig, ...]
    shortcut: tuple[OpConfig, ...] | None = None

    @property
    def relu_after_add(self) -> bool:
        return self.shortcut is not None


@dataclass(frozen=True)
class Architecture:
    """A model of the zoo as data: the single source for its spec and its torch module."""

    name: str
    summary: str
    units: tuple[UnitConfig, ...]
    in_channels: int = INPUT_CHANNELS
    num_classes: int = NUM_CLASSES


class UnknownModelError(KeyError):
    """A model name that is not in the zoo; the message lists the known names."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known models: {', '.join(MODEL_NAMES)}"


# --- Building blocks of the architectures ------------------------------------------


def _conv_unit(name: str, out_channels: int, kernel: int = 3, stride: int = 1) -> UnitConfig:
    """Conv + BatchNorm + ReLU; the bias would be cancelled by the batch norm."""
    op = OpConfig(
        name=name,
        kind="conv",
        out_channels=out_channels,
        kernel=kernel,
        stride=stride,
        padding=kernel // 2,
        post=("batchnorm", "relu"),
    )
    return UnitConfig(name=name, kind="conv", main=(op,))


def _compact_ops(prefix: str, out_channels: int, stride: int = 1) -> tuple[OpConfig, ...]:
    """EdgeDI's replacement of one 3x3 conv (see the module docstring for the order).

    The down and 3x3 convs keep their biases: no batch norm follows them directly.
    """
    width = max(1, out_channels // COMPACT_RATIO)
    return (
        OpConfig(f"{prefix}.down", "conv", width, kernel=1, bias=True),
        OpConfig(f"{prefix}.spatial", "conv", width, kernel=3, stride=stride, padding=1, bias=True),
        OpConfig(f"{prefix}.gate", "gate"),
        OpConfig(
            f"{prefix}.up", "conv", out_channels, kernel=1, bias=True, post=("relu", "batchnorm")
        ),
    )


def _compact_unit(name: str, out_channels: int, stride: int = 1) -> UnitConfig:
    return UnitConfig(name=name, kind="compact", main=_compact_ops(name, out_channels, stride))


def _max_pool(name: str, kernel: int, stride: int, padding: int = 0) -> UnitConfig:
    op = OpConfig(name, "maxpool", kernel=kernel, stride=stride, padding=padding)
    return UnitConfig(name=name, kind="pool", main=(op,))


def _residual_unit(
    name: str, in_channels: int, out_channels: int, stride: int, compact: bool
) -> UnitConfig:
    """A basic block: two 3x3 convs (or two compact chains) plus a shortcut, then ReLU."""
    if compact:
        main = (
            *_compact_ops(f"{name}.conv1", out_channels, stride),
            *_compact_ops(f"{name}.conv2", out_channels, 1),
        )
    else:
        main = (
            OpConfig(
                f"{name}.conv1",
                "conv",
                out_channels,
                kernel=3,
                stride=stride,
                padding=1,
                post=("batchnorm", "relu"),
            ),
            # No ReLU before the sum: the block applies it after adding the shortcut.
            OpConfig(
                f"{name}.conv2", "conv", out_channels, kernel=3, padding=1, post=("batchnorm",)
            ),
        )
    shortcut: tuple[OpConfig, ...] = ()
    if stride != 1 or in_channels != out_channels:
        projection = OpConfig(
            f"{name}.shortcut", "conv", out_channels, kernel=1, stride=stride, post=("batchnorm",)
        )
        shortcut = (projection,)
    return UnitConfig(name=name, kind="residual", main=main, shortcut=shortcut)


def _gap_unit() -> UnitConfig:
    return UnitConfig(name="gap", kind="gap", main=(OpConfig("gap", "gap"),))


def _small_head(num_classes: int = NUM_CLASSES) -> UnitConfig:
    op = OpConfig("head.fc", "linear", num_classes, bias=True)
    return UnitConfig(name="head", kind="head", main=(op,))


# --- The zoo -------------------------------------------------------------------------

_VGG16_LAYOUT: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def _vgg16(compact: bool) -> Architecture:
    units: list[UnitConfig] = []
    for block, (channels, convs) in enumerate(_VGG16_LAYOUT, start=1):
        for position in range(1, convs + 1):
            name = f"conv{block}_{position}"
            first = block == 1 and position == 1
            if compact and not first:
                units.append(_compact_unit(name, channels))
            else:
                units.append(_conv_unit(name, channels))
        units.append(_max_pool(f"pool{block}", kernel=2, stride=2))
    if compact:
        units += [_gap_unit(), _small_head()]
        summary = "EdgeDI compact VGG-16 (C/8 chains with attention gates), GAP + linear head"
    else:
        classifier = (
            OpConfig("head.fc1", "linear", 4096, bias=True, post=("relu", "dropout")),
            OpConfig("head.fc2", "linear", 4096, bias=True, post=("relu", "dropout")),
            OpConfig("head.fc3", "linear", NUM_CLASSES, bias=True),
        )
        units.append(UnitConfig(name="head", kind="head", main=classifier))
        summary = "VGG-16 with batch norm and the 4096-wide classifier on the flattened map"
    name = "vgg16-edgedi" if compact else "vgg16"
    return Architecture(name=name, summary=summary, units=tuple(units))


_RESNET_STAGES: dict[int, tuple[int, ...]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
_RESNET_WIDTHS = (64, 128, 256, 512)


def _resnet(depth: int, compact: bool) -> Architecture:
    units = [_conv_unit("stem", 64, kernel=7, stride=2), _max_pool("pool", 3, 2, 1)]
    in_channels = 64
    for stage, (channels, blocks) in enumerate(
        zip(_RESNET_WIDTHS, _RESNET_STAGES[depth], strict=True), start=1
    ):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            units.append(
                _residual_unit(f"layer{stage}.{block}", in_channels, channels, stride, compact)
            )
            in_channels = channels
    units += [_gap_unit(), _small_head()]
    kind = "EdgeDI compact " if compact else ""
    summary = f"{kind}ResNet-{depth} (basic blocks{', two gates each' if compact else ''})"
    name = f"resnet{depth}{'-edgedi' if compact else ''}"
    return Architecture(name=name, summary=summary, units=tuple(units))


def _tiny() -> Architecture:
    units = (
        _conv_unit("conv1", 8),
        _max_pool("pool1", kernel=2, stride=2),
        _conv_unit("conv2", 16, stride=2),
        _residual_unit("block", 16, 16, stride=1, compact=False),
        _gap_unit(),
        _small_head(),
    )
    return Architecture("tiny", "test model: conv, 2x2 pool, strided conv, identity block", units)


def _tiny_edgedi() -> Architecture:
    units = (
        _conv_unit("conv1", 8),
        _max_pool("pool1", kernel=3, stride=2, padding=1),
        _compact_unit("compact", 16),
        _residual_unit("block", 16, 16, stride=2, compact=False),
        _gap_unit(),
        _small_head(),
    )
    summary = "test model: padded 3x3 pool, one gated compact block, projection block"
    return Architecture("tiny-edgedi", summary, units)


_ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        _tiny(),
        _tiny_edgedi(),
        _vgg16(compact=False),
        _vgg16(compact=True),
        _resnet(18, compact=False),
        _resnet(18, compact=True),
        _resnet(34, compact=False),
        _resnet(34, compact=True),
    )
}

MODEL_NAMES: tuple[str, ...] = tuple(_ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    """The architecture called `name`; raises `UnknownModelError` for other names."""
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise UnknownModelError(name) from None


# --- From architecture to spec ---------------------------------------------------------


def _window_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _make_op(config: OpConfig, shape: Shape, where: str) -> tuple[Op, Shape]:
    """The spec of one op applied to a map of `shape`, and the shape it produces."""
    channels, height, width = shape
    if config.kind in ("conv", "maxpool"):
        out_height = _window_out(height, config.kernel, config.stride, config.padding)
        out_width = _window_out(width, config.kernel, config.stride, config.padding)
        if out_height < 1 or out_width < 1:
            raise ValueError(f"{where}: a {height}x{width} map is too small for {config.name}")
        out_channels = channels
        params = 0
        if config.kind == "conv":
            assert config.out_channels is not None, config.name
            out_channels = config.out_channels
            params = out_channels * channels * config.kernel * config.kernel
            params += out_channels if config.bias else 0
            params += 2 * out_channels if "batchnorm" in config.post else 0
        op = Op(
            name=config.name,
            kind=config.kind,
            in_channels=channels,
            out_channels=out_channels,
            in_height=height,
            in_width=width,
            out_height=out_height,
            out_width=out_width,
            kernel=config.kernel,
            stride=config.stride,
            padding=config.padding,
            params=params,
        )
        return op, (out_channels, out_height, out_width)
    if config.kind == "gate":
        params = channels * channels  # the bias-free linear layer of the gate
        op = Op(
            config.name, "gate", channels, channels, height, width, height, width, params=params
        )
        return op, shape
    if config.kind == "gap":
        op = Op(config.name, "gap", channels, channels, height, width, 1, 1)
        return op, (channels, 1, 1)
    if config.kind == "linear":
        assert config.out_channels is not None, config.name
        features = channels * height * width  # the linear flattens what it receives
        params = features * config.out_channels + (config.out_channels if config.bias else 0)
        op = Op(config.name, "linear", features, config.out_channels, 1, 1, 1, 1, params=params)
        return op, (config.out_channels, 1, 1)
    raise ValueError(f"{where}: op kind {config.kind!r} is not supported by the zoo")


def _make_branch(
    configs: Sequence[OpConfig], shape: Shape, where: str
) -> tuple[tuple[Op, ...], Shape]:
    ops = []
    for config in configs:
        op, shape = _make_op(config, shape, where)
        ops.append(op)
    return tuple(ops), shape


def build_spec(architecture: Architecture, input_size: int = DEFAULT_INPUT_SIZE) -> ModelSpec:
    """Walk the architecture over a square `input_size` image and describe every unit."""
    if input_size < 1:
        raise ValueError(f"input size must be positive, got {input_size}")
    shape: Shape = (architecture.in_channels, input_size, input_size)
    units = []
    for index, config in enumerate(architecture.units):
        where = f"{architecture.name} at {input_size}x{input_size}"
        main, out_shape = _make_branch(config.main, shape, where)
        shortcut: tuple[Op, ...] | None = None
        if config.shortcut is not None:
            shortcut, skip_shape = _make_branch(config.shortcut, shape, where)
            if skip_shape != out_shape:
                raise ValueError(f"{where}: {config.name} adds {out_shape} and {skip_shape}")
        units.append(Unit(index, config.name, config.kind, shape, out_shape, main, shortcut))
        shape = out_shape
    return ModelSpec(
        architecture.name,
        (architecture.in_channels, input_size, input_size),
        architecture.num_classes,
        tuple(units),
    )


@lru_cache(maxsize=64)
def get_spec(name: str, input_size: int = DEFAULT_INPUT_SIZE) -> ModelSpec:
    """The torch-free description of model `name` for a square `input_size` input.

    Raises `UnknownModelError` for a name outside `MODEL_NAMES` and `ValueError` for
    an input too small to reach the head.
    """
    return build_spec(get_architecture(name), input_size)


@lru_cache(maxsize=64)
def minimum_input_size(name: str) -> int:
    """The smallest square input model `name` can take (its maps reach the head).

    Raises `UnknownModelError` for a name outside `MODEL_NAMES`.
    """
    architecture = get_architecture(name)
    for size in range(1, 4097):
        try:
            build_spec(architecture, size)
        except ValueError:
            continue
        return size
    raise ValueError(f"{name} takes no input up to 4096 pixels")  # pragma: no cover
