"""The zoo's torch modules agree with their torch-free specs (one architecture, two views)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from edgedi.agent.cli import main
from edgedi.models.specs import MODEL_NAMES, UnknownModelError, get_spec
from edgedi.models.zoo import (
    ConvOp,
    GateOp,
    GlobalPoolOp,
    LinearOp,
    PoolOp,
    ZooModel,
    build_model,
    randomize_statistics,
)

# Small inputs with odd map sizes on the way (floor pooling, stride-2 rounding).
SMALL_SIZE = {"tiny": 45, "tiny-edgedi": 45, "vgg16": 56, "vgg16-edgedi": 56}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # With other jobs on the cores, torch's spinning OpenMP threads slow small convs 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_size(name: str) -> int:
    return SMALL_SIZE.get(name, 72)


def _count_macs(model: ZooModel, x: torch.Tensor) -> int:
    """MACs measured from the module's real tensors, by the spec's counting rules."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        per_sample = output[0].numel()
        if isinstance(module, ConvOp):
            conv = module.conv
            window = conv.kernel_size[0] * conv.kernel_size[1]
            total += per_sample * conv.in_channels // conv.groups * window
        elif isinstance(module, PoolOp):
            total += per_sample * module.spec.kernel**2
        elif isinstance(module, GateOp):
            total += 2 * per_sample + module.linear.in_features * module.linear.out_features
        elif isinstance(module, GlobalPoolOp):
            total += inputs[0][0].numel()
        elif isinstance(module, LinearOp):
            total += module.linear.in_features * module.linear.out_features

    handles = [
        module.register_forward_hook(hook)
        for module in model.modules()
        if isinstance(module, ConvOp | PoolOp | GateOp | GlobalPoolOp | LinearOp)
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_module_matches_spec(name: str) -> None:
    size = small_size(name)
    model = build_model(name, size, seed=0)
    spec = get_spec(name, size)
    assert model.spec == spec and not model.training
    assert sum(p.numel() for p in model.parameters()) == spec.params
    x = torch.randn(2, 1, size, size)
    with torch.inference_mode():
        outputs = model.unit_outputs(x)
    for unit, output in zip(spec.units, outputs, strict=True):
        if unit.kind == "head":
            assert tuple(output.shape) == (2, unit.out_shape[0]), unit.name
        else:
            assert tuple(output.shape) == (2, *unit.out_shape), unit.name
    assert _count_macs(model, x[:1]) == spec.macs


@pytest.mark.parametrize("name", ["tiny", "tiny-edgedi", "resnet18-edgedi"])
def test_parameters_at_200_pixels_match_the_spec(name: str) -> None:
    model = build_model(name, seed=0)
    assert sum(p.numel() for p in model.parameters()) == get_spec(name).params


def test_vgg16_classifier_reads_the_flattened_6x6_map() -> None:
    spec = get_spec("vgg16")
    head = spec.units[-1]
    assert head.in_shape == (512, 6, 6) and head.main[0].in_channels == 512 * 36
    assert head.main[0].out_channels == 4096


def test_seed_makes_weights_reproducible_and_keeps_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_model("tiny", 32, seed=7)
    after = torch.rand(3)
    second = build_model("tiny", 32, seed=7)
    assert torch.equal(expected, after)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = build_model("tiny", 32, seed=8)
    assert not torch.equal(first.unit(0).main[0].conv.weight, other.unit(0).main[0].conv.weight)


def test_unknown_model() -> None:
    with pytest.raises(UnknownModelError, match="known models: tiny"):
        build_model("alexnet")
    with pytest.raises(KeyError):
        build_model("alexnet")


def test_gate_scales_channels_by_the_sigmoid_of_the_global_mean() -> None:
    model = build_model("tiny-edgedi", 32, seed=0)
    gate = model.unit(2).main_ops[2]
    assert isinstance(gate, GateOp)
    x = torch.randn(1, gate.spec.in_channels, 5, 7)
    with torch.inference_mode():
        expected = x * torch.sigmoid(x.mean(dim=(2, 3)) @ gate.linear.weight.T)[:, :, None, None]
        assert torch.allclose(gate(x), expected, atol=1e-6)


def test_stem_pool_pads_with_minus_infinity() -> None:
    model = build_model("tiny-edgedi", 32, seed=0)
    pool = model.unit(1).main_ops[0]
    assert isinstance(pool, PoolOp) and pool.spec.padding == 1
    x = -1.0 - torch.rand(1, 2, 6, 6)
    with torch.inference_mode():
        assert pool(x).max() < 0  # zero padding would have produced zeros at the border


def test_compact_order_is_down_spatial_gate_up_relu_batchnorm() -> None:
    model = build_model("vgg16-edgedi", 64, seed=0)
    ops = model.unit(1).main_ops
    assert [type(op) for op in ops] == [ConvOp, ConvOp, GateOp, ConvOp]
    down, spatial, gate, up = ops
    assert isinstance(down, ConvOp) and isinstance(spatial, ConvOp) and isinstance(up, ConvOp)
    assert down.conv.kernel_size == (1, 1) and down.conv.out_channels == 64 // 8
    assert spatial.conv.kernel_size == (3, 3) and spatial.steps == ()
    assert isinstance(gate, GateOp) and gate.linear.bias is None
    assert up.steps == ("relu", "batchnorm") and up.conv.out_channels == 64
    first = model.unit(0).main_ops[0]
    assert isinstance(first, ConvOp) and first.conv.in_channels == 1


def test_randomize_statistics_changes_batch_norm_and_biases() -> None:
    model = build_model("tiny", 32, seed=0)
    x = torch.randn(1, 1, 32, 32)
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    with torch.inference_mode():
        before = forward(x)
    randomize_statistics(model, seed=3)
    batchnorm = model.unit(0).main_ops[0]
    assert isinstance(batchnorm, ConvOp) and batchnorm.batchnorm is not None
    assert batchnorm.batchnorm.running_var is not None
    assert not torch.allclose(batchnorm.batchnorm.running_var, torch.ones(8))
    with torch.inference_mode():
        assert not torch.allclose(forward(x), before)


def test_models_command_prints_the_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "GFLOP@200px (2×MAC)" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == list(MODEL_NAMES)
    vgg = next(line for line in lines if line.startswith("vgg16 "))
    assert vgg.split()[2] == "24.397"
