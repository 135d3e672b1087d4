"""`edgedi verify`: partitioned execution against the whole forward pass, on random data.

    edgedi verify MODEL --parts N [--segments 3,7,12 | --fused K] [--grid RxC]
                  [--seed S] [--size 200] [--gate-mode exact|local]

The model gets random weights with non-trivial batch-norm statistics and biases (see
`randomize_statistics`), the input is random, and every spatial segment runs as
tiles in this process, gates combined from the tiles' partial sums. Segments end at
the unit indices of `--segments` (the last spatial unit always ends one), or hold
`--fused` units each (default 1: no fusion). `--parts N` splits each segment's output
rows into N equal strips; `--grid RxC` uses R row strips × C column strips instead.

Exit status: 0 when the logits agree within 1e-5 relative to their scale (max abs
difference / max abs value), 1 when they do not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time

import torch

from edgedi.models.specs import DEFAULT_INPUT_SIZE, UnknownModelError, get_spec
from edgedi.models.tiling import Segment, run_partitioned
from edgedi.models.units import ModelSpec, split_rows
from edgedi.models.zoo import build_model, randomize_statistics

TOLERANCE = 1e-5
USAGE_ERROR = 2


class _ArgumentError(ValueError):
    """A bad combination of arguments, reported with exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="zoo model name (see `edgedi models`)")
    parser.add_argument("--parts", type=int, help="row strips per segment (N >= 1)")
    fusion = parser.add_mutually_exclusive_group()
    fusion.add_argument(
        "--segments", help="comma-separated unit indices where segments end, e.g. 3,7,12"
    )
    fusion.add_argument("--fused", type=int, help="units per segment (default 1)")
    parser.add_argument("--grid", help="RxC: R row strips × C column strips per segment")
    parser.add_argument("--seed", type=int, default=0, help="weights and input seed (default 0)")
    parser.add_argument(
        "--size",
        type=int,
        default=DEFAULT_INPUT_SIZE,
        help=f"square input side in pixels (default {DEFAULT_INPUT_SIZE})",
    )
    parser.add_argument(
        "--gate-mode",
        choices=("exact", "local"),
        default="exact",
        help="exact: gates combine all tiles (default); local: EdgeDI's per-tile approximation",
    )


def _segment_ends(spec: ModelSpec, segments: str | None, fused: int | None) -> list[int]:
    last = len(spec.spatial_units) - 1
    if segments is not None:
        try:
            ends = [int(text) for text in segments.split(",") if text.strip()]
        except ValueError:
            raise _ArgumentError(
                f"--segments wants unit indices like 3,7,12, got {segments!r}"
            ) from None
        if any(end < 0 or end > last for end in ends):
            raise _ArgumentError(f"--segments: spatial units of {spec.name} are 0..{last}")
        if any(b <= a for a, b in itertools.pairwise(ends)):
            raise _ArgumentError("--segments must be strictly increasing")
        return ends if ends and ends[-1] == last else [*ends, last]
    size = 1 if fused is None else fused
    if size < 1:
        raise _ArgumentError(f"--fused must be at least 1, got {size}")
    return [*range(size - 1, last, size), last]


def _grid(parts: int | None, grid: str | None) -> tuple[int, int | None]:
    """(row strips, column strips or None for full-width strips)."""
    if grid is not None:
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", grid)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise _ArgumentError(f"--grid wants RxC with R, C >= 1, e.g. 2x3, got {grid!r}")
        rows, columns = int(match[1]), int(match[2])
        if parts is not None and parts != rows * columns:
            raise _ArgumentError(
                f"--parts {parts} contradicts --grid {grid} ({rows * columns} tiles)"
            )
        return rows, columns
    if parts is None:
        raise _ArgumentError("give --parts N (or --grid RxC)")
    if parts < 1:
        raise _ArgumentError(f"--parts must be at least 1, got {parts}")
    return parts, None


def _plan(spec: ModelSpec, ends: list[int], rows: int, columns: int | None) -> list[Segment]:
    plan = []
    first = 0
    for last in ends:
        _channels, height, width = spec.units[last].out_shape
        row_parts = split_rows(height, [1.0] * rows)
        column_parts = None if columns is None else split_rows(width, [1.0] * columns)
        plan.append(Segment(first, last, row_parts, column_parts))
        first = last + 1
    return plan


def run(args: argparse.Namespace) -> int:
    try:
        spec = get_spec(args.model, args.size)
        ends = _segment_ends(spec, args.segments, args.fused)
        rows, columns = _grid(args.parts, args.grid)
    except UnknownModelError as error:
        print(f"edgedi verify: {error}", file=sys.stderr)
        return USAGE_ERROR
    except ValueError as error:  # _ArgumentError, or an input too small for the model
        print(f"edgedi verify: {error}", file=sys.stderr)
        return USAGE_ERROR

    plan = _plan(spec, ends, rows, columns)
    model = build_model(args.model, args.size, seed=args.seed)
    randomize_statistics(model, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, *spec.input_shape, generator=generator)

    started = time.perf_counter()
    with torch.inference_mode():
        whole = model(x)
    whole_seconds = time.perf_counter() - started
    started = time.perf_counter()
    tiled = run_partitioned(model, plan, x, gate_mode=args.gate_mode)
    tiled_seconds = time.perf_counter() - started

    difference = float((tiled - whole).abs().max())
    scale = float(whole.abs().max())
    relative = difference / scale if scale > 0 else difference
    grid = f"{rows}x{columns} grid" if columns is not None else f"{rows} row strips"
    cuts = ",".join(str(segment.last) for segment in plan)
    print(f"model {spec.name} at {args.size}x{args.size}, seed {args.seed}, gates {args.gate_mode}")
    print(f"segments end at units {cuts} ({len(plan)} segments), {grid} per segment")
    print(
        f"whole forward {whole_seconds * 1e3:.1f} ms, tiles in one process "
        f"{tiled_seconds * 1e3:.1f} ms"
    )
    print(
        f"max abs difference {difference:.3e}, relative {relative:.3e} (tolerance {TOLERANCE:.0e})"
    )
    if relative > TOLERANCE:
        print("FAIL: partitioned execution differs from the whole forward pass")
        return 1
    print("OK: partitioned execution equals the whole forward pass")
    return 0
