"""Throughput mode: whole images on every device, against the devices' own throughputs.

    .venv/bin/python bench/throughput.py [--model vgg16-edgedi] [--images 40]
        [--out bench/results/throughput.md]

The demo cluster's speeds (0.4/0.4/0.25/0.25 of a core). First, for each distinct
speed, a one-device cluster of that speed runs a stream of images with a few jobs in
flight (so the device never waits for the next image): its own throughput. Then the
four-device cluster runs the same stream with the `images` strategy (one whole image
per device, devices in proportion to their speed) and `--window` jobs in flight.
Reported: images per second of each, and the four-device figure against the sum of
the devices' own throughputs (the ideal of whole-image dispatch).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path

from edgedi.agent.client import connect
from edgedi.agent.local_cluster import LocalCluster, default_speeds
from edgedi.models.data import iter_images

SIZE = 200


async def _stream(
    cluster: LocalCluster, model: str, strategy: str, images: int, window: int
) -> float:
    """Images per second of a stream with `window` jobs in flight (after a warm-up)."""
    items = [item.image for item in iter_images(7, SIZE, count=images)]
    async with connect(cluster.host, cluster.port, root=cluster.root) as client:
        for image in items[:window]:  # warm-up: plans made, allocations done
            await client.infer(image, model, strategy=strategy, timeout=120)
        slots = asyncio.Semaphore(window)

        async def one(image: object) -> None:
            async with slots:
                result = await client.infer(image, model, strategy=strategy, timeout=300)  # type: ignore[arg-type]
                if result.status != "ok":
                    raise RuntimeError(result.error)

        started = time.perf_counter()
        await asyncio.gather(*(one(image) for image in items))
        return len(items) / (time.perf_counter() - started)


def measure(
    speeds: tuple[float, ...], model: str, strategy: str, images: int, window: int
) -> float:
    cluster = LocalCluster(len(speeds), speeds=speeds, model=model, input_size=SIZE)
    try:
        cluster.start()
        asyncio.run(cluster.wait_ready(300))
        return asyncio.run(_stream(cluster, model, strategy, images, window))
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg16-edgedi")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--window", type=int, default=8, help="jobs in flight, 4 devices")
    parser.add_argument("--out", type=Path, default=Path("bench/results/throughput.md"))
    args = parser.parse_args()
    speeds = default_speeds(4)
    own: dict[float, float] = {}
    for speed in sorted(set(speeds)):
        print(f"one device at {speed} of a core ...", file=sys.stderr, flush=True)
        own[speed] = measure((speed,), args.model, "single", args.images // 2, 2)
    print("four devices, images strategy ...", file=sys.stderr, flush=True)
    together = measure(speeds, args.model, "images", args.images, args.window)
    ideal = sum(own[speed] for speed in speeds)
    lines = [
        "# Throughput mode: whole images on every device",
        "",
        f"Command: `{shlex.join(['.venv/bin/python', *sys.argv])}`",
        "",
        f"Model {args.model} at {SIZE} px; devices at "
        f"{'/'.join(f'{s:g}' for s in speeds)} of a core (cgroup quotas), loopback, private "
        "Mosquitto; a stream of images with jobs in flight, after a warm-up.",
        "",
        "| cluster | images/s |",
        "|---|---:|",
        *(
            f"| one device at {speed:g} of a core (`single`, 2 in flight) | {own[speed]:.2f} |"
            for speed in sorted(own)
        ),
        f"| sum of the four devices' own throughputs | {ideal:.2f} |",
        f"| four devices, `images` strategy, {args.window} in flight | {together:.2f} |",
        "",
        f"Four devices together: {together / ideal:.2f} × the sum of their own throughputs.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
