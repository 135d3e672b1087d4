"""Why does the compact VGG lag the compact ResNets? A small, seeded CPU probe.

    nice -n 19 .venv/bin/python bench/recipe_probe.py [--epochs 5] [--per-class 50]
        [--size 64] [--lrs 5e-4,2e-3,8e-3] [--models vgg16-edgedi,resnet18-edgedi]
        [--json bench/results/recipe_probe.json]

Two measurements, both with the recipe of `edgedi train` (fresh images every epoch,
steel augmentation, warm-up + cosine, label smoothing, AdamW):

1. *At initialisation*, one batch: the standard deviation of each unit's output
   (does the signal survive the depth?) and the gradient norm of each unit's weights
   relative to the weights (does the loss reach the first layers?).
2. *A short learning-rate sweep*: a few epochs per model and peak learning rate, then
   accuracy on the held-out split of the seed-0 set (180 images).

One torch thread; it is a probe of training speed on a tiny budget, not a result
about converged accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgedi.models.data import split_indices
from edgedi.models.training import (
    DataSource,
    FreshSynthetic,
    TrainConfig,
    evaluate,
    normalize,
    train_epochs,
)
from edgedi.models.zoo import build_model


def at_initialisation(
    name: str, size: int, images: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    model = build_model(name, size, seed=0)
    model.train()
    outputs: list[float] = []
    hooks = [
        unit.register_forward_hook(lambda _m, _i, out: outputs.append(float(out.detach().std())))
        for unit in model.units
    ]
    loss = F.cross_entropy(model(normalize(images)), torch.as_tensor(labels))
    loss.backward()  # type: ignore[no-untyped-call]
    for hook in hooks:
        hook.remove()
    relative = []
    for unit in model.units:
        weights = [p for p in unit.parameters() if p.dim() > 1]
        if not weights:
            continue
        grad = float(torch.sqrt(sum((p.grad**2).sum() for p in weights)))  # type: ignore[operator]
        norm = float(torch.sqrt(sum((p**2).sum() for p in weights)))
        relative.append(grad / norm)
    return {
        "unit_output_std": [round(v, 4) for v in outputs],
        "relative_grad": [float(f"{v:.3g}") for v in relative],
        "first_over_last_relative_grad": relative[0] / relative[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=50, help="fresh images per class/epoch")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--lrs", default="5e-4,2e-3,8e-3")
    parser.add_argument("--models", default="vgg16-edgedi,resnet18-edgedi")
    parser.add_argument("--json", type=Path, default=Path("bench/results/recipe_probe.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = args.size

    source = DataSource(None, seed=0, per_class=100)
    _train, test = split_indices(source.labels(), 0.3, 0)
    test_images, test_labels = source.load(size, test)
    stream = FreshSynthetic(seed=0, per_class=args.per_class, size=size, first=100)
    started = time.process_time()
    epochs = [stream(epoch) for epoch in range(args.epochs)]  # drawn once, shared by all runs
    drawing = time.process_time() - started

    results: dict[str, Any] = {
        "command": "bench/recipe_probe.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json"),
        "machine": f"{platform.platform()}, torch {torch.__version__}, 1 thread, CPU",
        "drawing_cpu_s": round(drawing, 1),
        "models": {},
    }
    for name in args.models.split(","):
        entry: dict[str, Any] = {
            "init": at_initialisation(name, size, test_images[:32], test_labels[:32])
        }
        runs = []
        for lr in (float(v) for v in args.lrs.split(",")):
            model = build_model(name, size, seed=0)
            config = TrainConfig(epochs=args.epochs, learning_rate=lr, seed=0)
            cpu = time.process_time()
            state = train_epochs(model, lambda e: epochs[e], config)
            accuracy = evaluate(model, test_images, test_labels).accuracy
            run = {
                "lr": lr,
                "train_loss": [round(r.loss, 3) for r in state.history],
                "train_accuracy": [round(r.train_accuracy, 3) for r in state.history],
                "test_accuracy": round(accuracy, 4),
                "cpu_s": round(time.process_time() - cpu, 1),
            }
            print(name, run, flush=True)
            runs.append(run)
        entry["runs"] = runs
        results["models"][name] = entry
        print(name, "init", entry["init"], flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
