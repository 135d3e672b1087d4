"""The models a device holds, with weights that are identical on every device.

Exact distributed inference needs every device to run bit-identical weights: a
tile computed on one device is stitched to tiles from others, and the gate means
combine partial sums from all of them. `ModelStore` therefore loads each model
through `edgedi.models.checkpoints.load_model`: a checkpoint from the configured
folder, else the shipped one, else random weights drawn from the fixed seed
(`checkpoints.RANDOM_WEIGHTS_SEED`), so two devices that hold the same model name
at the same input size agree on it.

Models are loaded once, at start-up, on the device's compute thread (torch work
never runs on the event loop); `get` afterwards is a dictionary lookup.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgedi.models.checkpoints import load_model
from edgedi.models.head_split import prepare_head_split
from edgedi.models.specs import MODEL_NAMES
from edgedi.models.units import ModelSpec
from edgedi.models.zoo import ZooModel

__all__ = ["TORCH_RNG_LOCK", "HeldModel", "ModelNotHeld", "ModelStore"]

logger = logging.getLogger(__name__)

TORCH_RNG_LOCK = threading.Lock()
"""Held while drawing from torch's global random generator (building seeded models,
the profiler's random inputs). `build_model` seeds that one generator: if another
thread draws from it meanwhile (several agents in one process, as in the tests and
the demo), the "identical" weights silently differ."""


class ModelNotHeld(LookupError):
    """A task or job names a model (or input size) this device does not hold."""


@dataclass(frozen=True)
class HeldModel:
    """One loaded model: the torch module, its description and where its weights came from."""

    name: str
    input_size: int
    model: ZooModel
    spec: ModelSpec
    digest: str
    """`spec.digest()`: plans and tasks cite it, so an architecture mismatch is caught."""
    source: str


class ModelStore:
    """The models one device holds, all for one square input size."""

    def __init__(
        self, names: Sequence[str], input_size: int, checkpoint_dir: Path | None = None
    ) -> None:
        unknown = [name for name in names if name not in MODEL_NAMES]
        if unknown:
            raise ModelNotHeld(
                f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODEL_NAMES)}"
            )
        self.names: tuple[str, ...] = tuple(dict.fromkeys(names))
        self.input_size = input_size
        self.checkpoint_dir = checkpoint_dir
        self._held: dict[str, HeldModel] = {}

    def load_all(self) -> None:
        """Load every configured model (blocking: call it on the compute thread)."""
        for name in self.names:
            if name not in self._held:
                self._held[name] = self._load(name)

    def _load(self, name: str) -> HeldModel:
        checkpoint: Path | str = "auto"
        if self.checkpoint_dir is not None:
            candidate = self.checkpoint_dir / f"{name}.pt"
            if candidate.is_file():
                checkpoint = candidate
        with TORCH_RNG_LOCK:
            model, source = load_model(name, self.input_size, checkpoint)
        if source.startswith("WARNING"):
            logger.warning("%s", source)
        else:
            logger.info("%s", source)
        # VGG-16's head weights laid out now (0.8 s on one core), not per plan in a job.
        prepare_head_split(model)
        spec = model.spec
        return HeldModel(name, self.input_size, model, spec, spec.digest(), source)

    @property
    def held(self) -> tuple[str, ...]:
        """Names of the loaded models, in configuration order."""
        return tuple(name for name in self.names if name in self._held)

    def holds(self, name: str, input_size: int | None = None) -> bool:
        return name in self._held and (input_size is None or input_size == self.input_size)

    def get(self, name: str, input_size: int | None = None) -> HeldModel:
        """The held model; `ModelNotHeld` (with a readable reason) otherwise."""
        held = self._held.get(name)
        if held is None:
            known = ", ".join(self.held) or "none"
            raise ModelNotHeld(f"model {name!r} is not held by this device (it holds: {known})")
        if input_size is not None and input_size != self.input_size:
            raise ModelNotHeld(
                f"model {name!r} is held for {self.input_size} px inputs, not {input_size} px"
            )
        return held

    def models(self) -> Iterable[HeldModel]:
        return (self._held[name] for name in self.held)
