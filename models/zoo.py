"""The model zoo as torch modules, built from the architectures of `edgedi.models.specs`.

Every module mirrors its spec op for op: `ZooModel.units[i]` is the torch side of
`spec.units[i]`, and its `main` / `shortcut` module lists line up with the unit's
`main` / `shortcut` ops. That alignment is what lets `edgedi.models.tiling` run any
op on any tile with the module's own weights, and what the zoo's tests check
(shapes, parameter counts and MACs of module and spec must agree).

Models are returned in eval mode: this project runs inference; training code calls
`.train()` itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgedi.models.specs import (
    DEFAULT_INPUT_SIZE,
    MODEL_NAMES,
    Architecture,
    OpConfig,
    PostOp,
    UnitConfig,
    UnknownModelError,
    build_spec,
    get_architecture,
)
from edgedi.models.units import ModelSpec, Op, Unit

__all__ = [
    "MODEL_NAMES",
    "ConvOp",
    "GateOp",
    "GlobalPoolOp",
    "LinearOp",
    "OpModule",
    "PoolOp",
    "UnitModule",
    "UnknownModelError",
    "ZooModel",
    "build_model",
    "randomize_statistics",
]

DROPOUT = 0.5  # VGG's classifier dropout; inactive in eval mode


def _apply_post(
    x: torch.Tensor, steps: tuple[PostOp, ...], batchnorm: nn.BatchNorm2d | None, training: bool
) -> torch.Tensor:
    for step in steps:
        if step == "batchnorm":
            assert batchnorm is not None
            x = batchnorm(x)
        elif step == "relu":
            x = F.relu(x)
        else:
            x = F.dropout(x, DROPOUT, training)
    return x


class ConvOp(nn.Module):
    """A convolution followed by its pointwise steps (batch norm, ReLU) in config order."""

    def __init__(self, op: Op, config: OpConfig) -> None:
        super().__init__()
        self.spec = op
        self.steps = config.post
        self.conv = nn.Conv2d(
            op.in_channels,
            op.out_channels,
            op.kernel,
            stride=op.stride,
            padding=op.padding,
            dilation=op.dilation,
            groups=op.groups,
            bias=config.bias,
        )
        self.batchnorm = nn.BatchNorm2d(op.out_channels) if "batchnorm" in config.post else None

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The pointwise steps after the convolution (exact on any tile)."""
        return _apply_post(x, self.steps, self.batchnorm, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.conv(x))


class PoolOp(nn.Module):
    """Max pooling; torch pads max pools with -inf, so the border never wins a window."""

    def __init__(self, op: Op) -> None:
        super().__init__()
        self.spec = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = self.spec
        return F.max_pool2d(x, op.kernel, op.stride, op.padding)


