"""The factors that take the ideal speedup to the measured one, from two traced jobs."""

from __future__ import annotations

import pytest

from edgedi.agent.speedup_factors import speedup_factors
from edgedi.broker.messages import JobSpan

SPEEDS = {"dev-1": 0.4, "dev-2": 0.4, "dev-3": 0.2}


def span(device: str, start: float, end: float, what: str = "compute") -> JobSpan:
    return JobSpan(device=device, what=what, start_ms=start, end_ms=end)  # type: ignore[arg-type]


def test_a_perfect_split_measures_the_ideal() -> None:
    # 100 ms of one-core work: 250 ms on the fastest device alone; split by speed,
    # every device computes the whole 100 ms of the distributed job.
    single = [span("dev-1", 0, 250)]
    distributed = [span("dev-1", 0, 100), span("dev-2", 0, 100), span("dev-3", 0, 100)]
    factors = speedup_factors(distributed, 100.0, single, 250.0, SPEEDS)
    assert factors.ideal == pytest.approx(2.5)
    assert factors.work_ratio == pytest.approx(1.0)
    assert factors.distributed_busy == pytest.approx(1.0)
    assert factors.single_busy == pytest.approx(1.0)
    assert factors.speedup == pytest.approx(2.5)


def test_the_factors_multiply_to_the_measured_speedup() -> None:
    # Halos make the split compute more; waits (rows, gates) leave devices idle; the
    # single job spends time outside its computing (the scatter), and overlapping
    # spans of one device are counted once.
    single = [span("dev-1", 5, 255), span("dev-1", 100, 200), span("dev-1", 0, 5, "scatter")]
    distributed = [
        span("dev-1", 0, 60),
        span("dev-1", 70, 130),
        span("dev-2", 10, 120),
        span("dev-3", 20, 130),
        span("dev-3", 5, 20, "rows"),
        span("dev-1", 130, 140, "tail"),
    ]
    factors = speedup_factors(distributed, 140.0, single, 260.0, SPEEDS)
    assert factors.distributed_work_ms == pytest.approx(130 * 0.4 + 110 * 0.4 + 110 * 0.2)
    assert factors.single_work_ms == pytest.approx(250 * 0.4)
    assert factors.work_ratio < 1.0 and factors.distributed_busy < 1.0
    product = factors.ideal * factors.work_ratio * factors.distributed_busy / factors.single_busy
    assert product == pytest.approx(260.0 / 140.0)
    assert factors.as_dict()["speedup"] == pytest.approx(product)


def test_an_unused_device_counts_against_the_split() -> None:
    single = [span("dev-1", 0, 250)]
    two_of_three = [span("dev-1", 0, 125), span("dev-2", 0, 125)]
    factors = speedup_factors(two_of_three, 125.0, single, 250.0, SPEEDS)
    assert factors.distributed_busy == pytest.approx(0.8)  # dev-3's 0.2 of 1.0 idle
    assert factors.speedup == pytest.approx(2.0)


def test_bad_inputs_are_refused_with_a_reason() -> None:
    single = [span("dev-1", 0, 250)]
    with pytest.raises(ValueError, match="no speed for device"):
        speedup_factors([span("dev-9", 0, 10)], 10.0, single, 250.0, SPEEDS)
    with pytest.raises(ValueError, match="took time"):
        speedup_factors(single, 0.0, single, 250.0, SPEEDS)
    with pytest.raises(ValueError, match="no computing"):
        speedup_factors([span("dev-1", 0, 10, "rows")], 10.0, single, 250.0, SPEEDS)
