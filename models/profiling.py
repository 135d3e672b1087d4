"""Measure a device: torch micro-benchmarks per cost class, for the planner's time models.

`run_profile()` times a few representative ops of each cost class of
`edgedi.models.units.Op.cost_class` (1x1, 3x3 and 7x7 convolutions, depthwise, pools,
the attention gate, linear layers) at batch 1 and returns `Sample`s — the op's MACs
as the planner counts them (from a `units.Op`, so both sides agree) and the median
seconds. The planner fits `seconds ≈ a·MACs + b` per class from them
(`edgedi.planner.profiles.fit_profile`); this module does not import the planner.

The whole run fits a time budget (default 8 s; each case gets an equal slice, at
least one timed run after a warm-up) and respects `torch.set_num_threads`: pass
`threads` to pin it for the run (restored afterwards).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgedi.models.units import CostClass, Op

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 8.0
MAX_BUDGET_S = 20.0


@dataclass(frozen=True)
class Sample:
    """One measured case: `macs` of work of `cost_class` took `seconds` (median)."""

    cost_class: CostClass
    macs: int
    seconds: float
    label: str
    repeats: int


@dataclass(frozen=True)
class Case:
    label: str
    op: Op
    run: Callable[[], torch.Tensor]


def _conv_case(
    cin: int, cout: int, size: int, kernel: int, stride: int = 1, groups: int = 1
) -> Case:
    padding = kernel // 2
    out = (size + 2 * padding - kernel) // stride + 1
    op = Op(
        f"conv{kernel}x{kernel}",
        "conv",
        cin,
        cout,
        size,
        size,
        out,
        out,
        kernel=kernel,
        stride=stride,
        padding=padding,
        groups=groups,
    )
    x = torch.randn(1, cin, size, size)
    weight = torch.randn(cout, cin // groups, kernel, kernel) * 0.05
    return Case(
        f"conv{kernel}x{kernel} {cin}->{cout} @{size} s{stride} g{groups}",
        op,
        lambda: F.conv2d(x, weight, stride=stride, padding=padding, groups=groups),
    )


def _pool_case(channels: int, size: int, kernel: int, stride: int) -> Case:
    out = (size - kernel) // stride + 1
    op = Op(
        "pool", "maxpool", channels, channels, size, size, out, out, kernel=kernel, stride=stride
    )
    x = torch.randn(1, channels, size, size)
    return Case(f"maxpool{kernel} {channels} @{size}", op, lambda: F.max_pool2d(x, kernel, stride))


def _gate_case(channels: int, size: int) -> Case:
    op = Op("gate", "gate", channels, channels, size, size, size, size)
    x = torch.randn(1, channels, size, size)
    weight = torch.randn(channels, channels) * 0.05

    def gate() -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        scale = torch.sigmoid(F.linear(pooled, weight))
        return x * scale[:, :, None, None]

    return Case(f"gate {channels} @{size}", op, gate)


def _fc_case(features_in: int, features_out: int) -> Case:
    op = Op("fc", "linear", features_in, features_out, 1, 1, 1, 1)
    x = torch.randn(1, features_in)
    weight = torch.randn(features_out, features_in) * 0.01
    return Case(f"linear {features_in}->{features_out}", op, lambda: F.linear(x, weight))


def default_cases() -> list[Case]:
    """A few sizes per cost class, from cache-resident to memory-bound (batch 1)."""
    return [
        _conv_case(16, 64, 56, 1),
        _conv_case(64, 128, 28, 1),
        _conv_case(256, 512, 7, 1),
        _conv_case(8, 16, 100, 3),
        _conv_case(32, 32, 50, 3),
        _conv_case(64, 64, 28, 3),
        _conv_case(256, 256, 7, 3),
        _conv_case(1, 32, 100, 7, 2),
        _conv_case(16, 32, 50, 7),
        _conv_case(64, 64, 56, 3, groups=64),
        _conv_case(256, 256, 14, 3, groups=256),
        _pool_case(64, 100, 2, 2),
        _pool_case(128, 50, 3, 2),
        _pool_case(512, 12, 2, 2),
        _gate_case(16, 100),
        _gate_case(64, 50),
        _gate_case(256, 12),
        _fc_case(512, 512),
        _fc_case(2048, 1024),
        _fc_case(4096, 4096),
    ]


def _time_case(case: Case, budget_s: float) -> Sample:
    case.run()  # warm-up: allocation, kernel selection
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while not times or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        case.run()
        times.append(time.perf_counter() - start)
    return Sample(
        case.op.cost_class, case.op.macs(), statistics.median(times), case.label, len(times)
    )


def run_profile(
    budget_s: float = DEFAULT_BUDGET_S,
    threads: int | None = None,
    cases: Sequence[Case] | None = None,
) -> list[Sample]:
    """Time every case within about `budget_s` seconds (capped at 20 s)."""
    budget_s = min(max(budget_s, 0.1), MAX_BUDGET_S)
    chosen = list(cases) if cases is not None else default_cases()
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # Roughly half of the budget goes to warm-ups and the slow first runs.
        slice_s = budget_s * 0.5 / max(1, len(chosen))
        samples = []
        with torch.inference_mode():
            for case in chosen:
                sample = _time_case(case, slice_s)
                logger.debug(
                    "%s: %.3f ms over %d runs", case.label, sample.seconds * 1e3, sample.repeats
                )
                samples.append(sample)
        return samples
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
