"""Model checkpoints: save, verify and load trained weights of the zoo models.

A checkpoint is one `torch.save` file holding only tensors and plain data (so it is
read with `weights_only=True`, which never runs code from the file):

* ``format``: ``"edgedi-checkpoint/1"``;
* ``name``, ``input_size`` and ``digest``: the model, the square input size it was
  saved for, and `get_spec(name, input_size).digest()` at that time;
* ``dtype``: ``"float32"`` or ``"float16"`` (fp16 storage halves the file; floating
  tensors are cast back to fp32 on load);
* ``state``: the state dict, ``weights_sha256``: a hash of its tensors;
* ``meta``: free JSON-like data (training command, data seed, split, accuracy);
* ``training``: optionally the `TrainState` that lets a stopped run resume.

Loading refuses, with a `CheckpointError` that says what to do, a file that is not a
checkpoint, a checkpoint of another model, one whose architecture digest differs from
the current definition (the model code changed since it was trained), one whose
weights do not match their hash, and a size change the weights cannot follow (VGG-16's
classifier is tied to the input size; the GAP-headed models are not).

Shipped checkpoints live in ``models/weights/<name>.pt`` with a ``<name>.json``
sidecar that records how they were made. `load_model` is what the runtime calls.

Exceptions::

    ValueError
     └── CheckpointError   unreadable, mismatched or corrupted checkpoint
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from edgedi.models.specs import DEFAULT_INPUT_SIZE, UnknownModelError, get_spec
from edgedi.models.training import TrainState
from edgedi.models.zoo import ZooModel, build_model

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT",
    "RANDOM_WEIGHTS_SEED",
    "CheckpointError",
    "load_checkpoint",
    "load_model",
    "load_training_state",
    "read_checkpoint",
    "read_sidecar",
    "save_checkpoint",
    "shipped_checkpoint",
    "sidecar_path",
    "weights_digest",
    "write_sidecar",
]

logger = logging.getLogger(__name__)

FORMAT = "edgedi-checkpoint/1"
# Not "checkpoints/": a folder named like this module confuses mypy's namespace lookup.
CHECKPOINT_DIR = Path(__file__).resolve().parent / "weights"
# Weights used when no checkpoint exists: reproducible, so every device agrees on them.
RANDOM_WEIGHTS_SEED = 0


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stored_state(model: ZooModel, half: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        value = tensor.detach().cpu().clone()
        if half and value.is_floating_point():
            value = value.to(torch.float16)
        state[key] = value
    return state


def save_checkpoint(
    model: ZooModel,
    name: str,
    path: str | Path,
    meta: dict[str, Any] | None = None,
    *,
    half: bool = False,
    training: TrainState | None = None,
) -> Path:
    """Write `model` (zoo model `name`) to `path`; atomic (a temporary file, then rename).

    `half` stores floating tensors as fp16. `training` adds the state that lets
    `edgedi train --resume` continue the run. Returns the path written.
    """
    if model.name != name:
        raise CheckpointError(f"the model is {model.name!r}, not {name!r}")
    input_size = model.spec.input_shape[1]
    expected = get_spec(name, input_size).digest()
    if model.spec.digest() != expected:
        raise CheckpointError(
            f"the model's architecture (digest {model.spec.digest()}) is not the zoo's "
            f"{name} at {input_size} px (digest {expected}); only zoo models can be saved"
        )
    state = _stored_state(model, half)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "input_size": input_size,
        "digest": expected,
        "dtype": "float16" if half else "float32",
        "state": state,
        "weights_sha256": weights_digest(state),
        "meta": json.loads(json.dumps(meta or {})),  # plain data only, fails early otherwise
        "training": training.as_dict() if training is not None else None,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, temporary)
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dictionary, after checking the format and the weights' hash."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"{source}: no such checkpoint file")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not its format
        raise CheckpointError(f"{source}: not a readable checkpoint ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{source}: not an edgedi checkpoint (format {found!r}, not {FORMAT})"
        )
    state = payload["state"]
    if weights_digest(state) != payload["weights_sha256"]:
        raise CheckpointError(
            f"{source}: the weights do not match their recorded hash; the file is corrupted"
        )
    return payload


def _verify_identity(payload: dict[str, Any], name: str, source: Path) -> None:
    stored_name, stored_size = payload["name"], int(payload["input_size"])
    if stored_name != name:
        raise CheckpointError(
            f"{source} holds {stored_name!r} (digest {payload['digest']}), not {name!r}; "
            f"pass a checkpoint of {name}"
        )
    try:
        current = get_spec(name, stored_size).digest()
    except UnknownModelError as error:
        raise CheckpointError(f"{source}: {error}") from error
    if payload["digest"] != current:
        raise CheckpointError(
            f"{source}: made for {name} at {stored_size} px with architecture digest "
            f"{payload['digest']}, but the current {name} has digest {current}; the model "
            "definition changed since this checkpoint was trained: retrain it (edgedi train)"
        )


def load_checkpoint(name: str, path: str | Path, input_size: int | None = None) -> ZooModel:
    """Zoo model `name` with the weights of the checkpoint at `path`, fp32, in eval mode.

    `input_size` defaults to the checkpoint's own. Another size works for models
    whose weights do not depend on it (the GAP-headed ones); for the others this
    raises `CheckpointError`, as it does for any mismatch (see the module docstring).
    """
    source = Path(path)
    payload = read_checkpoint(source)
    _verify_identity(payload, name, source)
    size = int(payload["input_size"]) if input_size is None else input_size
    model = build_model(name, size, seed=RANDOM_WEIGHTS_SEED)
    expected = model.state_dict()
    state = payload["state"]
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: {name} was saved at {payload['input_size']} px and its weight "
                f"{key} has shape {tuple(tensor.shape)}, but at {size} px it needs "
                f"{tuple(expected[key].shape)}; load it at {payload['input_size']} px"
            )
    restored = {
        key: tensor.to(expected[key].dtype) if key in expected else tensor
        for key, tensor in state.items()
    }
    try:
        model.load_state_dict(restored, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: weights do not fit {name}: {error}") from error
    return model.eval()


def load_training_state(path: str | Path) -> TrainState | None:
    """The resumable training state stored in a checkpoint, if it has one."""
    data = read_checkpoint(path).get("training")
    return TrainState.from_dict(data) if data is not None else None


def sidecar_path(path: str | Path) -> Path:
    """Where the JSON record of how a checkpoint was made lives: beside it, ``.json``."""
    return Path(path).with_suffix(".json")


def write_sidecar(path: str | Path, record: dict[str, Any]) -> Path:
    target = sidecar_path(path)
    target.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return target


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    source = sidecar_path(path)
    if not source.is_file():
        return None
    data = json.loads(source.read_text())
    return data if isinstance(data, dict) else None


def shipped_checkpoint(name: str) -> Path | None:
    """The checkpoint shipped in the package for model `name`, if there is one."""
    path = CHECKPOINT_DIR / f"{name}.pt"
    return path if path.is_file() else None


def load_model(
    name: str,
    input_size: int = DEFAULT_INPUT_SIZE,
    checkpoint: Literal["auto"] | str | Path | None = "auto",
) -> tuple[ZooModel, str]:
    """The model the runtime should run, and a line saying where its weights come from.

    ``"auto"``: the shipped checkpoint when there is one, else seeded random weights.
    A path: that checkpoint (errors raise `CheckpointError`). None: seeded random
    weights. Random weights are announced with a WARNING in the description, since
    their predictions mean nothing.
    """
    path: Path | None
    if checkpoint == "auto":
        path = shipped_checkpoint(name)
    elif checkpoint is None:
        path = None
    else:
        path = Path(checkpoint)
    if path is None:
        model = build_model(name, input_size, seed=RANDOM_WEIGHTS_SEED)
        why = "no shipped checkpoint" if checkpoint == "auto" else "no checkpoint requested"
        description = (
            f"WARNING: {name} has random weights (seed {RANDOM_WEIGHTS_SEED}, {why}); "
            "its predictions are meaningless — train one with `edgedi train`"
        )
        return model, description
    model = load_checkpoint(name, path, input_size)
    record = read_sidecar(path) or {}
    accuracy = record.get("accuracy")
    suffix = f", test accuracy {accuracy:.3f}" if isinstance(accuracy, float) else ""
    return model, f"{name} weights from {path}{suffix}"
