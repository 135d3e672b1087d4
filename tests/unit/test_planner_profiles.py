"""Device profiles: the least-squares fit recovers known time models; validation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgedi.planner.errors import ProfileError
from edgedi.planner.profiles import (
    DeviceProfile,
    TimeModel,
    build_profile,
    fit_profile,
    fit_time_model,
)


@dataclass(frozen=True)
class Sample:
    cost_class: str
    macs: float
    seconds: float


@settings(max_examples=60, deadline=None)
@given(
    a=st.floats(1e-12, 1e-8),
    b=st.floats(0.0, 1e-3),
    sizes=st.lists(st.integers(1_000, 100_000_000), min_size=2, max_size=8, unique=True),
)
def test_fit_recovers_known_coefficients(a: float, b: float, sizes: list[int]) -> None:
    # The slope is only determined when the sizes really differ and the work they add
    # is not lost next to the fixed part (a=1e-12 s/MAC on sizes 1000 and 1001 beside
    # b=0.8 ms differs by one part in 1e9): such samples are refused as ill-posed and
    # fitted as a constant, which is what they show.
    assume(max(sizes) >= 2 * min(sizes))
    assume(a * (max(sizes) - min(sizes)) >= 1e-6 * max(b, 1e-12))
    model = fit_time_model(sizes, [a * x + b for x in sizes])
    assert model.seconds_per_mac == pytest.approx(a, rel=1e-6, abs=1e-15)
    assert model.seconds_fixed == pytest.approx(b, rel=1e-5, abs=1e-9)


def test_fit_with_one_sample_is_proportional() -> None:
    model = fit_time_model([1e6], [2e-3])
    assert model.seconds_per_mac == pytest.approx(2e-9)
    assert model.seconds_fixed == 0.0


def test_fit_with_identical_sizes_is_proportional() -> None:
    model = fit_time_model([1e6, 1e6, 1e6], [1e-3, 1.2e-3, 0.8e-3])
    assert model.seconds_fixed == 0.0
    assert model.seconds_per_mac == pytest.approx(1e-9, rel=0.1)


def test_fit_never_goes_negative() -> None:
    # These points imply a negative intercept; the fit clamps it at zero.
    model = fit_time_model([1e6, 2e6, 4e6], [0.5e-3, 2e-3, 5e-3])
    assert model.seconds_fixed >= 0 and model.seconds_per_mac > 0
    # And a negative slope (bigger op, less time: noise) clamps the slope instead.
    model = fit_time_model([1e6, 2e6], [2e-3, 1e-3])
    assert model.seconds_per_mac >= 0 and model.seconds_fixed > 0


def test_fit_ignores_unusable_samples_and_fails_without_any() -> None:
    model = fit_time_model([1e6, 2e6, 3e6], [1e-3, float("nan"), 3e-3])
    assert model.seconds_per_mac == pytest.approx(1e-9)
    with pytest.raises(ProfileError):
        fit_time_model([1e6], [0.0])
    with pytest.raises(ProfileError):
        fit_time_model([1.0, 2.0], [1.0])


def test_fit_profile_groups_by_cost_class() -> None:
    samples = [Sample("conv3x3", x, 1e-10 * x + 1e-5) for x in (1e5, 1e6, 1e7)]
    samples += [Sample("pool", x, 3e-9 * x) for x in (1e4, 1e5)]
    models = fit_profile(samples)
    assert set(models) == {"conv3x3", "pool"}
    assert models["conv3x3"].seconds_fixed == pytest.approx(1e-5, rel=1e-6)
    with pytest.raises(ProfileError):
        fit_profile([Sample("warp-drive", 1, 1)])
    profile = build_profile("d", samples, memory_bytes=10**9, bandwidth=1e7, latency_s=1e-3)
    assert profile.time_model("pool").seconds_per_mac == pytest.approx(3e-9)


def test_profile_fallback_and_scaling() -> None:
    slow = TimeModel(seconds_per_mac=5e-9, seconds_fixed=1e-4)
    fast = TimeModel(seconds_per_mac=1e-10, seconds_fixed=1e-5)
    profile = DeviceProfile(
        device="d", time_models={"conv3x3": fast, "pool": slow}, memory_bytes=1, bandwidth=1.0
    )
    assert profile.time_model("gate") == slow  # pessimistic: the slowest known model
    with_default = profile.model_copy(update={"default": fast})
    assert with_default.time_model("gate") == fast
    doubled = profile.scaled(2.0)
    assert doubled.time_model("conv3x3").seconds_per_mac == pytest.approx(2e-10)
    with pytest.raises(ProfileError):
        profile.scaled(0.0)


def test_online_refinement_moves_towards_measurements() -> None:
    model = TimeModel(seconds_per_mac=1e-10, seconds_fixed=1e-5)
    profile = DeviceProfile(
        device="d", time_models={"conv3x3": model}, memory_bytes=1, bandwidth=1.0
    )
    slower = profile.refined(predicted_s=0.1, measured_s=0.2, weight=0.5)
    assert slower.time_model("conv3x3").seconds_per_mac == pytest.approx(1.5e-10)
    assert profile.refined(0.1, 0.1).time_model("conv3x3") == model
    with pytest.raises(ProfileError):
        profile.refined(0.0, 0.1)


def test_profile_is_strict_wire_data() -> None:
    good = {
        "device": "d",
        "time_models": {"conv3x3": {"seconds_per_mac": 1e-10}},
        "memory_bytes": 1000,
        "bandwidth": 1e6,
    }
    profile = DeviceProfile.model_validate(good)
    assert DeviceProfile.model_validate(profile.model_dump()) == profile
    for bad in (
        {**good, "extra": 1},
        {**good, "bandwidth": 0},
        {**good, "time_models": {"conv9x9": {"seconds_per_mac": 1e-10}}},
        {**good, "time_models": {"conv3x3": {"seconds_per_mac": -1.0}}},
        {**good, "time_models": {}},
    ):
        with pytest.raises(ValidationError):
            DeviceProfile.model_validate(bad)
