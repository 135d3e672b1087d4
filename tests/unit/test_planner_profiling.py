"""models.profiling: torch micro-benchmarks that feed the planner's profile fit."""

from __future__ import annotations

import time

import torch

from edgedi.models.profiling import default_cases, run_profile
from edgedi.planner.profiles import COST_CLASSES, build_profile


def test_profile_covers_every_cost_class_within_budget() -> None:
    threads = torch.get_num_threads()
    started = time.perf_counter()
    samples = run_profile(budget_s=1.0, threads=1)
    assert time.perf_counter() - started < 20.0
    assert torch.get_num_threads() == threads
    assert {s.cost_class for s in samples} == set(COST_CLASSES)
    assert all(s.seconds > 0 and s.macs > 0 and s.repeats >= 1 for s in samples)
    profile = build_profile("here", samples, memory_bytes=2**30, bandwidth=1e8)
    assert all(m.seconds_per_mac >= 0 for m in profile.time_models.values())
    # Bigger convolutions take longer on any machine.
    conv = {s.label: s for s in samples}
    small = next(s for s in samples if s.label.startswith("conv3x3 8->16"))
    assert small.seconds > 0 and len(conv) == len(default_cases())


def test_cases_can_be_chosen() -> None:
    cases = [c for c in default_cases() if c.op.cost_class == "fc"][:1]
    samples = run_profile(budget_s=0.2, cases=cases)
    assert len(samples) == 1 and samples[0].cost_class == "fc"
