"""`edgedi infer`: classify images on a running cluster and print the results.

    edgedi infer --broker 127.0.0.1:1883 Cr_1.bmp Sc_7.png
    edgedi infer --broker 127.0.0.1:1883 --synthetic 12 --model tiny-edgedi

Images (PNG, BMP, ...) are read as grayscale and resized to the cluster's input
size (`--size`, by default the published plan's; all models share it). Images of
more than 8 bits per sample are scaled by their real range. An image that cannot
be read, has more than `--max-pixels` pixels (checked from its header, before it
is decoded) or a side shorter than the model's minimum input (at least
`MIN_IMAGE_SIDE`) gets its own error line; the rest of the batch still runs.
Without `--model`, the model of the published plan is used. Jobs are submitted
concurrently (at most `--parallel` at once), each retried with the same job id
until its result arrives or `--timeout` runs out. Exit status: 0 when every image
got an ok result, 1 when any got an error or timed out (or the broker refused a
subscription: "not authorised for TOPIC"), 2 for bad arguments. Where the broker
withholds records silently instead (Mosquitto), a missing plan or leader record is
named, with the reminder that the account may not be authorised to read it.
Connection flags: every command's (`edgedi.agent.connection`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgedi.agent.connection import add_connection_arguments

# Below this many pixels a side an image holds no texture to classify, whatever
# the smallest input the model could technically take.
MIN_IMAGE_SIDE = 8
# The retained plan arrives right after the SUBACK; this allows for a slow link.
PLAN_WAIT_S = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="image files")
    add_connection_arguments(parser)
    parser.add_argument("--model", help="model to run (default: the published plan's)")
    parser.add_argument("--strategy", help="partitioning strategy for these jobs")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per image")
    parser.add_argument(
        "--size", type=int, default=None, metavar="PX", help="input size (default: the plan's)"
    )
    parser.add_argument(
        "--synthetic", type=int, default=0, metavar="N", help="also submit N generated images"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help="refuse image files of more pixels than this, before decoding them (default 40000000)",
    )
    parser.add_argument("--parallel", type=int, default=4, metavar="N", help="jobs at once")
    parser.add_argument("--json", action="store_true", help="print each result as JSON")


def _minimum_side(model: str) -> int:
    from edgedi.models.specs import UnknownModelError, minimum_input_size

    try:
        return max(MIN_IMAGE_SIDE, minimum_input_size(model))
    except UnknownModelError:  # the cluster says so in the job's result
        return MIN_IMAGE_SIDE


def _inputs(
    args: argparse.Namespace, size: int, model: str
) -> Iterator[tuple[str, npt.NDArray[np.uint8] | None, str | None]]:
    """(name, image or None, error) for every requested image."""
    from edgedi.models.data import DEFAULT_MAX_IMAGE_PIXELS, DatasetError, iter_images, read_image

    max_pixels = DEFAULT_MAX_IMAGE_PIXELS if args.max_pixels is None else args.max_pixels
    min_side = _minimum_side(model)
    for path in args.images:
        try:
            yield str(path), read_image(path, size, max_pixels=max_pixels, min_side=min_side), None
        except DatasetError as error:
            yield str(path), None, str(error)
    if args.synthetic > 0:
        for sample in iter_images(args.seed, size, count=args.synthetic):
            yield sample.name, sample.image, None


def _line(name: str, result: Any) -> str:
    if result.status != "ok":
        return f"{name}: error: {result.error}"
    probability = result.probabilities[result.label] if result.probabilities else float("nan")
    total = result.latency_ms.get("total", float("nan"))
    devices = ", ".join(result.devices)
    label = result.class_name or f"class {result.label}"
    return (
        f"{name}: {label} (label {result.label}, p={probability:.3f}) in {total:.1f} ms "
        f"on {devices} [{result.strategy}, plan {str(result.plan_id)[:8]}]"
    )


async def _main(args: argparse.Namespace) -> int:
    from edgedi.agent.client import JobTimeout, connect_to
    from edgedi.agent.config import ConfigError
    from edgedi.agent.connection import describe, load_from_arguments
    from edgedi.broker.errors import BrokerError
    from edgedi.broker.topics import PLAN_CURRENT

    try:
        broker = load_from_arguments(args)
    except ConfigError as invalid:
        for line in invalid.lines:
            print(line, file=sys.stderr)
        return 2
    address = describe(broker)
    failures = 0
    try:
        async with connect_to(broker) as client:
            announcement = await client.current_plan(timeout=PLAN_WAIT_S)
            model = args.model
            if model is None:
                if announcement is None:
                    print(f"{client.unseen(PLAN_CURRENT)}; pass --model", file=sys.stderr)
                    return 1
                model = announcement.plan.model
            size = args.size
            if size is None:
                # The cluster holds every model at one input size: the plan's tells it.
                size = announcement.plan.input_shape[1] if announcement is not None else 200
            slots = asyncio.Semaphore(max(1, args.parallel))

            async def one(name: str, image: npt.NDArray[np.uint8]) -> tuple[str, Any]:
                async with slots:
                    try:
                        result = await client.infer(
                            image, model, timeout=args.timeout, strategy=args.strategy
                        )
                    except JobTimeout as error:
                        return name, error
                    return name, result

            jobs = []
            for name, image, error in _inputs(args, size, model):
                if image is None:
                    print(f"{name}: error: {error}", file=sys.stderr)
                    failures += 1
                    continue
                jobs.append(one(name, image))
            if not jobs and failures == 0:
                print("nothing to do: give IMAGE files or --synthetic N", file=sys.stderr)
                return 2
            for finished in asyncio.as_completed(jobs):
                name, outcome = await finished
                if isinstance(outcome, JobTimeout):
                    failures += 1
                    print(f"{name}: error: {outcome}")
                    continue
                if outcome.status != "ok":
                    failures += 1
                if args.json:
                    print(outcome.model_dump_json())
                else:
                    print(_line(name, outcome))
                sys.stdout.flush()
    except BrokerError as error:
        print(f"broker {address}: {error}", file=sys.stderr)
        return 1
    return 1 if failures else 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))
