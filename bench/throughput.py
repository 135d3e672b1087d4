"""Throughput mode: whole images on every device, against the devices' own throughputs.

    .venv/bin/python bench/throughput.py [--model vgg16-edgedi] [--images 120]
        [--window 8] [--rounds 3] [--baseline GIT_REF]
        [--out bench/results/throughput.md]

The demo cluster's speeds (0.4/0.4/0.25/0.25 of a core). For each distinct speed,
a one-device cluster of that speed runs a stream of images with two jobs in flight
(the device never waits for the next image): its own throughput. The four-device
cluster runs a stream with the `images` strategy (one whole image per device) and
`--window` jobs in flight. With `--baseline REF` a second four-device cluster runs
the same stream with the agents of git revision REF (the launcher and the client
stay this tree's): a before/after in the same run.

All the clusters are started first and stay up; their streams take turns, round
after round, in a rotating order, so a machine whose load changes during the run
(a shared one) weighs on all of them alike; the median over the rounds is
reported, with the load average at each stream. A stream's
throughput is its steady state: completions per second between the `window`-th
result and the `window`-th from last, so neither the ramp-up (devices receiving
their first images) nor the drain (the last images on the slowest devices) counts.
The four-device streams also report how much of the time each device computed
(its whole images' compute seconds over the steady-state interval).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgedi.agent.client import connect
from edgedi.agent.local_cluster import Calibration, LocalCluster, default_speeds
from edgedi.broker.messages import JobResult
from edgedi.models.data import iter_images

SIZE = 200
_SOURCES = ("agent", "broker", "planner", "models")


@dataclass
class Stream:
    """One measured stream of images through one cluster."""

    per_second: float
    whole: float
    """Images over the whole stream's time, ramp-up and drain included."""
    load_average: str
    busy: dict[str, float] = field(default_factory=dict)
    """Each device's compute seconds per second of the steady state (four devices)."""
    compute_ms: dict[str, float] = field(default_factory=dict)
    """Each device's mean compute time of one image in the steady state."""
    leader_ms: dict[str, float] = field(default_factory=dict)
    """Mean of the leader's stages that are not the device's compute (ms)."""


@dataclass(frozen=True)
class Config:
    label: str
    speeds: tuple[float, ...]
    strategy: str
    window: int
    images: int
    prefix: str = "dev"
    """Device names: `<prefix>-1` ..."""
    source: Path | None = None
    """Agents' code: None for this tree, else a folder holding `edgedi/` (baseline)."""


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def _stream(cluster: LocalCluster, config: Config, model: str) -> Stream:
    items = [item.image for item in iter_images(7, SIZE, count=config.images)]
    async with connect(cluster.host, cluster.port, root=cluster.root) as client:
        for image in items[: config.window]:  # warm-up: plans made, allocations done
            await client.infer(image, model, strategy=config.strategy, timeout=120)
        slots = asyncio.Semaphore(config.window)
        finished: list[tuple[float, JobResult]] = []

        async def one(image: object) -> None:
            async with slots:
                result = await client.infer(image, model, strategy=config.strategy, timeout=300)  # type: ignore[arg-type]
                if result.status != "ok":
                    raise RuntimeError(result.error)
                finished.append((time.perf_counter(), result))

        load = _load_average()
        started = time.perf_counter()
        await asyncio.gather(*(one(image) for image in items))
        whole = len(items) / (time.perf_counter() - started)
        load = f"{load} → {_load_average()}"
    finished.sort(key=lambda item: item[0])
    first, last = config.window, len(finished) - 1 - config.window
    if last <= first:
        raise SystemExit(f"--images must be well above 2 x the window ({config.window})")
    interval = finished[last][0] - finished[first][0]
    stream = Stream((last - first) / interval, whole, load)
    steady = [result for _, result in finished[first + 1 : last + 1]]
    computed: dict[str, list[float]] = {}
    for result in steady:
        worker = next((d for d in result.devices if d != result.sender), result.sender)
        computed.setdefault(worker, []).append(result.latency_ms.get("worker_compute", 0.0))
    stream.compute_ms = {device: statistics.mean(ms) for device, ms in sorted(computed.items())}
    if len(config.speeds) > 1:
        stream.busy = {device: sum(ms) / 1000 / interval for device, ms in sorted(computed.items())}
        for stage in ("prepare", "scatter", "tail"):
            values = [r.latency_ms.get(stage, 0.0) for _, r in finished]
            stream.leader_ms[stage] = statistics.mean(values)
    return stream