class GateOp(nn.Module):
    """EdgeDI's channel-attention gate: scale = sigmoid(W · mean over the whole map).

    The mean is a reduction over every row and column, which is why a tiled run
    must stop here and combine the tiles' partial sums (`edgedi.models.tiling`).
    """

    def __init__(self, op: Op) -> None:
        super().__init__()
        self.spec = op
        self.linear = nn.Linear(op.in_channels, op.in_channels, bias=False)

    def scale(self, mean: torch.Tensor) -> torch.Tensor:
        """Per-channel factors (batch, channels) from the per-channel means."""
        factors: torch.Tensor = torch.sigmoid(self.linear(mean))
        return factors

    def rescale(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return x * self.scale(mean)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean is taken in float64, as a tiled run combines its partial sums; in fp32
        # the two summation orders differ by ~1e-7, which deep stacks of gates amplify.
        mean = x.mean(dim=(2, 3), dtype=torch.float64).to(x.dtype)
        return self.rescale(x, mean)


class GlobalPoolOp(nn.Module):
    """Global average pool; keeps (batch, channels, 1, 1) so shapes match the spec."""

    def __init__(self, op: Op) -> None:
        super().__init__()
        self.spec = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class LinearOp(nn.Module):
    """A fully connected layer on the flattened input, then its ReLU / dropout."""

    def __init__(self, op: Op, config: OpConfig) -> None:
        super().__init__()
        self.spec = op
        self.steps = config.post
        self.linear = nn.Linear(op.in_channels, op.out_channels, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.linear(torch.flatten(x, 1))
        return _apply_post(y, self.steps, None, self.training)


OpModule = ConvOp | PoolOp | GateOp | GlobalPoolOp | LinearOp


def _make_op_module(op: Op, config: OpConfig) -> OpModule:
    if op.kind == "conv":
        return ConvOp(op, config)
    if op.kind == "maxpool":
        return PoolOp(op)
    if op.kind == "gate":
        return GateOp(op)
    if op.kind == "gap":
        return GlobalPoolOp(op)
    if op.kind == "linear":
        return LinearOp(op, config)
    raise ValueError(f"op {op.name}: kind {op.kind!r} has no torch module")


class UnitModule(nn.Module):
    """One unit: the main branch, plus the shortcut and a ReLU after the sum if residual."""

    def __init__(self, unit: Unit, config: UnitConfig) -> None:
        super().__init__()
        self.spec = unit
        self.main = nn.ModuleList(
            _make_op_module(op, cfg) for op, cfg in zip(unit.main, config.main, strict=True)
        )
        self.shortcut: nn.ModuleList | None = None
        if unit.shortcut is not None:
            assert config.shortcut is not None
            self.shortcut = nn.ModuleList(
                _make_op_module(op, cfg)
                for op, cfg in zip(unit.shortcut, config.shortcut, strict=True)
            )

    @property
    def main_ops(self) -> list[OpModule]:
        return [_as_op(module) for module in self.main]

    @property
    def shortcut_ops(self) -> list[OpModule] | None:
        if self.shortcut is None:
            return None
        return [_as_op(module) for module in self.shortcut]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for op in self.main:
            y = op(y)
        if self.shortcut is None:
            return y
        skip = x
        for op in self.shortcut:
            skip = op(skip)
        return F.relu(y + skip)


def _as_op(module: nn.Module) -> OpModule:
    if not isinstance(module, ConvOp | PoolOp | GateOp | GlobalPoolOp | LinearOp):
        raise TypeError(f"{type(module).__name__} is not a zoo op module")
    return module


class ZooModel(nn.Module):
    """A zoo model: `units[i]` runs `spec.units[i]`; `forward` returns the logits."""

    def __init__(self, architecture: Architecture, spec: ModelSpec) -> None:
        super().__init__()
        self.architecture = architecture
        self.spec = spec
        self.units = nn.ModuleList(
            UnitModule(unit, config)
            for unit, config in zip(spec.units, architecture.units, strict=True)
        )

    @property
    def name(self) -> str:
        return self.spec.name

    def unit(self, index: int) -> UnitModule:
        module = self.units[index]
        assert isinstance(module, UnitModule)
        return module

    def run_units(self, x: torch.Tensor, first: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run units `first .. stop-1` (to the end by default) on `x`, whole maps."""
        stop = len(self.units) if stop is None else stop
        for index in range(first, stop):
            x = self.units[index](x)
        return x

    def unit_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every unit, in order (the last one is the logits)."""
        outputs = []
        for module in self.units:
            x = module(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_units(x)


def _initialise(model: ZooModel) -> None:
    """He initialisation for convs (as torchvision does), small normal for linears."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LinearOp):
            nn.init.normal_(module.linear.weight, 0.0, 0.01)
            if module.linear.bias is not None:
                nn.init.zeros_(module.linear.bias)


def build_model(
    name: str, input_size: int = DEFAULT_INPUT_SIZE, seed: int | None = None
) -> ZooModel:
    """Build zoo model `name` for a square `input_size` input, in eval mode.

    With a `seed` the weights are reproducible and the global torch RNG is left as
    it was. Raises `UnknownModelError` for names outside `MODEL_NAMES`.
    """
    architecture = get_architecture(name)
    spec = build_spec(architecture, input_size)
    if seed is None:
        model = ZooModel(architecture, spec)
        _initialise(model)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ZooModel(architecture, spec)
            _initialise(model)
    return model.eval()


@torch.no_grad()
def randomize_statistics(model: ZooModel, seed: int = 0, calibrate: bool = True) -> None:
    """Draw non-trivial batch-norm statistics and affine terms and every bias.

    Freshly initialised batch norms are the identity and biases are zero, which would
    let a wrong border or a bias added in the wrong place go unnoticed; tests and
    `edgedi verify` call this so that the padding rules are really exercised.

    With `calibrate` (the default) each batch norm's running statistics are set, in
    forward order, from what it actually receives on a random image, then perturbed,
    so activations keep a sane scale the way they do in a trained model. Uncalibrated
    random statistics make deep models blow up and so ill-conditioned that fp32
    rounding anywhere is amplified 100-fold, which says nothing about the tiling.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape: torch.Size, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    batchnorms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.copy_(uniform(module.weight.shape, 0.5, 1.5))
            module.bias.copy_(uniform(module.bias.shape, -0.5, 0.5))
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(uniform(module.running_mean.shape, -0.5, 0.5))
            module.running_var.copy_(uniform(module.running_var.shape, 0.5, 2.0))
        elif isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
            module.bias.copy_(uniform(module.bias.shape, -0.2, 0.2))
    if calibrate:
        _calibrate(model, batchnorms, generator, uniform)


def _calibrate(
    model: ZooModel,
    batchnorms: list[nn.BatchNorm2d],
    generator: torch.Generator,
    uniform: Callable[[torch.Size, float, float], torch.Tensor],
) -> None:
    """One eval-mode pass; each batch norm takes its statistics from its input on the way."""

    def measure(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, nn.BatchNorm2d)
        assert module.running_mean is not None and module.running_var is not None
        x = inputs[0]
        mean, variance = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
        # A channel that is (almost) always zero here would divide by ~sqrt(eps) on any
        # other input: keep every variance near the layer's typical one.
        variance = variance.clamp(min=max(0.1 * float(variance.mean()), 1e-3))
        shape = mean.shape
        module.running_mean.copy_(mean + variance.sqrt() * uniform(shape, -0.2, 0.2))
        module.running_var.copy_(variance * uniform(shape, 0.7, 1.4))

    _channels, height, width = model.spec.input_shape
    image = torch.randn(2, model.spec.input_shape[0], height, width, generator=generator)
    handles = [batchnorm.register_forward_pre_hook(measure) for batchnorm in batchnorms]
    was_training = model.training
    try:
        model.eval()
        model(image)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
