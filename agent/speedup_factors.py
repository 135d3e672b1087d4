"""Why a distributed job is not the ideal speedup faster: three measured factors.

From one traced job of a plan and one traced job of `single` (their spans and
totals, `JobResult.trace`), and each device's speed (fractions of one core):

    measured speedup = ideal × work ratio × devices busy ÷ one device busy

- *ideal*: the summed speed over the fastest device's;
- *work ratio*: the one-core milliseconds the single job computed over those the
  distributed job computed (each device's computing time × its speed): below 1 by
  what splitting adds (halo rows computed twice, small tiles' fixed costs, caches
  shared by devices computing at once);
- *devices busy*: the distributed job's one-core work over what all the devices
  could have computed in its time (waiting for rows, gates, tasks or the tail);
- *one device busy*: the same for the single job, against the fastest device.

The identity is exact for the two jobs (their totals, not the stream's medians).
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgedi.agent.trace_chart import device_times
from edgedi.broker.messages import JobSpan

__all__ = ["SpeedupFactors", "speedup_factors"]


@dataclass(frozen=True)
class SpeedupFactors:
    ideal: float
    distributed_ms: float
    single_ms: float
    distributed_work_ms: float
    """One-core milliseconds of computing in the distributed job (tiles and tail)."""
    single_work_ms: float
    distributed_busy: float
    """The distributed job's work over Σ speed × its time."""
    single_busy: float
    """The single job's work over the fastest speed × its time."""

    @property
    def work_ratio(self) -> float:
        return self.single_work_ms / self.distributed_work_ms

    @property
    def speedup(self) -> float:
        return self.single_ms / self.distributed_ms

    def as_dict(self) -> dict[str, float]:
        return {
            "ideal": self.ideal,
            "work_ratio": self.work_ratio,
            "distributed_busy": self.distributed_busy,
            "single_busy": self.single_busy,
            "speedup": self.speedup,
            "distributed_ms": self.distributed_ms,
            "single_ms": self.single_ms,
            "distributed_work_ms": self.distributed_work_ms,
            "single_work_ms": self.single_work_ms,
        }


def _work_ms(spans: Sequence[JobSpan], speeds: Mapping[str, float]) -> float:
    times = device_times(spans)
    unknown = sorted({t.device for t in times} - speeds.keys())
    if unknown:
        raise ValueError(f"no speed for device(s) {', '.join(unknown)}")
    return sum(t.compute_ms * speeds[t.device] for t in times)


def speedup_factors(
    distributed: Sequence[JobSpan],
    distributed_ms: float,
    single: Sequence[JobSpan],
    single_ms: float,
    speeds: Mapping[str, float],
) -> SpeedupFactors:
    """The factors of `single_ms / distributed_ms` (see the module's docstring);
    `speeds` holds every device of the cluster, used or not."""
    if distributed_ms <= 0 or single_ms <= 0 or not speeds:
        raise ValueError("need two jobs that took time and the devices' speeds")
    total, fastest = sum(speeds.values()), max(speeds.values())
    distributed_work = _work_ms(distributed, speeds)
    single_work = _work_ms(single, speeds)
    if distributed_work <= 0 or single_work <= 0:
        raise ValueError("a traced job with no computing in it")
    return SpeedupFactors(
        ideal=total / fastest,
        distributed_ms=distributed_ms,
        single_ms=single_ms,
        distributed_work_ms=distributed_work,
        single_work_ms=single_work,
        distributed_busy=distributed_work / (total * distributed_ms),
        single_busy=single_work / (fastest * single_ms),
    )