@contextlib.contextmanager
def _agents_from(source: Path | None) -> Iterator[None]:
    """Agents started in the block run the code under `source` (None: this tree's)."""
    if source is None:
        yield
        return
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(source) + ("" if previous is None else os.pathsep + previous)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def _baseline_tree(ref: str, folder: Path) -> tuple[Path, str]:
    """`edgedi` of git revision `ref` under `folder`, importable ahead of this tree's."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{ref}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    package = folder / "edgedi"
    package.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit, *_SOURCES], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(package)], input=archive, check=True)
    return folder, commit


def start(config: Config, model: str, calibration: Calibration | None) -> LocalCluster:
    """A running cluster for `config`, its devices named after it (clusters side by side
    need their own quota groups)."""
    cluster = LocalCluster(
        len(config.speeds),
        speeds=config.speeds,
        model=model,
        input_size=SIZE,
        calibration=calibration,
    )
    cluster.device_ids = tuple(f"{config.prefix}-{n + 1}" for n in range(len(config.speeds)))
    try:
        with _agents_from(config.source):
            cluster.start()
        asyncio.run(cluster.wait_ready(300))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _median(streams: list[Stream], whole: bool = False) -> float:
    return statistics.median(stream.whole if whole else stream.per_second for stream in streams)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg16-edgedi")
    parser.add_argument("--images", type=int, default=120, help="per four-device stream")
    parser.add_argument("--window", type=int, default=8, help="jobs in flight, 4 devices")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="GIT_REF", help="also run these agents' code")
    parser.add_argument("--out", type=Path, default=Path("bench/results/throughput.md"))
    args = parser.parse_args()
    speeds = default_speeds(4)
    with tempfile.TemporaryDirectory(prefix="edgedi-baseline-") as folder:
        configs = [
            Config(
                f"one device at {speed:g} of a core (`single`, 2 in flight)",
                (speed,),
                "single",
                2,
                args.images // 2,
                prefix=f"one{round(speed * 100)}",
            )
            for speed in sorted(set(speeds))
        ]
        together = Config(
            f"four devices, `images` strategy, {args.window} in flight",
            speeds,
            "images",
            args.window,
            args.images,
        )
        configs.append(together)
        baseline: Config | None = None
        if args.baseline:
            source, commit = _baseline_tree(args.baseline, Path(folder))
            baseline = Config(
                f"four devices, `images` strategy, {args.window} in flight, agents of {commit}",
                speeds,
                "images",
                args.window,
                args.images,
                prefix="old",
                source=source,
            )
            configs.append(baseline)
        runs: dict[Config, list[Stream]] = {config: [] for config in configs}
        clusters: dict[Config, LocalCluster] = {}
        try:
            # All clusters up at once, idle but for the one streaming: the streams can
            # take turns closely, whatever else the machine is doing meanwhile.
            calibration: Calibration | None = None
            for config in configs:
                print(f"starting: {config.label} ...", file=sys.stderr, flush=True)
                clusters[config] = start(config, args.model, calibration)
                calibration = clusters[config].calibration
            for round_ in range(args.rounds):
                shift = round_ % len(configs)
                for config in configs[shift:] + configs[:shift]:
                    stream = asyncio.run(_stream(clusters[config], config, args.model))
                    runs[config].append(stream)
                    print(
                        f"round {round_ + 1}: {config.label}: {stream.per_second:.2f} images/s "
                        f"(load {stream.load_average})",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for cluster in clusters.values():
                cluster.stop()
    own = {config.speeds[0]: _median(runs[config]) for config in configs if len(config.speeds) == 1}
    ideal = sum(own[speed] for speed in speeds)
    singles = {c.speeds[0]: _median(runs[c], whole=True) for c in configs if len(c.speeds) == 1}
    ideal_whole = sum(singles[speed] for speed in speeds)

    def row(config: Config) -> str:
        each = ", ".join(f"{s.per_second:.2f}" for s in runs[config])
        whole = _median(runs[config], whole=True)
        return f"| {config.label} | {_median(runs[config]):.2f} | {each} | {whole:.2f} |"

    def detail(config: Config) -> list[str]:
        lines = [f"{config.label}:"]
        for number, stream in enumerate(runs[config], 1):
            parts = [f"load average {stream.load_average}"]
            if stream.busy:
                busy = ", ".join(f"{d} {share:.0%}" for d, share in stream.busy.items())
                parts.append(f"devices computing {busy}")
            each = ", ".join(f"{d} {ms:.0f} ms" for d, ms in stream.compute_ms.items())
            parts.append(f"compute per image {each}")
            if stream.leader_ms:
                stages = ", ".join(f"{k} {v:.1f} ms" for k, v in stream.leader_ms.items())
                parts.append(f"leader per job: {stages}")
            lines.append(f"- round {number}: {'; '.join(parts)}")
        return [*lines, ""]

    loads = [float(s.load_average.split()[0]) for streams in runs.values() for s in streams]
    lines = [
        "# Throughput mode: whole images on every device",
        "",
        f"Command: `{shlex.join(['.venv/bin/python', *sys.argv])}`",
        "",
        f"Model {args.model} at {SIZE} px; devices at "
        f"{'/'.join(f'{s:g}' for s in speeds)} of a core (cgroup quotas), loopback, private "
        "Mosquitto. Each cluster runs a stream of images after a warm-up; throughput is "
        "the steady state (completions per second between the window-th result and the "
        f"window-th from last). {args.rounds} rounds, the clusters in turn (rotating "
        "order); the median is reported, each round's figure beside it.",
        "",
        "| cluster | images/s (median) | each round | whole stream (median) |",
        "|---|---:|---|---:|",
        *(row(config) for config in configs if len(config.speeds) == 1),
        f"| sum of the four devices' own throughputs | {ideal:.2f} | | {ideal_whole:.2f} |",
        row(together),
        *([row(baseline)] if baseline is not None else []),
        "",
        f"Four devices together: **{_median(runs[together]) / ideal:.2f} ×** the sum of "
        "their own throughputs"
        + (
            f" (agents of {baseline.label.rsplit(' ', 1)[-1]}: "
            f"{_median(runs[baseline]) / ideal:.2f} ×)."
            if baseline is not None
            else "."
        ),
        "",
        "Over the whole stream (ramp-up and drain included, as earlier figures were taken; "
        "it depends on the stream's length): "
        f"{_median(runs[together], whole=True) / ideal_whole:.2f} ×"
        + (
            f" (agents of {baseline.label.rsplit(' ', 1)[-1]}: "
            f"{_median(runs[baseline], whole=True) / ideal_whole:.2f} ×)."
            if baseline is not None
            else "."
        ),
        "",
        f"Load average (1 min) during the streams: {min(loads):.1f} to {max(loads):.1f} on "
        f"{os.cpu_count()} cores (the clusters' own work, and whatever else ran beside "
        "them). Per stream, the load average (1/5/15 min) at its start → end; how much "
        "of the steady state each device computed (its images' compute seconds over the "
        "interval: about ±1 image per device at the edges); its mean compute time of one "
        "image; and the leader's mean time per job to normalise the image (prepare), send "
        "it (scatter) and run the tail:",
        "",
        *(line for config in configs for line in detail(config)),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
