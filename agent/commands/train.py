"""`edgedi train`: train a zoo model on NEU-CLS-like images, with a resumable checkpoint.

    edgedi train MODEL [--data DIR | --seed S --per-class N] [--size PX] [--epochs E]
                       [--out CKPT] [--resume] [--init CKPT] [--half] [--threads T]

Without ``--data`` the images come from the synthetic generator (``--seed``), drawn
at 200 px and area-resized to ``--size``. A fixed stratified split (``--test-fraction``
of each class, drawn with ``--split-seed``) is held out; training never sees it, and
the final accuracy on it is written, with the command, the data, the split and the
training history, to the JSON sidecar beside the checkpoint.

The checkpoint is rewritten after every epoch with the optimizer's state, so a run
that stops (Ctrl-C, a reboot) continues with ``--resume``: the result is the same as
an uninterrupted run. The finished checkpoint keeps only the weights unless
``--keep-state`` is given. ``--init`` starts from another checkpoint's weights (for
instance a model trained at a reduced size, fine-tuned here at 200 px).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgedi.models.specs import MODEL_NAMES

if TYPE_CHECKING:
    from edgedi.models.training import DataSource, Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help="zoo model name")
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=_positive, default=20, help="epochs (default 20)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="default 32")
    parser.add_argument(
        "--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule"
    )
    parser.add_argument(
        "--train-seed", type=int, default=0, help="seed of weights, order, flips (default 0)"
    )
    parser.add_argument(
        "--out", type=Path, help="checkpoint to write (default checkpoints/MODEL-SIZE.pt)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run stored in --out")
    parser.add_argument("--init", type=Path, help="start from this checkpoint's weights")
    parser.add_argument(
        "--half", action="store_true", help="store the final weights as fp16 (half the size)"
    )
    parser.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the optimizer state in the finished checkpoint",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with `edgedi eval`: where the images come from and the split."""
    parser.add_argument(
        "--data", help="image folder (NEU-CLS names or one folder per class); default synthetic"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic data set seed (default 0)")
    parser.add_argument(
        "--per-class", type=_positive, default=100, help="synthetic images per class (100)"
    )
    parser.add_argument(
        "--size", type=_positive, default=200, help="input side in pixels (default 200)"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.3, help="held-out share of each class (0.3)"
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/test split (default 0)"
    )
    parser.add_argument(
        "--threads", type=_positive, help="torch CPU threads (default: torch's choice)"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class ProgressBar:
    """One redrawn line on a terminal; one line per epoch in a log file."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.redraw = bool(getattr(stream, "isatty", lambda: False)())

    def __call__(self, progress: Progress) -> None:
        width = 24
        filled = round(width * progress.batch / progress.batches)
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"epoch {progress.epoch}/{progress.epochs} [{bar}] "
            f"{progress.batch}/{progress.batches} loss {progress.loss:.3f} "
            f"acc {progress.accuracy:.3f} {progress.seconds:.0f}s"
        )
        last = progress.batch == progress.batches
        if self.redraw:
            print(f"\r{line}", end="\n" if last else "", file=self.stream, flush=True)
        elif last:
            print(line, file=self.stream, flush=True)


def run(args: argparse.Namespace) -> int:
    # Imported here: `edgedi --help` must not pay for torch.
    import torch

    from edgedi.models.checkpoints import (
        CheckpointError,
        load_checkpoint,
        load_training_state,
        save_checkpoint,
        write_sidecar,
    )
    from edgedi.models.data import DatasetError, split_indices
    from edgedi.models.training import DataSource, TrainConfig, TrainState, evaluate, train
    from edgedi.models.zoo import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out or Path("checkpoints") / f"{args.model}-{args.size}.pt"
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.train_seed,
    )
    source = DataSource(args.data, args.seed, args.per_class)
    try:
        started = time.perf_counter()
        images, labels = source.load(args.size)
        train_part, test_part = split_indices(labels.tolist(), args.test_fraction, args.split_seed)
        print(
            f"data: {len(images)} images at {args.size} px ({describe_source(source)}), "
            f"{len(train_part)} train / {len(test_part)} test, "
            f"loaded in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        state: TrainState | None = None
        if args.resume:
            model = load_checkpoint(args.model, out, args.size)
            state = load_training_state(out)
            if state is None:
                print(f"edgedi train: {out} holds no training state to resume", file=sys.stderr)
                return 1
            if state.config != config:
                print(
                    f"edgedi train: {out} was trained with {state.config}; "
                    "resume with the same options",
                    file=sys.stderr,
                )
                return 1
            print(f"resuming after epoch {state.epochs_done}", file=sys.stderr)
        elif args.init is not None:
            model = load_checkpoint(args.model, args.init, args.size)
        else:
            model = build_model(args.model, args.size, seed=args.train_seed)
    except (CheckpointError, DatasetError) as error:
        print(f"edgedi train: {error}", file=sys.stderr)
        return 1

    record: dict[str, Any] = {
        "model": args.model,
        "command": canonical_command("train", args),
        "input_size": args.size,
        "data": source.describe(),
        "split": {
            "test_fraction": args.test_fraction,
            "split_seed": args.split_seed,
            "train": len(train_part),
            "test": len(test_part),
        },
        "config": config.as_dict(),
        "init": str(args.init) if args.init else None,
        "threads": torch.get_num_threads(),
    }

    def checkpoint_epoch(current: TrainState) -> None:
        meta = {**record, "epochs_done": current.epochs_done}
        save_checkpoint(model, args.model, out, meta, training=current)

    x_train, y_train = images[train_part], labels[train_part]
    state = train(
        model,
        x_train,
        y_train,
        config,
        state=state,
        on_progress=ProgressBar(),
        on_epoch=checkpoint_epoch,
    )
    evaluation = evaluate(model, images[test_part], labels[test_part])
    record.update(
        accuracy=evaluation.accuracy,
        evaluation=evaluation.as_dict(),
        history=[vars(epoch) for epoch in state.history],
        train_seconds=sum(epoch.seconds for epoch in state.history),
    )
    save_checkpoint(
        model,
        args.model,
        out,
        record,
        half=args.half,
        training=state if args.keep_state else None,
    )
    write_sidecar(out, record)
    print(evaluation.render())
    print(f"checkpoint: {out} (test accuracy {evaluation.accuracy:.4f})")
    return 0


def describe_source(source: DataSource) -> str:
    if source.folder is not None:
        return f"folder {source.folder}"
    return f"synthetic, seed {source.seed}, {source.per_class} per class"


def canonical_command(name: str, args: argparse.Namespace) -> str:
    """The command line that repeats this run, every option spelled out (for the record)."""
    words = ["edgedi", name, args.model]
    for key, value in sorted(vars(args).items()):
        if key == "model" or value is None or value is False:
            continue
        option = "--" + key.replace("_", "-")
        words += [option] if value is True else [option, str(value)]
    return shlex.join(words)
