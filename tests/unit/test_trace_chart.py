"""The text chart of a traced job and its per-device times."""

from __future__ import annotations

import pytest

from edgedi.agent.trace_chart import device_times, render_comparison, render_trace, trace_timeline
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import JobSpan


def _span(device: str, what: str, start: float, end: float, segment: int | None = None) -> JobSpan:
    return JobSpan.model_validate(
        {
            "device": DeviceId(device),
            "what": what,
            "start_ms": start,
            "end_ms": end,
            "segment": segment,
        }
    )


def test_compute_hides_waiting_and_segments_are_numbered() -> None:
    spans = [
        _span("a", "scatter", 0, 10),
        _span("a", "compute", 10, 50, segment=0),
        _span("b", "rows", 0, 50),
        _span("b", "compute", 50, 100, segment=1),
        _span("a", "tail", 90, 100),
    ]
    axis, line_a, line_b = render_trace(spans, width=10)
    assert axis.endswith("100 ms")
    assert line_a == "a |s0000    T|"
    assert line_b == "b |.....11111|"


def test_device_times_count_overlaps_once() -> None:
    spans = [
        _span("a", "compute", 0, 40, segment=0),
        _span("a", "compute", 30, 60, segment=1),
        _span("a", "gate", 60, 70),
        _span("a", "tail", 70, 80),
        _span("b", "rows", 0, 20),
        _span("b", "compute", 20, 30, segment=0),
    ]
    a, b = device_times(spans)
    assert (a.device, a.compute_ms, a.idle_ms, a.until_ms) == ("a", pytest.approx(70), 10, 80)
    assert (b.device, b.compute_ms, b.idle_ms, b.until_ms) == ("b", 10, 20, 30)


def test_an_empty_trace_says_so() -> None:
    assert render_trace([]) == ["(no trace)"]


def test_the_comparison_image_stacks_measured_over_predicted() -> None:
    measured = [_span("a", "scatter", 0, 5), _span("a", "compute", 5, 50, segment=0)]
    predicted = [_span("a", "send", 0, 4), _span("b", "compute", 4, 40, segment=0)]
    timeline = trace_timeline(measured)
    assert [(e.kind, e.start, e.end) for e in timeline.events] == [
        ("send", 0.0, 0.005),
        ("compute", 0.005, 0.05),
    ]
    image = render_comparison(measured, predicted, "test", width=400)
    assert image.width == 400
    # Both rows of devices, twice (measured, predicted), and the charts' margins.
    assert image.height > 2 * 2 * 22
