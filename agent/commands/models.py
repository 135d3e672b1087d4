"""`edgedi models`: the model zoo as a table (torch-free: read from the specs).

    edgedi models [--size 200]

GFLOP counts two floating-point operations per multiply-accumulate (2 × MACs) of the
convolutions, pools, gates and linear layers; batch norm and ReLU are not counted.
"""

from __future__ import annotations

import argparse

from edgedi.models.specs import DEFAULT_INPUT_SIZE, MODEL_NAMES, get_spec

MEBIBYTE = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        type=_positive,
        default=DEFAULT_INPUT_SIZE,
        help=f"square input side in pixels (default {DEFAULT_INPUT_SIZE})",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    size: int = args.size
    header = (
        "model",
        "params",
        f"GFLOP@{size}px (2×MAC)",
        "largest activation MiB",
        "units",
        "gates",
    )
    rows = []
    for name in MODEL_NAMES:
        try:
            spec = get_spec(name, size)
        except ValueError:
            rows.append((name, "-", "too small", "-", "-", "-"))
            continue
        rows.append(
            (
                name,
                f"{spec.params:,}",
                f"{2 * spec.macs / 1e9:.3f}",
                f"{spec.largest_activation_bytes / MEBIBYTE:.1f}",
                str(len(spec.units)),
                str(sum(unit.reductions for unit in spec.units)),
            )
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))
    return 0
