"""`edgedi data`: write a synthetic NEU-CLS-like data set, or count the images of a folder.

    edgedi data synth --out DIR --per-class 300 [--seed 0] [--size 200] [--sheet FILE]
    edgedi data info DIR

`synth` writes ``DIR/<class>/<Prefix>_<n>.png`` (``DIR/crazing/Cr_1.png`` …), a layout that
`info`, ``load_folder`` and training read back. `info` accepts that layout and the real
NEU-CLS one (``Cr_1.bmp`` … in one folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from edgedi.models.data import (
    CLASSES,
    DEFAULT_SIZE,
    PREFIXES,
    DatasetError,
    SyntheticDefects,
    contact_sheet,
    load_folder,
)

# Pixels to write before progress is worth showing: 300 images of 200x200 take about 2 s.
_PROGRESS_FROM_PIXELS = 300 * 200 * 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    synth = actions.add_parser(
        "synth",
        help="write synthetic defect images, one folder per class",
        description="Write PNGs as DIR/<class>/<Prefix>_<n>.png; same seed, same bytes.",
    )
    synth.add_argument("--out", type=Path, help="folder to write the images into")
    synth.add_argument(
        "--per-class", type=_positive, default=300, help="images per class (default 300, as NEU)"
    )
    synth.add_argument("--seed", type=_non_negative, default=0, help="data set seed (default 0)")
    synth.add_argument(
        "--size", type=_positive, default=DEFAULT_SIZE, help="image side in pixels (default 200)"
    )
    synth.add_argument(
        "--sheet", type=Path, help="also write a contact sheet PNG (4 samples per class) here"
    )
    synth.add_argument(
        "--force", action="store_true", help="write even if the class folders already hold images"
    )

    info = actions.add_parser(
        "info",
        help="count the images per class in a folder",
        description="Count images per class (synthetic layout or real NEU-CLS names).",
    )
    info.add_argument("folder", type=Path, help="folder to inspect")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "synth":
            return _synth(args)
        return _info(args.folder)
    except DatasetError as error:
        print(f"edgedi data: {error}", file=sys.stderr)
        return 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _synth(args: argparse.Namespace) -> int:
    if args.out is None and args.sheet is None:
        print("edgedi data synth: give --out DIR, --sheet FILE, or both", file=sys.stderr)
        return 2
    if args.sheet is not None:
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(per_class=4, seed=args.seed, size=args.size).save(args.sheet)
        print(f"contact sheet: {args.sheet}")
    if args.out is None:
        return 0

    out: Path = args.out
    if not args.force:
        for name in CLASSES:
            folder = out / name
            if folder.is_dir() and any(folder.iterdir()):
                print(
                    f"edgedi data synth: {folder} is not empty; choose another --out "
                    "or pass --force to write over files of the same name",
                    file=sys.stderr,
                )
                return 1
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)

    dataset = SyntheticDefects(args.per_class, args.seed, args.size)
    total = len(dataset)
    show_progress = total * args.size * args.size >= _PROGRESS_FROM_PIXELS
    # On a terminal one line is redrawn; in a log, ten plain lines are enough.
    redraw = sys.stderr.isatty()
    step = max(1, total // (50 if redraw else 10))
    started = time.perf_counter()
    for position in range(total):
        image, label = dataset[position]
        path = out / CLASSES[label] / f"{dataset.name(position)}.png"
        Image.fromarray(image).save(path)
        done = position + 1
        if show_progress and (done % step == 0 or done == total):
            line = f"{done}/{total} images written"
            if redraw:
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)
    if show_progress and redraw:
        print(file=sys.stderr)
    elapsed = time.perf_counter() - started
    print(
        f"wrote {total} images ({len(CLASSES)} classes x {args.per_class}, "
        f"{args.size}x{args.size} px, seed {args.seed}) to {out} in {elapsed:.1f} s"
    )
    return 0


def _info(folder: Path) -> int:
    items = load_folder(folder)
    counts = Counter(label for _path, label in items)
    shapes: Counter[str] = Counter()
    for path, _label in items:
        with Image.open(path) as image:
            shapes[f"{image.width}x{image.height} {image.mode}"] += 1
    flat = sum(1 for path, _label in items if path.parent == folder)
    if flat == len(items):
        layout = "prefixed file names (Cr_1.bmp …)"
    elif flat == 0:
        layout = "one folder per class"
    else:
        layout = "mixed: prefixed files and class folders"
    print(f"{folder}: {len(items)} images, layout: {layout}")
    for label, name in enumerate(CLASSES):
        print(f"  {name:<16} {PREFIXES[label]:<3} {counts.get(label, 0):>6}")
    print("  image sizes: " + ", ".join(f"{shape} ({n})" for shape, n in shapes.most_common()))
    missing = [CLASSES[label] for label in range(len(CLASSES)) if counts.get(label, 0) == 0]
    if missing:
        print(f"  warning: no images of {', '.join(missing)}", file=sys.stderr)
    return 0
