"""Training and evaluation of the zoo models on NEU-CLS-like images (CPU first).

The loop is deliberately plain: AdamW, a one-cycle learning rate, cross-entropy with
a little label smoothing, and the two flips that keep a steel-strip image a valid
image of its class (the rolling direction stays horizontal under both). Everything
random — the initial weights, the order of the batches, the flips, dropout — comes
from seeded generators, so the same `TrainConfig` on the same data and thread count
gives the same weights, and a run stopped after any epoch resumes to the same end
(`TrainState` holds what the optimizer, the schedule and the generators need).

Input images are grayscale uint8; `normalize` standardises each image by its own
mean and deviation (see there why), on the whole image before any tiling.

Evaluation returns accuracy, per-class precision and recall and the confusion matrix
(rows: true class, columns: predicted class).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from edgedi.models.data import CLASSES, DEFAULT_SIZE, FolderDefects, SyntheticDefects

__all__ = [
    "MIN_STD",
    "DataSource",
    "EpochRecord",
    "Evaluation",
    "Progress",
    "TrainConfig",
    "TrainState",
    "evaluate",
    "normalize",
    "predict",
    "recalibrate_batchnorm",
    "resize_images",
    "train",
]

logger = logging.getLogger(__name__)

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.int64]

# Floor of the per-image standard deviation (grey levels), so a flat image stays finite.
MIN_STD = 1.0


def normalize(images: Images | torch.Tensor) -> torch.Tensor:
    """uint8 images `(n, h, w)` (or `(n, 1, h, w)`) as the float input `(n, 1, h, w)`.

    Each image is standardised by its own mean and standard deviation: brightness
    and contrast vary far more between strip images than between defect classes
    (NEU-CLS and the generator alike), and removing them makes small models learn
    in a few CPU epochs. A distributed run therefore normalises the whole image
    on the device that received it, before cutting it into tiles.
    """
    tensor = torch.as_tensor(images)
    if tensor.dim() == 3:
        tensor = tensor[:, None]
    values = tensor.to(torch.float32)
    mean = values.mean(dim=(1, 2, 3), keepdim=True)
    std = values.std(dim=(1, 2, 3), keepdim=True).clamp_min(MIN_STD)
    return (values - mean) / std


def resize_images(images: Images, size: int) -> Images:
    """Images `(n, h, w)` resized to `size`, area-averaged as `data.read_image` does."""
    if images.shape[1:] == (size, size):
        return images
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for row, image in enumerate(images):
        resized = Image.fromarray(image).resize((size, size), Image.Resampling.BOX)
        out[row] = np.asarray(resized, dtype=np.uint8)
    return out


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run; recorded beside every checkpoint."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    seed: int = 0
    flips: bool = True
    # Start of the one-cycle schedule's warm-up (fraction of all steps).
    warmup: float = 0.15

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    """Reported after every batch, for progress bars."""

    epoch: int  # 1-based
    epochs: int
    batch: int  # 1-based within the epoch
    batches: int
    loss: float  # running mean over the epoch so far
    accuracy: float  # running training accuracy over the epoch so far
    seconds: float  # since the start of this call


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    loss: float
    train_accuracy: float
    seconds: float
    learning_rate: float


@dataclass
class TrainState:
    """Everything a stopped run needs to continue exactly where it stopped."""

    config: TrainConfig
    epochs_done: int = 0
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    generator: torch.Tensor | None = None  # state of the shuffle/flip generator
    torch_rng: torch.Tensor | None = None  # global RNG (dropout)
    history: list[EpochRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Tensors and plain data only, so `torch.load(weights_only=True)` reads it back."""
        return {
            "config": self.config.as_dict(),
            "epochs_done": self.epochs_done,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "generator": self.generator,
            "torch_rng": self.torch_rng,
            "history": [asdict(record) for record in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(
            config=TrainConfig(**data["config"]),
            epochs_done=int(data["epochs_done"]),
            optimizer=data["optimizer"],
            scheduler=data["scheduler"],
            generator=data["generator"],
            torch_rng=data["torch_rng"],
            history=[EpochRecord(**record) for record in data["history"]],
        )


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on batch-norm affine terms and biases (1-D parameters).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips, each with probability one half, per image."""
    count = batch.shape[0]
    horizontal = torch.rand(count, generator=generator) < 0.5
    vertical = torch.rand(count, generator=generator) < 0.5
    batch = batch.clone()
    batch[horizontal] = batch[horizontal].flip(-1)
    batch[vertical] = batch[vertical].flip(-2)
    return batch


def train(
    model: nn.Module,
    images: Images,
    labels: Labels,
    config: TrainConfig,
    state: TrainState | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
    stop_after: int | None = None,
) -> TrainState:
    """Train `model` in place on uint8 `images` `(n, h, w)` with `labels` `(n,)`.

    Pass the `state` of an earlier call (e.g. from a checkpoint) to resume it: the
    optimizer, the schedule and the random streams continue as if never stopped.
    `on_epoch` is called after each epoch with the state so far (to checkpoint it);
    `stop_after` ends the call after that many epochs of this call (the state says
    how far the run got). Returns the final state; the model is left in eval mode.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images, got {len(images)} and {len(labels)}")
    if state is None:
        state = TrainState(config)
    elif state.config != config:
        raise ValueError("the state to resume was made with another configuration")
    inputs = normalize(images)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    batches = math.ceil(len(inputs) / config.batch_size)
    total_steps = max(1, batches * config.epochs)

    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.learning_rate,
        total_steps=total_steps,
        pct_start=config.warmup,
    )
    generator = torch.Generator().manual_seed(config.seed)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    if state.scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    if state.generator is not None:
        generator.set_state(state.generator)

    started = time.perf_counter()
    epochs_this_call = 0
    with torch.random.fork_rng(devices=[]):
        if state.torch_rng is not None:
            torch.set_rng_state(state.torch_rng)
        else:
            torch.manual_seed(config.seed)
        while state.epochs_done < config.epochs:
            if stop_after is not None and epochs_this_call >= stop_after:
                break
            epoch = state.epochs_done + 1
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(len(inputs), generator=generator)
            loss_sum, correct, seen = 0.0, 0, 0
            for batch in range(batches):
                chosen = order[batch * config.batch_size : (batch + 1) * config.batch_size]
                x = inputs[chosen]
                if config.flips:
                    x = _flip(x, generator)
                y = targets[chosen]
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
                if on_progress is not None:
                    on_progress(
                        Progress(
                            epoch,
                            config.epochs,
                            batch + 1,
                            batches,
                            loss_sum / seen,
                            correct / seen,
                            time.perf_counter() - started,
                        )
                    )
            record = EpochRecord(
                epoch,
                loss_sum / seen,
                correct / seen,
                time.perf_counter() - epoch_started,
                float(scheduler.get_last_lr()[0]),
            )
            logger.info(
                "epoch %d/%d: loss %.4f, train accuracy %.3f, %.1f s",
                epoch,
                config.epochs,
                record.loss,
                record.train_accuracy,
                record.seconds,
            )
            state.history.append(record)
            state.epochs_done = epoch
            state.optimizer = optimizer.state_dict()
            state.scheduler = scheduler.state_dict()
            state.generator = generator.get_state()
            state.torch_rng = torch.get_rng_state()
            epochs_this_call += 1
            if on_epoch is not None:
                on_epoch(state)
    model.eval()
    return state


@torch.no_grad()
def predict(model: nn.Module, images: Images, batch_size: int = 64) -> npt.NDArray[np.int64]:
    """Predicted labels for uint8 `images` `(n, h, w)`, in eval mode."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        logits = model(normalize(images[start : start + batch_size]))
        outputs.append(logits.argmax(1))
    if not outputs:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(torch.cat(outputs).numpy(), dtype=np.int64)


@dataclass(frozen=True)
class Evaluation:
    """Accuracy, per-class precision/recall and the confusion matrix of one test set."""

    confusion: tuple[tuple[int, ...], ...]  # [true][predicted]
    classes: tuple[str, ...] = CLASSES

    @property
    def total(self) -> int:
        return sum(sum(row) for row in self.confusion)

    @property
    def accuracy(self) -> float:
        hits = sum(self.confusion[i][i] for i in range(len(self.confusion)))
        return hits / self.total if self.total else 0.0

    @property
    def precision(self) -> tuple[float, ...]:
        """Per predicted class; 0 for a class never predicted."""
        size = len(self.confusion)
        columns = [sum(self.confusion[t][p] for t in range(size)) for p in range(size)]
        return tuple(self.confusion[c][c] / columns[c] if columns[c] else 0.0 for c in range(size))

    @property
    def recall(self) -> tuple[float, ...]:
        """Per true class; 0 for a class absent from the test set."""
        return tuple(row[c] / sum(row) if sum(row) else 0.0 for c, row in enumerate(self.confusion))

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "total": self.total,
            "precision": dict(zip(self.classes, self.precision, strict=True)),
            "recall": dict(zip(self.classes, self.recall, strict=True)),
            "confusion": [list(row) for row in self.confusion],
        }

    @classmethod
    def from_predictions(
        cls, truth: Sequence[int] | Labels, predicted: Sequence[int] | Labels
    ) -> Evaluation:
        size = len(CLASSES)
        matrix = [[0] * size for _ in range(size)]
        for t, p in zip(truth, predicted, strict=True):
            matrix[int(t)][int(p)] += 1
        return cls(tuple(tuple(row) for row in matrix))

    def render(self) -> str:
        """Accuracy, a per-class table and the confusion matrix as plain text."""
        width = max(len(name) for name in self.classes)
        lines = [f"accuracy: {self.accuracy:.4f} ({self.total} images)", ""]
        lines.append(f"{'class':<{width}}  precision  recall")
        for name, p, r in zip(self.classes, self.precision, self.recall, strict=True):
            lines.append(f"{name:<{width}}  {p:9.3f}  {r:6.3f}")
        lines += ["", "confusion (rows: true, columns: predicted)"]
        short = [name[:6] for name in self.classes]
        lines.append(" " * (width + 2) + " ".join(f"{s:>6}" for s in short))
        for name, row in zip(self.classes, self.confusion, strict=True):
            lines.append(f"{name:<{width}}  " + " ".join(f"{v:>6}" for v in row))
        return "\n".join(lines)


def evaluate(model: nn.Module, images: Images, labels: Labels, batch_size: int = 64) -> Evaluation:
    """Evaluate `model` on uint8 `images` with their true `labels`."""
    return Evaluation.from_predictions(labels, predict(model, images, batch_size))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: Images, batch_size: int = 32) -> None:
    """Re-estimate batch-norm running statistics on `images` (e.g. at a new resolution).

    A fully convolutional model trained at a reduced size keeps its weights at full
    size, but the activation statistics shift; averaging them again over the training
    images (cumulative average, no gradient) is the cheap part of adapting it.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative moving average over all batches
    model.train()
    try:
        for start in range(0, len(images), batch_size):
            model(normalize(images[start : start + batch_size]))
    finally:
        for module, momentum in zip(norms, saved, strict=True):
            module.momentum = momentum
        model.eval()


@dataclass(frozen=True)
class DataSource:
    """Where images come from: a folder (real NEU-CLS layout or `edgedi data synth` output)
    or the synthetic generator (``per_class`` images per class from ``seed``).

    Synthetic images are drawn at 200 px and area-resized like folder images, so a
    model sees the same pixels whichever way the same images reach it.
    """

    folder: str | None = None
    seed: int = 0
    per_class: int = 100

    def describe(self) -> dict[str, Any]:
        if self.folder is not None:
            return {"kind": "folder", "folder": self.folder}
        return {"kind": "synthetic", "seed": self.seed, "per_class": self.per_class}

    def load(self, size: int) -> tuple[Images, Labels]:
        """All images at `size` px, uint8 `(n, size, size)`, and their labels."""
        if self.folder is not None:
            return FolderDefects(self.folder, size).arrays()
        images, labels = SyntheticDefects(self.per_class, self.seed, DEFAULT_SIZE).arrays()
        return resize_images(images, size), labels
