"""What the first job of a new plan paid for VGG-16's split head, before and now.

    .venv/bin/python bench/head_split_first_job.py [--out bench/results/head_split_first_job.md]

Each last tile multiplies its rows of the last map by their block of the classifier's
first layer (4096 × 18432, 300 MB). Until session 7 that block was gathered into a
contiguous copy the first time a row range was seen (`_block` at commit be7cf7b), so
the first job of every new plan paid the gather on every device; now the weights are
laid out once per model, by map row, at load, and any row range is read in place.
This times, on one core and one torch thread, for the row ranges of a four-device
plan: the gather of each block (the old first-job cost), the multiply with a gathered
block (the old steady state) and the multiply reading the laid-out weights in place
(now, every job), plus the one-time layout. A device at a fraction f of a core pays
about 1/f times these (a 0.25-core device four times).
"""

from __future__ import annotations

import argparse
import functools
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgedi.models import head_split
from edgedi.models.zoo import build_model

ROOT = Path(__file__).resolve().parent.parent
ROWS = [(0, 2), (2, 4), (4, 5), (5, 6)]  # a four-device split of the 6-row last map
REPEATS = 5


def _median_ms(function: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/head_split_first_job.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model("vgg16", 200, seed=0)
    unit, op = head_split._first_linear(model)
    channels, height, width = model.spec.units[unit].in_shape
    weight = op.linear.weight.detach().view(-1, channels, height, width)
    x = torch.randn(1, channels, height, width)

    started = time.perf_counter()
    head_split.prepare_head_split(model)
    layout_ms = (time.perf_counter() - started) * 1e3

    def gather(rows: tuple[int, int]) -> torch.Tensor:
        block = weight[:, :, rows[0] : rows[1], :]
        return block.reshape(weight.shape[0], -1).contiguous()

    def multiply(part: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return part.reshape(1, -1) @ block.T

    rows_lines = []
    with torch.inference_mode():
        for rows in ROWS:
            part = x[:, :, rows[0] : rows[1], :].contiguous()
            gathered = gather(rows)
            gather_ms = _median_ms(functools.partial(gather, rows))
            copied_ms = _median_ms(functools.partial(multiply, part, gathered))
            in_place_ms = _median_ms(functools.partial(head_split.head_partial, model, rows, part))
            rows_lines.append(
                f"| {rows[0]}–{rows[1]} | {gathered.numel() * 4 / 2**20:.0f} | {gather_ms:.0f} "
                f"| {copied_ms:.1f} | {in_place_ms:.1f} |"
            )
    command = " ".join(["bench/head_split_first_job.py", *map(shlex.quote, sys.argv[1:])])
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines = [
        "# VGG-16's split head: the first job of a new plan, before and now",
        "",
        f"Command: `.venv/bin/python {command}`",
        "",
        f"- {platform.machine()}, one core, one torch thread; load average {load} at the "
        f"end; medians of {REPEATS}",
        f"- laying the weights out by map row, once per model at load: {layout_ms:.0f} ms",
        "",
        "| rows of the 6-row map | block MB | gather the block, ms (before: first job of a "
        "plan) | multiply, gathered block, ms (before: later jobs) | multiply in place, ms "
        "(now: every job) |",
        "|---|---:|---:|---:|---:|",
        *rows_lines,
        "",
        "A device at a fraction f of a core pays about 1/f times these: on the demo "
        "cluster's 0.25-core devices the gather of a two-row block alone is four times "
        "the figure above.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
