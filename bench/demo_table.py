"""Render `edgedi demo --json` lines (bench/demo_zoo.sh) as a Markdown table.

.venv/bin/python bench/demo_table.py bench/results/demo_zoo.jsonl "COMMAND" [WHERE THE LOGS ARE]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _cluster(rows: list[dict]) -> str:
    """How the rows' devices were made slow (the demo's `emulation`)."""
    methods = {row.get("emulation", "cgroup-v1") for row in rows}
    if methods == {"paced"}:
        return (
            "Demo cluster with paced devices (`--emulation paced`): 4 agent processes whose "
            "compute steps each take their CPU time / 0.4, 0.4, 0.25, 0.25, event loops under "
            "CPU quotas of those speeds"
        )
    if methods <= {"cgroup-v1", "cgroup-v2"}:
        return (
            "Default demo cluster: 4 agent processes under CPU quotas of 0.4/0.4/0.25/0.25 of "
            "a core"
        )
    return "Demo clusters emulated by " + ", ".join(sorted(methods))


def main() -> int:
    path, command = Path(sys.argv[1]), sys.argv[2]
    logs = sys.argv[3] if len(sys.argv) > 3 else "`demo_M.log` beside this file"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [
        "# `edgedi demo` on every zoo model",
        "",
        f"Command: `{command}` (each model: `edgedi demo --model M --images K --json`; "
        f"the full output of each run is in {logs}).",
        "",
        _cluster(rows) + ", loopback, private Mosquitto, strategy `auto`. Medians of K "
        "images, the "
        "distributed and the one-device (`single`) jobs interleaved image by image in one "
        "run. `predicted` is the plan in force at the end; `measured` the median of the "
        "jobs that ran with that plan. Spread: interquartile range / median.",
        "",
        "| model | plan at the end | devices used | median ms | single ms | speedup | ideal | "
        "predicted ms | measured ms | prediction | spread | exact (max abs diff) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        error = row.get("prediction_error")
        spread = row.get("spread") or {}
        spreads = "/".join(
            "–" if spread.get(k) is None else f"{spread[k]:.0%}" for k in ("distributed", "single")
        )
        speedup = row.get("measured_speedup")
        lines.append(
            f"| {row['model']} | {row['strategy']} | {len(row['devices_used'])} | "
            f"{_ms(row['median_ms']['distributed'])} | {_ms(row['median_ms']['single'])} | "
            f"{'–' if speedup is None else f'{speedup:.2f}×'} | {row['ideal_speedup']:.2f}× | "
            f"{_ms(row['predicted_ms'])} | {_ms(row['measured_ms_with_final_plan'])} | "
            f"{'–' if error is None else f'{error:+.0%}'} | {spreads} | "
            f"{row['max_abs_difference']:.1e} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
