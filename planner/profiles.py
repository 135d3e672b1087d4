"""Device profiles: what the planner knows about a device, and how it is fitted.

A profile holds, per cost class of `edgedi.models.units.Op.cost_class`, a linear time
model `seconds ≈ seconds_per_mac · MACs + seconds_fixed` (one op invocation), plus the
device's memory, core count and its link to the broker (bandwidth, latency).

Profiles travel in the device's birth message as a plain dict (`model_dump()`), so the
model is a frozen pydantic model with `extra="forbid"`. The fit takes the samples that
`edgedi.models.profiling` measures (anything with `cost_class`, `macs` and `seconds`
attributes); the planner never imports torch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Annotated, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgedi.models.units import CostClass
from edgedi.planner.errors import ProfileError

COST_CLASSES: tuple[CostClass, ...] = get_args(CostClass)

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TimeModel(_Frozen):
    """seconds ≈ seconds_per_mac · MACs + seconds_fixed, for one op invocation."""

    seconds_per_mac: NonNegative = Field(description="marginal seconds per multiply-accumulate")
    seconds_fixed: NonNegative = Field(default=0.0, description="per-invocation overhead (s)")

    def seconds(self, macs: float, invocations: int = 1) -> float:
        return self.seconds_per_mac * macs + self.seconds_fixed * invocations

    def scaled(self, factor: float) -> TimeModel:
        return TimeModel(
            seconds_per_mac=self.seconds_per_mac * factor,
            seconds_fixed=self.seconds_fixed * factor,
        )


class UnitTimes(_Frozen):
    """Measured compute model of one model's units on one device (`planner.unit_costs`).

    `units[i]` prices unit `i`'s ops: `seconds_per_mac` per MAC and `seconds_fixed`
    per op invocation (the unit's fitted per-tile overhead spread over its ops), so
    a fused tile costs the sum over its ops at the rows each really computes.
    """

    digest: str = Field(min_length=1, description="architecture digest the units belong to")
    units: tuple[TimeModel, ...] = Field(min_length=1, description="one model per spatial unit")
    tail_s: NonNegative = Field(default=0.0, description="measured tail (pool + head) seconds")
    channel_units: tuple[TimeModel | None, ...] = Field(
        default=(),
        description="per spatial unit, a channel tile's cost (seconds per MAC of its share, "
        "seconds per tile); None for a unit that cannot be split by channels; empty: not "
        "measured",
    )
    copy_s_per_byte: NonNegative = Field(
        default=0.0, description="converting a tile's input or output, seconds per byte"
    )

    def scaled(self, factor: float) -> UnitTimes:
        return self.model_copy(
            update={
                "units": tuple(m.scaled(factor) for m in self.units),
                "channel_units": tuple(
                    None if m is None else m.scaled(factor) for m in self.channel_units
                ),
                "tail_s": self.tail_s * factor,
                "copy_s_per_byte": self.copy_s_per_byte * factor,
            }
        )


class DeviceProfile(_Frozen):
    """A device as the planner sees it."""

    device: str = Field(min_length=1, description="device id (unique in the cluster)")
    time_models: dict[CostClass, TimeModel] = Field(
        description="fitted time model per cost class; missing classes use `default`"
    )
    default: TimeModel | None = Field(
        default=None,
        description="model for cost classes without their own; the slowest known one if unset",
    )
    memory_bytes: int = Field(gt=0, description="memory available for weights and activations")
    bandwidth: Positive = Field(description="link bandwidth to the broker, bytes/s")
    latency_s: NonNegative = Field(default=0.0, description="one-way link latency to the broker")
    cores: int = Field(default=1, ge=1, description="CPU cores used for inference")
    unit_times: dict[str, UnitTimes] = Field(
        default_factory=dict,
        description="measured per-unit tile costs by model digest; preferred where present",
    )

    def units_for(self, digest: str) -> UnitTimes | None:
        return self.unit_times.get(digest)

    @model_validator(mode="after")
    def _has_models(self) -> DeviceProfile:
        if not self.time_models and self.default is None:
            raise ValueError("a profile needs at least one time model (or a default)")
        return self

    def time_model(self, cost_class: CostClass) -> TimeModel:
        model = self.time_models.get(cost_class)
        if model is not None:
            return model
        if self.default is not None:
            return self.default
        # Pessimistic: an unmeasured kind of op is assumed as slow as the slowest measured.
        return max(self.time_models.values(), key=lambda m: m.seconds_per_mac)

    def refined(self, predicted_s: float, measured_s: float, weight: float = 0.3) -> DeviceProfile:
        """The profile nudged towards a measured tile time (online refinement).

        A device that takes longer than its profile predicts — loaded, throttled — is
        slowed by a fraction `weight` of the gap per observation (an exponential moving
        average of measured / predicted), so the next plan gives it fewer rows.
        """
        if not (predicted_s > 0 and measured_s > 0 and 0 < weight <= 1):
            raise ProfileError(
                f"{self.device}: cannot refine from predicted {predicted_s}, "
                f"measured {measured_s}, weight {weight}"
            )
        return self.scaled(1.0 + weight * (measured_s / predicted_s - 1.0))

    def scaled(self, factor: float) -> DeviceProfile:
        """The same device running `factor` times slower (online refinement, emulation)."""
        if not factor > 0:
            raise ProfileError(f"{self.device}: slowdown factor must be positive, got {factor}")
        return self.model_copy(
            update={
                "time_models": {k: m.scaled(factor) for k, m in self.time_models.items()},
                "default": None if self.default is None else self.default.scaled(factor),
                "unit_times": {k: u.scaled(factor) for k, u in self.unit_times.items()},
            }
        )


class SampleLike(Protocol):
    """One measurement: an op of `cost_class` doing `macs` work took `seconds`."""

    @property
    def cost_class(self) -> str: ...
    @property
    def macs(self) -> float: ...
    @property
    def seconds(self) -> float: ...


def _objective(
    a: float, b: float, x: Sequence[float], y: Sequence[float], w: Sequence[float]
) -> float:
    return sum(wi * (a * xi + b - yi) ** 2 for xi, yi, wi in zip(x, y, w, strict=True))


def fit_time_model(macs: Sequence[float], seconds: Sequence[float]) -> TimeModel:
    """Non-negative least squares fit of `seconds ≈ a·macs + b`, in relative error.

    Relative weights (1/seconds²) keep the small ops from being ignored next to the big
    ones. With one sample (or samples that all have the same size) the fit is
    proportional (b = 0), which extrapolates sensibly; with none it fails.
    """
    if len(macs) != len(seconds):
        raise ProfileError("macs and seconds must have the same length")
    points = [
        (float(x), float(y))
        for x, y in zip(macs, seconds, strict=True)
        if math.isfinite(x) and math.isfinite(y) and x >= 0 and y > 0
    ]
    if not points:
        raise ProfileError("no usable samples (need macs >= 0 and seconds > 0)")
    x = [p[0] for p in points]
    y = [p[1] for p in points]
    w = [1.0 / (yi * yi) for yi in y]
    sw = sum(w)
    swx = sum(wi * xi for wi, xi in zip(w, x, strict=True))
    swy = sum(wi * yi for wi, yi in zip(w, y, strict=True))
    swxx = sum(wi * xi * xi for wi, xi in zip(w, x, strict=True))
    swxy = sum(wi * xi * yi for wi, xi, yi in zip(w, x, y, strict=True))

    candidates: list[tuple[float, float]] = []
    determinant = sw * swxx - swx * swx
    if determinant > 1e-12 * max(sw * swxx, 1e-300):
        a = (sw * swxy - swx * swy) / determinant
        b = (swxx * swy - swx * swxy) / determinant
        if a >= 0 and b >= 0:
            candidates.append((a, b))
    if swxx > 0:
        candidates.append((max(0.0, swxy / swxx), 0.0))  # proportional
    candidates.append((0.0, max(0.0, swy / sw)))  # constant
    best = min(candidates, key=lambda ab: _objective(ab[0], ab[1], x, y, w))
    return TimeModel(seconds_per_mac=best[0], seconds_fixed=best[1])


def fit_profile(samples: Iterable[SampleLike]) -> dict[CostClass, TimeModel]:
    """One fitted time model per cost class present in `samples`."""
    grouped: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for sample in samples:
        if sample.cost_class not in COST_CLASSES:
            raise ProfileError(f"unknown cost class {sample.cost_class!r}")
        grouped[sample.cost_class][0].append(float(sample.macs))
        grouped[sample.cost_class][1].append(float(sample.seconds))
    if not grouped:
        raise ProfileError("no samples to fit")
    models: dict[CostClass, TimeModel] = {}
    for cost_class in COST_CLASSES:
        if cost_class in grouped:
            models[cost_class] = fit_time_model(*grouped[cost_class])
    return models


def build_profile(
    device: str,
    samples: Iterable[SampleLike],
    *,
    memory_bytes: int,
    bandwidth: float,
    latency_s: float = 0.0,
    cores: int = 1,
) -> DeviceProfile:
    """A complete profile from micro-benchmark samples and the link's figures."""
    return DeviceProfile(
        device=device,
        time_models=fit_profile(samples),
        memory_bytes=memory_bytes,
        bandwidth=bandwidth,
        latency_s=latency_s,
        cores=cores,
    )
