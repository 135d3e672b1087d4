"""`edgedi eval`: accuracy, per-class precision/recall and confusion matrix of a checkpoint.

    edgedi eval MODEL [--ckpt CKPT] [--data DIR | --seed S --per-class N] [--size PX]
                      [--split auto|test|all] [--json FILE]

``--ckpt`` defaults to the shipped checkpoint. ``--split test`` evaluates the held-out
part of the stratified split (``--test-fraction``/``--split-seed`` as in training);
``all`` evaluates every image, which is right for a data set the model never saw, such
as a synthetic seed other than the training one. ``auto`` (the default) chooses
``test`` when the data are those the checkpoint was trained on (from its JSON
sidecar) and ``all`` otherwise; ``all`` on the training data is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgedi.agent.commands.train import add_data_arguments, describe_source
from edgedi.models.specs import MODEL_NAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help="zoo model name")
    parser.add_argument("--ckpt", default="auto", help="checkpoint file (default: the shipped one)")
    add_data_arguments(parser)
    parser.add_argument(
        "--split",
        choices=("auto", "test", "all"),
        default="auto",
        help="which images to evaluate (default auto: see the command's description)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    import torch

    from edgedi.models.checkpoints import (
        CheckpointError,
        load_model,
        read_sidecar,
        shipped_checkpoint,
    )
    from edgedi.models.data import DatasetError, split_indices
    from edgedi.models.training import DataSource, evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    path = shipped_checkpoint(args.model) if args.ckpt == "auto" else Path(args.ckpt)
    if path is None:
        print(
            f"edgedi eval: no shipped checkpoint for {args.model}; pass --ckpt FILE",
            file=sys.stderr,
        )
        return 1
    source = DataSource(args.data, args.seed, args.per_class)
    trained_on = (read_sidecar(path) or {}).get("data")
    same_data = trained_on == source.describe()
    split = args.split
    if split == "auto":
        split = "test" if same_data else "all"
    if split == "all" and same_data:
        print(
            "edgedi eval: these are the images the checkpoint was trained on; "
            "use --split test, or another --seed for an unseen set",
            file=sys.stderr,
        )
        return 1
    try:
        model, origin = load_model(args.model, args.size, path)
        started = time.perf_counter()
        chosen = None
        if split == "test":
            _train, chosen = split_indices(source.labels(), args.test_fraction, args.split_seed)
        images, labels = source.load(args.size, chosen)
    except (CheckpointError, DatasetError) as error:
        print(f"edgedi eval: {error}", file=sys.stderr)
        return 1
    evaluation = evaluate(model, images, labels)
    elapsed = time.perf_counter() - started
    print(origin)
    print(
        f"data: {describe_source(source)}, {args.size} px, split {split} "
        f"({len(labels)} images, {elapsed:.1f} s)"
    )
    print(evaluation.render())
    if args.json is not None:
        result = {
            "model": args.model,
            "checkpoint": str(path),
            "data": source.describe(),
            "input_size": args.size,
            "split": split,
            **evaluation.as_dict(),
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
