"""How much redundant work halos add when a fused segment is split into row strips.

For each zoo model, fused segments of 1..k consecutive spatial units starting early,
in the middle and late in the network, split into 2, 4 and 8 equal row strips:

* predicted: MACs of all tiles (halo rows included, from `segment_tiles`) divided by
  the MACs of the same segment computed as one tile;
* measured: time to run all tiles one after the other on one core (exact gates
  included) divided by the time of the whole segment's plain forward pass, both
  measured side by side in the same loop (torch.set_num_threads(1), median of
  `--repeats` runs).

    .venv/bin/python bench/halo_overhead.py [--quick] [--models vgg16,resnet18]
        [--max-length 5] [--repeats 5] [--out bench/results/halo_overhead.md]

Writes a Markdown table with the command and machine information to `--out`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgedi.models.tiling import drive_tiles, full_width, run_tile, stitch
from edgedi.models.units import Unit, segment_tiles, split_rows
from edgedi.models.zoo import ZooModel, build_model, randomize_statistics

DEFAULT_MODELS = (
    "vgg16",
    "vgg16-edgedi",
    "resnet18",
    "resnet18-edgedi",
    "resnet34",
    "resnet34-edgedi",
)
SPLITS = (2, 4, 8)
# One tile through the tiled path: what the tile machinery costs without any halo.
TIMED = (1, *SPLITS)
DEFAULT_OUT = Path(__file__).parent / "results" / "halo_overhead.md"


@dataclass(frozen=True)
class Row:
    model: str
    first: Unit
    last: Unit
    length: int
    whole_macs: int
    whole_seconds: float
    predicted: dict[int, float]
    measured: dict[int, float]


# Short segments run several times per sample, so that timer resolution and scheduler
# noise do not dominate: each sample of the whole pass lasts at least this long.
MIN_SAMPLE_SECONDS = 0.02


def _seconds(run: Callable[[], object], loops: int) -> float:
    started = time.perf_counter()
    for _ in range(loops):
        run()
    return (time.perf_counter() - started) / loops


def measure_segment(
    model: ZooModel, units: tuple[Unit, ...], x: torch.Tensor, repeats: int
) -> tuple[float, dict[int, float]]:
    """Median seconds of the whole segment and of its tiles for each split, interleaved."""
    first, stop = units[0].index, units[-1].index + 1
    height = units[-1].out_shape[1]
    partitions = {parts: split_rows(height, [1.0] * parts) for parts in TIMED}

    def whole() -> object:
        with torch.inference_mode():
            return model.run_units(x, first, stop)

    # The geometry is the planner's work, done once per plan: it is not timed.
    columns = full_width(units)
    needed = x[:, :, :, columns.in_rows.start : columns.in_rows.stop]
    geometries = {parts: segment_tiles(units, partitions[parts]) for parts in TIMED}

    def tiles(parts: int) -> Callable[[], object]:
        def run() -> object:
            runners = []
            for tile in geometries[parts]:
                strip = needed[:, :, tile.in_rows.start : tile.in_rows.stop]
                runners.append(run_tile(model, tile, strip, columns=columns))
            return stitch(drive_tiles(runners), parts)

        return run

    runs: dict[int, Callable[[], object]] = {0: whole}
    runs.update({parts: tiles(parts) for parts in TIMED})
    for run in runs.values():  # warm up allocators and kernels once
        run()
    loops = max(1, math.ceil(MIN_SAMPLE_SECONDS / _seconds(whole, 1)))
    samples: dict[int, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            samples[key].append(_seconds(run, loops))
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return medians[0], {parts: medians[parts] / medians[0] for parts in TIMED}


def predicted_ratios(units: tuple[Unit, ...]) -> tuple[int, dict[int, float]]:
    height = units[-1].out_shape[1]
    one = segment_tiles(units, [split_rows(height, [1.0])[0]])[0].macs()
    ratios = {}
    for parts in SPLITS:
        tiles = segment_tiles(units, split_rows(height, [1.0] * parts))
        ratios[parts] = sum(tile.macs() for tile in tiles) / one
    return one, ratios


def starts(count: int, length: int) -> list[int]:
    """Early, middle and late start positions for segments of up to `length` units."""
    late = max(0, count - length)
    middle = max(0, min(late, count // 2 - length // 2))
    return sorted({0, middle, late})


def bench_model(name: str, size: int, max_length: int, repeats: int) -> list[Row]:
    model = build_model(name, size, seed=0)
    randomize_statistics(model, seed=0)
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        outputs = model.unit_outputs(x)
    spatial = model.spec.spatial_units
    rows = []
    for start in starts(len(spatial), max_length):
        segment_input = x if start == 0 else outputs[start - 1]
        for length in range(1, max_length + 1):
            if start + length > len(spatial):
                break
            units = spatial[start : start + length]
            whole_macs, predicted = predicted_ratios(units)
            whole_seconds, measured = measure_segment(model, units, segment_input, repeats)
            rows.append(
                Row(
                    name,
                    units[0],
                    units[-1],
                    length,
                    whole_macs,
                    whole_seconds,
                    predicted,
                    measured,
                )
            )
            print(
                f"{name:16s} {units[0].name:>9s}..{units[-1].name:<9s} "
                + f" 1/{measured[1]:.2f} "
                + " ".join(f"{predicted[p]:.2f}/{measured[p]:.2f}" for p in SPLITS),
                file=sys.stderr,
                flush=True,
            )
    return rows


def machine_info() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; torch threads: 1",
        f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
        f"- load average (1/5/15 min) when the run ended: {load} (the cores are shared)",
    ]


def render(rows: list[Row], command: str, size: int, repeats: int, seconds: float) -> str:
    header = [
        f"# Halo overhead of fused row strips ({size}×{size} input)",
        "",
        "Generated by `bench/halo_overhead.py`; the numbers are quoted in the docs.",
        "",
        f"Command: `{command}` ({seconds:.0f} s)",
        "",
        *machine_info(),
        "",
        "Each row is one fused segment (consecutive spatial units, inclusive) split into",
        "N equal row strips. *MAC ×N*: MACs of all N tiles (halos included) / MACs of the",
        "segment as one tile, from the geometry alone. *time ×N*: time of running the N",
        "tiles one after another (exact gate synchronisation included) / time of the",
        "segment's plain forward pass, on one core, median of",
        f"{repeats} interleaved samples (a sample repeats a short segment until it lasts",
        f"{MIN_SAMPLE_SECONDS * 1e3:.0f} ms). *whole ms* is that plain forward pass; *GMAC* its",
        "work as one tile. *time ×1* runs the segment as a single tile through the tiled path:",
        "the cost of the tile machinery alone, without halos.",
        "",
        "| model | units | length | GMAC | whole ms | MAC ×2 | MAC ×4 | MAC ×8 "
        "| time ×1 | time ×2 | time ×4 | time ×8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = []
    for row in rows:
        span = f"{row.first.index}–{row.last.index} ({row.first.name}..{row.last.name})"
        predicted = " | ".join(f"{row.predicted[p]:.2f}" for p in SPLITS)
        measured = " | ".join(f"{row.measured[p]:.2f}" for p in TIMED)
        lines.append(
            f"| {row.model} | {span} | {row.length} | {row.whole_macs / 1e9:.3f} | "
            f"{row.whole_seconds * 1e3:.1f} | {predicted} | {measured} |"
        )
    summary = ["", "## Summary (medians over the segments above)", ""]
    summary.append("| model | MAC ×2 | MAC ×4 | MAC ×8 | time ×1 | time ×2 | time ×4 | time ×8 |")
    summary.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    models = list(dict.fromkeys(row.model for row in rows))
    for model in [*models, "all"]:
        chosen = [row for row in rows if model in ("all", row.model)]
        mac_ratios = " | ".join(
            f"{statistics.median(row.predicted[p] for row in chosen):.2f}" for p in SPLITS
        )
        time_ratios = " | ".join(
            f"{statistics.median(row.measured[p] for row in chosen):.2f}" for p in TIMED
        )
        summary.append(f"| {model} | {mac_ratios} | {time_ratios} |")
    return "\n".join([*header, *lines, *summary, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    parser.add_argument("--size", type=int, default=200, help="input side (default 200)")
    parser.add_argument("--max-length", type=int, default=5, help="longest segment (units)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--quick", action="store_true", help="3 units, 3 repeats")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to write")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_length, args.repeats = 3, 3
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows: list[Row] = []
    for name in args.models.split(","):
        rows += bench_model(name.strip(), args.size, args.max_length, args.repeats)
    elapsed = time.perf_counter() - started
    command = shlex.join([".venv/bin/python", "bench/halo_overhead.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, command, args.size, args.repeats, elapsed))
    print(f"wrote {args.out} in {elapsed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
