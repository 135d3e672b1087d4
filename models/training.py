"""Training and evaluation of the zoo models on NEU-CLS-like images (CPU first).

The recipe: AdamW (decoupled weight decay, none on biases and norms), a linear
warm-up then a cosine decay of the learning rate, cross-entropy with label
smoothing, and augmentation that keeps a steel-strip image a valid image of its
class (`augment_batch`: flips, small shifts, gamma, uneven lighting, sensor noise —
no rotation by 90°, which would turn the horizontal rolling direction vertical).
`train_epochs` takes its images per epoch from a function of the epoch number, so
the synthetic generator can draw fresh images every epoch (`FreshSynthetic`);
`train` is the same loop over one fixed set (a folder, a pruned model's fine-tune).

Everything random — the initial weights, the fresh images, the order of the
batches, the augmentation, dropout — comes from seeded generators, so the same
`TrainConfig` on the same data and thread count gives the same weights on a CPU,
and a run stopped after any epoch resumes to the same end (`TrainState` holds what
the optimizer, the schedule and the generators need). Training runs on the device
given (`resolve_device`); augmentation runs on the CPU so its random stream does
not depend on the device, and the saved state is always CPU tensors.

Input images are grayscale uint8; `normalize` standardises each image by its own
mean and deviation (see there why), on the whole image before any tiling.

Evaluation returns accuracy, per-class precision and recall and the confusion matrix
(rows: true class, columns: predicted class).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from edgedi.models.data import (
    CLASSES,
    DEFAULT_SIZE,
    FolderDefects,
    SyntheticDefects,
    generate_resized,
)

__all__ = [
    "AUGMENTATIONS",
    "DEVICES",
    "MIN_STD",
    "SCHEDULES",
    "DataSource",
    "EpochData",
    "EpochRecord",
    "Evaluation",
    "FreshSynthetic",
    "Progress",
    "TrainConfig",
    "TrainState",
    "augment_batch",
    "evaluate",
    "normalize",
    "predict",
    "recalibrate_batchnorm",
    "resize_images",
    "resolve_device",
    "train",
    "train_epochs",
    "warmup_cosine",
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


SCHEDULES = ("cosine", "onecycle")
AUGMENTATIONS = ("steel", "flips", "none")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run; recorded beside every checkpoint."""

    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 2e-3
    # Decoupled (AdamW): each step shrinks the weights by lr * weight_decay.
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    # "steel": flips, shifts, gamma, lighting, noise; "flips": the two flips only.
    augment: str = "steel"
    # "cosine": linear warm-up, then cosine decay to zero; "onecycle": torch's OneCycleLR
    # (the recipe before fresh data; kept so older runs resume and repeat).
    schedule: str = "cosine"
    # Length of the warm-up (fraction of all steps).
    warmup: float = 0.05

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Read a recorded config; one written before the recipe changed keeps its meaning."""
        values = dict(data)
        if "schedule" not in values:  # recorded before warm-up + cosine and augmentation
            values["schedule"] = "onecycle"
            values["augment"] = "flips" if values.pop("flips", True) else "none"
        return cls(**values)


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
    generator: torch.Tensor | None = None  # state of the shuffle/augmentation generator
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
            config=TrainConfig.from_dict(data["config"]),
            epochs_done=int(data["epochs_done"]),
            optimizer=data["optimizer"],
            scheduler=data["scheduler"],
            generator=data["generator"],
            torch_rng=data["torch_rng"],
            history=[EpochRecord(**record) for record in data["history"]],
        )


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without one is an error."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU here; use auto or cpu")
    return torch.device(name)


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _to_cpu(value: Any) -> Any:
    """A copy of nested dicts/lists with every tensor on the CPU (for a checkpoint)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # No weight decay on batch-norm affine terms and biases (1-D parameters).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Factor of the peak learning rate for optimizer step `step` (0-based).

    Linear warm-up over `warmup_steps` (the first step at 1/warmup_steps of the peak,
    step warmup_steps - 1 at the peak), then half a cosine down to zero at
    `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.learning_rate,
            total_steps=total_steps,
            pct_start=config.warmup,
        )
    warmup_steps = round(config.warmup * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, total_steps=total_steps, warmup_steps=warmup_steps)
    )


def _flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips, each with probability one half, per image."""
    count = batch.shape[0]
    horizontal = torch.rand(count, generator=generator) < 0.5
    vertical = torch.rand(count, generator=generator) < 0.5
    batch = batch.clone()
    batch[horizontal] = batch[horizontal].flip(-1)
    batch[vertical] = batch[vertical].flip(-2)
    return batch


# Augmentation strengths; small enough that no defect leaves the picture or changes kind.
MAX_SHIFT = 0.0625  # of the side, each way (12 px at 200 px)
MAX_LOG_GAMMA = 0.25
MAX_LIGHTING = 0.3  # brightness ramp across the image, ± this share of the grey level
MAX_NOISE = 4.0  # grey levels, standard deviation


def augment_batch(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Steel-surface augmentation of grey-level images `(n, 1, h, w)` (float, 0..255).

    Returns a new tensor of the same shape, image i made from image i only, so labels
    stay valid. Per image: the two flips, a shift of up to `MAX_SHIFT` of the side
    (reflected at the border, so no blank band appears), a gamma, a linear lighting
    ramp in a random direction, a global brightness/contrast change (clipped at 0 and
    255) and Gaussian noise. Global brightness and contrast alone would be undone by
    `normalize`; the gamma, the ramp and the clipping are what survive it.
    Reproducible from the generator's state; runs on the CPU.
    """
    count, _channels, height, width = batch.shape
    batch = _flip(batch, generator)
    margin = max(1, round(MAX_SHIFT * min(height, width)))
    padded = F.pad(batch, (margin, margin, margin, margin), mode="reflect")
    offsets = torch.randint(0, 2 * margin + 1, (count, 2), generator=generator)
    shifted = torch.stack(
        [
            padded[i, :, int(dy) : int(dy) + height, int(dx) : int(dx) + width]
            for i, (dy, dx) in enumerate(offsets)
        ]
    )

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, 1, 1, 1, generator=generator)

    gamma = torch.exp(uniform(-MAX_LOG_GAMMA, MAX_LOG_GAMMA))
    values = 255.0 * (shifted / 255.0).clamp(0.0, 1.0) ** gamma
    angle = uniform(0.0, 2.0 * math.pi)
    ys = torch.linspace(-0.5, 0.5, height).view(1, 1, height, 1)
    xs = torch.linspace(-0.5, 0.5, width).view(1, 1, 1, width)
    ramp = ys * torch.sin(angle) + xs * torch.cos(angle)
    values = values * (1.0 + uniform(-MAX_LIGHTING, MAX_LIGHTING) * 2.0 * ramp)
    values = values * uniform(0.8, 1.2) + uniform(-20.0, 20.0)
    noise = torch.randn(values.shape, generator=generator) * uniform(0.0, MAX_NOISE)
    return (values + noise).clamp(0.0, 255.0)


def _augmented(images: Images, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The network input for uint8 `images` `(n, h, w)`: augmented, then normalised."""
    values = torch.as_tensor(images)[:, None].to(torch.float32)
    if config.augment == "steel":
        values = augment_batch(values, generator)
    elif config.augment == "flips":
        values = _flip(values, generator)
    return normalize(values)


EpochData = Callable[[int], tuple[Images, Labels]]


class FreshSynthetic:
    """Fresh synthetic training images for every epoch, a pure function of (seed, epoch).

    Epoch ``e`` (0-based) holds ``per_class`` images of each class: generator indices
    ``first + e * per_class`` onwards under ``seed``, drawn at 200 px and area-resized to
    ``size`` (`data.generate_resized`, as `DataSource` does). Indices below ``first`` are
    never used, so the images ``0 .. first - 1`` of the same seed (e.g. `DataSource`'s
    set, whose test split measures the run) stay unseen. ``workers`` > 1 draws them in
    a pool of that many processes (kept until `close`); the images are the same.

    Drawing costs ~15 ms an image at 200 px on one core, far more than a GPU step, so
    ``cache`` (a folder) keeps every epoch drawn as a ``.npy`` file that any later run
    with the same stream reads instead: several models trained on one machine draw
    the images once (`prefetch` fills it ahead).
    """

    def __init__(
        self,
        seed: int,
        per_class: int,
        size: int,
        first: int = 0,
        workers: int = 1,
        cache: str | Path | None = None,
    ) -> None:
        if seed < 0 or per_class < 1 or first < 0 or workers < 1:
            raise ValueError("need seed >= 0, per_class >= 1, first >= 0 and workers >= 1")
        self.seed, self.per_class, self.size = seed, per_class, size
        self.first, self.workers = first, workers
        self.cache = Path(cache) if cache is not None else None
        self._pool: ProcessPoolExecutor | None = None

    def cache_file(self, epoch: int) -> Path | None:
        if self.cache is None:
            return None
        start = self.first + epoch * self.per_class
        name = f"fresh-seed{self.seed}-px{self.size}-from{start}-n{self.per_class}.npy"
        return self.cache / name

    def prefetch(self, epochs: int) -> None:
        """Draw epochs 0 .. epochs - 1 into the cache (a no-op for those already there)."""
        for epoch in range(epochs):
            self(epoch)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "fresh-synthetic",
            "seed": self.seed,
            "per_class_per_epoch": self.per_class,
            "first_index": self.first,
        }

    def __call__(self, epoch: int) -> tuple[Images, Labels]:
        labels = np.repeat(np.arange(len(CLASSES), dtype=np.int64), self.per_class)
        cached = self.cache_file(epoch)
        if cached is not None and cached.is_file():
            images = np.load(cached)
            if images.shape == (len(labels), self.size, self.size) and images.dtype == np.uint8:
                return images, labels
            logger.warning("%s: not an epoch of this stream; drawing it again", cached)
        images = self._draw(epoch)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Written aside, then renamed: a run reading the cache never sees half a file.
            temporary = cached.with_name(f".{cached.stem}.{os.getpid()}.npy")
            np.save(temporary, images)
            temporary.replace(cached)
        return images, labels

    def _draw(self, epoch: int) -> Images:
        start = self.first + epoch * self.per_class
        labels = np.repeat(np.arange(len(CLASSES), dtype=np.int64), self.per_class)
        indices = [start + k for _label in range(len(CLASSES)) for k in range(self.per_class)]
        seeds, sizes = [self.seed] * len(indices), [self.size] * len(indices)
        if self.workers > 1:
            if self._pool is None:
                # Spawned, not forked: a fork of a process running torch threads can hang.
                # The workers import only the torch-free data module.
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
            chunk = max(1, len(indices) // (4 * self.workers))
            images = list(
                self._pool.map(
                    generate_resized, labels.tolist(), seeds, indices, sizes, chunksize=chunk
                )
            )
        else:
            images = list(map(generate_resized, labels.tolist(), seeds, indices, sizes))
        return np.stack(images)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> FreshSynthetic:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def train(
    model: nn.Module,
    images: Images,
    labels: Labels,
    config: TrainConfig,
    state: TrainState | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
    stop_after: int | None = None,
    device: torch.device | str | None = None,
) -> TrainState:
    """Train `model` on one fixed set of uint8 `images` `(n, h, w)` with `labels` `(n,)`.

    See `train_epochs`; every epoch sees the same images (augmented afresh).
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images, got {len(images)} and {len(labels)}")
    return train_epochs(
        model,
        lambda _epoch: (images, labels),
        config,
        state=state,
        on_progress=on_progress,
        on_epoch=on_epoch,
        stop_after=stop_after,
        device=device,
    )


def train_epochs(
    model: nn.Module,
    data: EpochData,
    config: TrainConfig,
    state: TrainState | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
    stop_after: int | None = None,
    device: torch.device | str | None = None,
) -> TrainState:
    """Train `model` in place; `data(e)` gives epoch e's (0-based) images and labels.

    Every epoch must hold as many images (the schedule is laid out over all steps
    in advance). Pass the `state` of an earlier call (e.g. from a checkpoint) to
    resume it: the optimizer, the schedule and the random streams continue as if
    never stopped. `on_epoch` is called after each epoch with the state so far (to
    checkpoint it); `stop_after` ends the call after that many epochs of this call.
    `device` (default: where the model is) is where the model and the batches go;
    the model stays there. Returns the final state; the model is left in eval mode.
    """
    if state is None:
        state = TrainState(config)
    elif state.config != config:
        raise ValueError("the state to resume was made with another configuration")
    target = _model_device(model) if device is None else torch.device(device)
    model.to(target)
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    if state.generator is not None:
        generator.set_state(state.generator)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    epoch_size: int | None = None

    started = time.perf_counter()
    epochs_this_call = 0
    with torch.random.fork_rng(devices=[]):
        if state.torch_rng is not None:
            torch.set_rng_state(state.torch_rng)
        else:
            torch.manual_seed(config.seed)
        if target.type == "cuda":  # dropout on the GPU; resumes there are not bit-exact
            torch.cuda.manual_seed_all(config.seed + state.epochs_done)
        while state.epochs_done < config.epochs:
            if stop_after is not None and epochs_this_call >= stop_after:
                break
            epoch = state.epochs_done + 1
            epoch_started = time.perf_counter()
            images, labels = data(state.epochs_done)
            if len(images) != len(labels) or len(images) == 0:
                raise ValueError(
                    f"epoch {epoch}: need as many labels as images, "
                    f"got {len(images)} and {len(labels)}"
                )
            if epoch_size is None:
                epoch_size = len(images)
            elif len(images) != epoch_size:
                raise ValueError(f"epoch {epoch} has {len(images)} images, not {epoch_size}")
            batches = math.ceil(len(images) / config.batch_size)
            if scheduler is None:
                scheduler = _scheduler(optimizer, config, max(1, batches * config.epochs))
                if state.optimizer is not None:
                    optimizer.load_state_dict(state.optimizer)
                if state.scheduler is not None:
                    scheduler.load_state_dict(state.scheduler)
            targets = torch.as_tensor(labels, dtype=torch.int64)
            model.train()
            order = torch.randperm(len(images), generator=generator)
            loss_sum, correct, seen = 0.0, 0, 0
            for batch in range(batches):
                chosen = order[batch * config.batch_size : (batch + 1) * config.batch_size]
                x = _augmented(images[chosen.numpy()], config, generator).to(target)
                y = targets[chosen].to(target)
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
            state.optimizer = _to_cpu(optimizer.state_dict())
            state.scheduler = _to_cpu(scheduler.state_dict())
            state.generator = generator.get_state()
            state.torch_rng = torch.get_rng_state()
            epochs_this_call += 1
            if on_epoch is not None:
                on_epoch(state)
    model.eval()
    return state


@torch.no_grad()
def predict(model: nn.Module, images: Images, batch_size: int = 64) -> npt.NDArray[np.int64]:
    """Predicted labels for uint8 `images` `(n, h, w)`, in eval mode, on the model's device."""
    model.eval()
    device = _model_device(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        logits = model(normalize(images[start : start + batch_size]).to(device))
        outputs.append(logits.argmax(1).cpu())
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
    device = _model_device(model)
    try:
        for start in range(0, len(images), batch_size):
            model(normalize(images[start : start + batch_size]).to(device))
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

    def labels(self) -> list[int]:
        """Every image's label, in order, without reading or drawing the images."""
        if self.folder is not None:
            return FolderDefects(self.folder, DEFAULT_SIZE).labels
        return SyntheticDefects(self.per_class, self.seed, DEFAULT_SIZE).labels

    def load(self, size: int, positions: Sequence[int] | None = None) -> tuple[Images, Labels]:
        """The images (all, or those at `positions`) at `size` px, uint8, and their labels."""
        if self.folder is not None:
            return FolderDefects(self.folder, size).arrays(positions)
        synthetic = SyntheticDefects(self.per_class, self.seed, DEFAULT_SIZE)
        images, labels = synthetic.arrays(positions)
        return resize_images(images, size), labels
