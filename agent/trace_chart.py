"""A traced job's timeline as text: one line per device, for a terminal or a log.

`JobResult.trace` holds the intervals each device spent on a traced job (see
`JobSubmit.trace`). This module draws them as a Gantt chart of characters and sums
them per device, so a person sees at a glance where a distributed job waits;
`render_comparison` draws it beside the plan's predicted timeline as an image.
Pure: no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from edgedi.broker.messages import JobSpan
from edgedi.planner.gantt import render_gantt
from edgedi.planner.simulator import Event, EventKind, Timeline

__all__ = ["DeviceTime", "device_times", "render_comparison", "render_trace", "trace_timeline"]

# Drawn over one another in this order: what a device computes hides what it waits for.
_DRAW_ORDER = ("rows", "queue", "gate", "scatter", "tail", "compute")
_MARKS = {"rows": ".", "queue": ":", "gate": "g", "scatter": "s", "tail": "T"}
_SEGMENT_MARKS = "0123456789abcdefghijklmnopqrstuvwxyz"
LEGEND = (
    "digit/letter: computing that segment (0 = first); g: waiting for a gate's partials; "
    ".: waiting for input rows; ':' waiting for the compute thread; s: leader sending the "
    "tasks; T: tail (pool + classifier); blank: idle"
)


@dataclass(frozen=True)
class DeviceTime:
    """Milliseconds one device spent computing, and not, until its last interval."""

    device: str
    compute_ms: float
    """Computing (tiles, or the tail); overlapping intervals counted once."""
    idle_ms: float
    """Not computing, from the job's start to `until_ms`: waiting for rows, gate
    partials or the tasks, or sending."""
    until_ms: float


def _mark(span: JobSpan) -> str:
    if span.what == "compute":
        segment = span.segment or 0
        return _SEGMENT_MARKS[segment % len(_SEGMENT_MARKS)]
    return _MARKS[span.what]


def render_trace(spans: Sequence[JobSpan], width: int = 72) -> list[str]:
    """The chart's lines: a time axis, then one line per device."""
    if not spans:
        return ["(no trace)"]
    end = max(span.end_ms for span in spans)
    scale = width / max(end, 1e-9)
    devices = sorted({span.device for span in spans})
    label = max(len(device) for device in devices)
    lines = [f"{'':<{label}}  0 ms{'':<{max(1, width - 14)}}{end:6.0f} ms"]
    for device in devices:
        cells = [" "] * width
        mine = [span for span in spans if span.device == device]
        for kind in _DRAW_ORDER:
            for span in mine:
                if span.what != kind:
                    continue
                first = min(width - 1, int(span.start_ms * scale))
                last = max(first + 1, min(width, round(span.end_ms * scale)))
                for cell in range(first, last):
                    cells[cell] = _mark(span)
        lines.append(f"{device:<{label}} |{''.join(cells)}|")
    return lines


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= reach:
            continue
        total += stop - max(start, reach)
        reach = stop
    return total


def device_times(spans: Sequence[JobSpan]) -> list[DeviceTime]:
    """Per device: time computing, time not, and the end of its last interval."""
    computing: dict[str, list[tuple[float, float]]] = defaultdict(list)
    until: dict[str, float] = defaultdict(float)
    for span in spans:
        if span.what in ("compute", "tail"):
            computing[span.device].append((span.start_ms, span.end_ms))
        until[span.device] = max(until[span.device], span.end_ms)
    times = []
    for device in sorted(until):
        compute = _union_ms(computing[device])
        times.append(DeviceTime(device, compute, max(0.0, until[device] - compute), until[device]))
    return times


_TIMELINE_KINDS: dict[str, EventKind] = {
    "compute": "compute",
    "tail": "tail",
    "send": "send",
    "scatter": "send",
}


def trace_timeline(spans: Sequence[JobSpan], latency_ms: float | None = None) -> Timeline:
    """A trace as the planner's `Timeline`, for `edgedi.planner.gantt.render_gantt`.

    Waits (rows, queue, gate) are left out: they are the gaps between the bars.
    """
    events = tuple(
        Event(
            device=span.device,
            kind=_TIMELINE_KINDS[span.what],
            start=span.start_ms / 1000.0,
            end=span.end_ms / 1000.0,
            segment=-1 if span.segment is None else span.segment,
            label=span.what,
        )
        for span in spans
        if span.what in _TIMELINE_KINDS
    )
    end_ms = latency_ms if latency_ms is not None else max((s.end_ms for s in spans), default=0.0)
    return Timeline(
        latency_s=end_ms / 1000.0,
        events=events,
        segment_ends=(),
        bytes_moved=0.0,
        throughput=0.0,
    )


def render_comparison(
    measured: Sequence[JobSpan], predicted: Sequence[JobSpan], title: str, width: int = 1200
) -> Image.Image:
    """The measured timeline above the predicted one, on one time scale."""
    end_ms = max((s.end_ms for s in (*measured, *predicted)), default=1.0)
    devices = sorted({s.device for s in (*measured, *predicted)})
    charts = [
        render_gantt(trace_timeline(spans, end_ms), devices, title=f"{title}: {name}", width=width)
        for name, spans in (("measured", measured), ("predicted by the plan", predicted))
    ]
    image = Image.new("RGB", (width, sum(chart.height for chart in charts)), (255, 255, 255))
    top = 0
    for chart in charts:
        image.paste(chart, (0, top))
        top += chart.height
    return image
