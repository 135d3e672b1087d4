"""Draw a simulated timeline as a Gantt chart (Pillow only; returns an image, saves nothing).

One row per device: compute in blue, sending in orange, receiving in green, the tail in
purple; dashed lines mark segment ends. Pillow is a dependency already; matplotlib is
not needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from edgedi.planner.simulator import Timeline

COLOURS = {
    "compute": (66, 118, 196),
    "send": (235, 140, 52),
    "receive": (80, 170, 90),
    "tail": (140, 80, 170),
}
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (215, 215, 215)


def _tick_step(span: float, ticks: int = 8) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def render_gantt(
    timeline: Timeline,
    devices: Sequence[str],
    title: str = "",
    width: int = 1200,
    row_height: int = 22,
) -> Image.Image:
    """The timeline of `devices` (in this order) as an RGB image."""
    font = ImageFont.load_default()
    label_width = 10 + max([len(d) for d in devices] + [6]) * 7
    top, bottom = 34, 40
    height = top + bottom + row_height * max(1, len(devices))
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    end = max([timeline.latency_s, *(e.end for e in timeline.events)], default=1e-3) or 1e-3
    plot_left, plot_right = label_width, width - 20
    scale = (plot_right - plot_left) / end

    def x_of(seconds: float) -> float:
        return plot_left + seconds * scale

    step = _tick_step(end)
    tick = 0.0
    while tick <= end * 1.0001:
        x = x_of(tick)
        draw.line([(x, top), (x, height - bottom)], fill=GRID)
        draw.text((x - 10, height - bottom + 4), f"{tick * 1000:g}", fill=INK, font=font)
        tick += step
    draw.text((plot_left, height - 16), "milliseconds", fill=INK, font=font)
    for segment_end in timeline.segment_ends:
        x = x_of(segment_end)
        for y in range(top, height - bottom, 6):
            draw.line([(x, y), (x, y + 3)], fill=INK)
    rows = {device: i for i, device in enumerate(devices)}
    for i, device in enumerate(devices):
        y = top + i * row_height
        draw.text((6, y + row_height // 2 - 6), device, fill=INK, font=font)
    # Compute first, transfers on top as thin bands (sending above, receiving below).
    bands = {
        "compute": (3, 3),
        "tail": (3, 3),
        "send": (2, row_height - 9),
        "receive": (row_height - 9, 2),
    }
    for event in sorted(timeline.events, key=lambda e: e.kind in ("send", "receive")):
        if event.device not in rows:
            continue
        y = top + rows[event.device] * row_height
        above, below = bands[event.kind]
        x0, x1 = x_of(event.start), max(x_of(event.end), x_of(event.start) + 1)
        draw.rectangle([x0, y + above, x1, y + row_height - below], fill=COLOURS[event.kind])
    heading = title or f"latency {timeline.latency_s * 1000:.2f} ms"
    draw.text((plot_left, 8), heading, fill=INK, font=font)
    x = width - 330
    for kind, colour in COLOURS.items():
        draw.rectangle([x, 10, x + 12, 20], fill=colour)
        draw.text((x + 16, 8), kind, fill=INK, font=font)
        x += 80
    return image
