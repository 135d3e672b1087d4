"""Each device's computing per segment in a demo's traced job, measured against predicted.

    .venv/bin/edgedi demo --model M --json > run.json
    .venv/bin/python bench/trace_errors.py run.json

`edgedi demo --json` carries the traced job's spans and the plan's predicted spans
(`trace.spans`, `trace.predicted_spans`). Per segment and device this prints when
its computing started and ended and how long it computed, both ways, and the error
of the duration: how far each tile's own time is from what the plan balanced the
segment on. A segment ends for its successors when its slowest producer ends.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def _computing(spans: list[dict[str, Any]]) -> dict[tuple[int, str], list[float]]:
    """(segment, device) → [first start, last end, summed duration], ms."""
    found: dict[tuple[int, str], list[float]] = defaultdict(lambda: [float("inf"), 0.0, 0.0])
    for span in spans:
        if span["what"] != "compute" or span.get("segment") is None:
            continue
        entry = found[(span["segment"], span["device"])]
        entry[0] = min(entry[0], span["start_ms"])
        entry[1] = max(entry[1], span["end_ms"])
        entry[2] += span["end_ms"] - span["start_ms"]
    return found


def main() -> int:
    figures = json.loads(Path(sys.argv[1]).read_text().strip().splitlines()[-1])
    trace = figures["trace"]
    measured = _computing(trace["spans"])
    predicted = _computing(trace["predicted_spans"])
    print(f"# {figures.get('model')}, {trace['strategy']}, emulation {figures.get('emulation')}")
    print()
    print(
        "| segment | device | measured start–end ms | computing ms | predicted start–end ms "
        "| computing ms | error |"
    )
    print("|---:|---|---|---:|---|---:|---:|")
    errors = []
    for key in sorted(measured.keys() & predicted.keys()):
        (m_start, m_end, m_ms), (p_start, p_end, p_ms) = measured[key], predicted[key]
        error = m_ms / p_ms - 1
        errors.append(abs(error))
        print(
            f"| {key[0]} | {key[1]} | {m_start:.0f}–{m_end:.0f} | {m_ms:.0f} | "
            f"{p_start:.0f}–{p_end:.0f} | {p_ms:.0f} | {error:+.0%} |"
        )
    if errors:
        print()
        print(
            f"Median absolute error of a tile's computing time: "
            f"{statistics.median(errors):.0%} over {len(errors)} tiles."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
