"""`edgedi train`: train a zoo model on NEU-CLS-like images, with a resumable checkpoint.

    edgedi train MODEL [--data DIR | --seed S --per-class N] [--size PX] [--epochs E]
                       [--device auto|cpu|cuda] [--out CKPT] [--resume] [--init CKPT]
                       [--half] [--threads T] [recipe options, see --help]

Without ``--data`` the images come from the synthetic generator (``--seed``), drawn
at 200 px and area-resized to ``--size``. A fixed stratified split (``--test-fraction``
of each class, drawn with ``--split-seed``) is held out; training never sees it, and
the final accuracy on it is written, with the command, the data, the split and the
training history, to the JSON sidecar beside the checkpoint.

The recipe (`models/training.py`): on synthetic data every epoch draws fresh images
(``--fresh-per-class`` per class, from generator indices past the ``--per-class``
set, so the held-out split stays unseen; ``--epoch-data fixed`` trains on the
split's training part instead, as a folder always does), steel-surface augmentation
(``--augment``), AdamW with decoupled ``--weight-decay``, label smoothing, and a
linear warm-up then cosine decay (``--schedule``). ``--device auto`` trains on a CUDA
GPU when torch sees one.

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

# Torch-free constants; `edgedi --help` must not pay for torch.
AUGMENTATIONS = ("steel", "flips", "none")
SCHEDULES = ("cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda")


def default_learning_rate(model: str) -> float:
    """The recipe's peak learning rate for `model`.

    The plain VGG stacks stayed near chance at 2e-3 in a CPU probe where 1e-3 learned
    (bench/results/recipe_probe.md); the ResNets were flat over 5e-4..2e-3.
    """
    return RECIPE.learning_rate / 2 if model.startswith("vgg") else RECIPE.learning_rate


class RECIPE:
    """`TrainConfig`'s defaults, spelled out here to keep torch out of `--help`
    (a unit test keeps the two equal)."""

    epochs = 30
    batch_size = 32
    learning_rate = 2e-3
    weight_decay = 0.05
    label_smoothing = 0.1
    schedule = "cosine"
    warmup = 0.05
    augment = "steel"


if TYPE_CHECKING:
    from edgedi.models.training import DataSource, Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=MODEL_NAMES, metavar="MODEL", help="zoo model name")
    add_data_arguments(parser)
    defaults = RECIPE
    parser.add_argument(
        "--epochs", type=_positive, default=defaults.epochs, help=f"default {defaults.epochs}"
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=defaults.batch_size, help="default 32"
    )
    parser.add_argument(
        "--lr",
        type=float,
        help="peak learning rate (default 1e-3 for the VGGs, 2e-3 for the others: "
        "bench/results/recipe_probe.md)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help=f"AdamW decoupled weight decay (default {defaults.weight_decay})",
    )
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=defaults.label_smoothing,
        help=f"default {defaults.label_smoothing}",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=defaults.schedule,
        help="cosine: linear warm-up then cosine decay (default); onecycle: the old schedule",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=defaults.warmup,
        help=f"warm-up share of all steps (default {defaults.warmup})",
    )
    parser.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=defaults.augment,
        help="steel: flips, shifts, gamma, lighting, noise (default); flips; none",
    )
    parser.add_argument(
        "--epoch-data",
        choices=("auto", "fresh", "fixed"),
        default="auto",
        help="fresh synthetic images every epoch, or the fixed training split "
        "(default auto: fresh for synthetic data, fixed for --data)",
    )
    parser.add_argument(
        "--fresh-per-class",
        type=_positive,
        help="fresh images per class and epoch (default: --per-class)",
    )
    parser.add_argument(
        "--fresh-skip",
        type=int,
        default=0,
        help="skip this many fresh images per class first (a second stage, e.g. a fine-tune "
        "at 200 px, then sees scenes the first stage did not)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="folder keeping the fresh epochs drawn, for later runs of the same stream",
    )
    parser.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="processes drawing fresh images (default 1; more on a GPU machine)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: a CUDA GPU when torch sees one, else the CPU (default)",
    )
    parser.add_argument(
        "--train-seed", type=int, default=0, help="seed of weights, order, augmentation (0)"
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

    def __init__(self, stream: Any = None) -> None:
        # Looked up now, not at import: tests and redirections replace sys.stderr.
        self.stream = stream if stream is not None else sys.stderr
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
    from edgedi.models.training import (
        DataSource,
        EpochData,
        FreshSynthetic,
        TrainConfig,
        TrainState,
        evaluate,
        resolve_device,
        train_epochs,
    )
    from edgedi.models.zoo import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lr is None:  # spelled out, so the recorded command repeats the run
        args.lr = default_learning_rate(args.model)
    out: Path = args.out or Path("checkpoints") / f"{args.model}-{args.size}.pt"
    source = DataSource(args.data, args.seed, args.per_class)
    fresh = args.epoch_data == "fresh" or (args.epoch_data == "auto" and args.data is None)
    try:
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing,
            seed=args.train_seed,
            augment=args.augment,
            schedule=args.schedule,
            warmup=args.warmup,
        )
        device = resolve_device(args.device)
        if fresh and args.data is not None:
            raise ValueError("--epoch-data fresh needs synthetic data; a folder is fixed")
        if args.fresh_skip < 0:
            raise ValueError(f"--fresh-skip must not be negative, got {args.fresh_skip}")
    except ValueError as error:
        print(f"edgedi train: {error}", file=sys.stderr)
        return 1
    try:
        started = time.perf_counter()
        train_part, test_part = split_indices(source.labels(), args.test_fraction, args.split_seed)
        # With fresh images the training part of the split is never read.
        test_images, test_labels = source.load(args.size, test_part)
        epoch_data: EpochData
        if fresh:
            stream = FreshSynthetic(
                args.seed,
                args.fresh_per_class or args.per_class,
                args.size,
                first=args.per_class + args.fresh_skip,
                workers=args.workers,
                cache=args.cache,
            )
            epoch_data = stream
            training_images = stream.describe()
            train_count = stream.per_class * 6
        else:
            x_train, y_train = source.load(args.size, train_part)
            epoch_data = lambda _epoch: (x_train, y_train)  # noqa: E731
            training_images = {"kind": "split", "images": len(train_part)}
            train_count = len(train_part)
        print(
            f"data: {describe_source(source)} at {args.size} px, "
            f"{len(test_part)} held out; training on "
            + (f"{train_count} fresh images per epoch" if fresh else f"{train_count} images")
            + f"; on {device}; loaded in {time.perf_counter() - started:.1f} s",
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
        "training_images": training_images,
        "split": {
            "test_fraction": args.test_fraction,
            "split_seed": args.split_seed,
            "train": len(train_part),
            "test": len(test_part),
        },
        "config": config.as_dict(),
        "init": str(args.init) if args.init else None,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }

    def checkpoint_epoch(current: TrainState) -> None:
        meta = {**record, "epochs_done": current.epochs_done}
        save_checkpoint(model, args.model, out, meta, training=current)

    try:
        state = train_epochs(
            model,
            epoch_data,
            config,
            state=state,
            on_progress=ProgressBar(),
            on_epoch=checkpoint_epoch,
            device=device,
        )
    finally:
        if isinstance(epoch_data, FreshSynthetic):
            epoch_data.close()
    evaluation = evaluate(model, test_images, test_labels)
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
    # Read it back as an agent would: format, weights hash and architecture digest.
    load_checkpoint(args.model, out)
    print(evaluation.render())
    print(f"checkpoint: {out} (verified; test accuracy {evaluation.accuracy:.4f})")
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
