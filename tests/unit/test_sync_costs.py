"""What each synchronisation point of a traced job cost beyond computing."""

from __future__ import annotations

import pytest

from edgedi.agent.sync_costs import sync_costs
from edgedi.broker.messages import JobSpan


def span(
    device: str, segment: int | None, start: float, end: float, what: str = "compute"
) -> JobSpan:
    return JobSpan(device=device, segment=segment, what=what, start_ms=start, end_ms=end)  # type: ignore[arg-type]


def test_a_row_boundary_costs_the_step_less_its_longest_computing() -> None:
    spans = [
        span("dev-1", None, 0, 1, "scatter"),
        span("dev-1", 0, 1, 10),
        span("dev-2", 0, 1, 9),
        # Segment 1 ends at 22, 12 ms after segment 0 did; dev-2 computed 10 of them.
        span("dev-1", 1, 13, 20),
        span("dev-2", 1, 12, 22),
        span("dev-2", 1, 10, 12, "rows"),
        # Segment 2: dev-1 computes its tile in two parts (interior, then edges).
        span("dev-1", 2, 23, 26),
        span("dev-1", 2, 27, 31),
        span("dev-2", 2, 24, 28),
    ]
    costs = sync_costs(spans)
    assert costs.boundaries_ms == pytest.approx((2.0, 2.0))
    assert costs.exchanges_ms == ()
    assert costs.boundary_ms == pytest.approx(2.0)
    assert costs.exchange_ms is None


def test_each_exchange_of_a_segment_is_one_step() -> None:
    # Segment 0: rows, ends at 10. Segment 1 has gate spans: three steps on each device,
    # two exchanges between them.
    spans = [
        span("dev-1", 0, 0, 10),
        span("dev-2", 0, 0, 8),
        span("dev-1", 1, 11, 15),  # step 0 ends at 16 (dev-2): boundary 16 - 10 - 5 = 1
        span("dev-2", 1, 11, 16),
        span("dev-1", 1, 15, 19, "gate"),
        span("dev-2", 1, 16, 19, "gate"),
        span("dev-1", 1, 19, 24),  # step 1 ends at 24: 24 - 16 - 5 = 3
        span("dev-2", 1, 19, 23),
        span("dev-1", 1, 24, 27, "gate"),
        span("dev-2", 1, 23, 27, "gate"),
        span("dev-1", 1, 27, 30),  # step 2 ends at 31: 31 - 24 - 4 = 3
        span("dev-2", 1, 27, 31),
    ]
    costs = sync_costs(spans)
    assert costs.boundaries_ms == pytest.approx((1.0,))
    assert costs.exchanges_ms == pytest.approx((3.0, 3.0))
    assert costs.exchange_ms == pytest.approx(3.0)


def test_a_job_of_one_segment_has_no_synchronisation_and_no_spans_none() -> None:
    assert sync_costs([span("dev-1", 0, 0, 100), span("dev-1", None, 100, 101, "tail")]) == (
        sync_costs([])
    )
    assert sync_costs([]).boundary_ms is None
