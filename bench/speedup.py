"""Measured speedup of every strategy over one device, with the planner's prediction beside it.

    .venv/bin/python bench/speedup.py [--quick] [--models M,...] [--devices 4,...]
        [--links loopback,1gbit,100mbit] [--strategies S,...] [--images K]
        [--out bench/results/speedup.md] [--plots DIR]

For each model, link and device count, a local cluster of real `edgedi agent`
processes (the demo's launcher: CPU quotas of the demo's speeds, shaped links in
network namespaces for 1gbit/100mbit when root) runs the same images with every
strategy, interleaved: image 1 with strategy A, B, C, ..., image 2 with B, C, ...,
A, and so on, so slow drifts of this shared machine hit every strategy alike.
Each job's client round trip is timed; its result carries the plan's predicted
latency (`latency_ms["predicted"]`). Reported per strategy: the median and p90
latency, the median prediction and its error, and the speedup over `single` of
the same run; per cluster, the ideal bound (sum of the device speeds / the fastest).

`--plots DIR` (needs matplotlib: `pip install -e .[plots]`) draws speedup against
devices per model with the ideal line, and predicted against measured latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgedi.agent.client import JobTimeout, connect
from edgedi.agent.commands.demo import settle, warm_up_jobs_for_auto
from edgedi.agent.local_cluster import EmulationChoice, LocalCluster
from edgedi.agent.trace_chart import render_comparison
from edgedi.broker.messages import JobResult
from edgedi.models.data import iter_images

SIZE = 200
ALL_STRATEGIES = (
    "auto",
    "channels",
    "single",
    "edgeci",
    "edgedi",
    "edgeld",
    "deepthings",
    "proportional",
    "modnn",
    "equal",
)
ZOO = ("vgg16", "vgg16-edgedi", "resnet18", "resnet18-edgedi", "resnet34", "resnet34-edgedi")


@dataclass
class Series:
    strategy: str
    seconds: list[float] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    chosen: set[str] = field(default_factory=set)
    failures: int = 0
    traced: JobResult | None = None
    """One more job, not counted, with its measured and predicted timelines."""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000 if self.seconds else math.nan

    @property
    def p90_ms(self) -> float:
        if not self.seconds:
            return math.nan
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))] * 1000

    @property
    def predicted_ms(self) -> float:
        return statistics.median(self.predicted) if self.predicted else math.nan


@dataclass
class Run:
    model: str
    link: str
    devices: int
    speeds: tuple[float, ...]
    ideal: float
    link_note: str
    series: dict[str, Series]
    seconds: float
    emulation: str = "cgroup-v1"


async def _measure(
    cluster: LocalCluster, model: str, strategies: list[str], images: int
) -> dict[str, Series]:
    series = {s: Series(s) for s in strategies}
    items = list(iter_images(2024, SIZE, count=images))
    async with connect(cluster.host, cluster.port, root=cluster.root) as client:
        for strategy in strategies:  # warm-up: the first job of a plan pays one-off costs
            # auto also measures its best candidates first and settles (as in the demo).
            async def warm_up(strategy: str = strategy) -> JobResult | None:
                try:
                    return await client.infer(items[0].image, model, strategy=strategy, timeout=120)
                except JobTimeout:
                    return None

            if strategy == "auto":
                await settle(warm_up, warm_up_jobs_for_auto())
            else:
                await warm_up()
        for position, item in enumerate(items):
            order = (
                strategies[position % len(strategies) :] + strategies[: position % len(strategies)]
            )
            for strategy in order:
                started = time.perf_counter()
                try:
                    result = await client.infer(item.image, model, strategy=strategy, timeout=120)
                except JobTimeout:
                    series[strategy].failures += 1
                    continue
                elapsed = time.perf_counter() - started
                if result.status != "ok":
                    series[strategy].failures += 1
                    continue
                series[strategy].seconds.append(elapsed)
                if "predicted" in result.latency_ms:
                    series[strategy].predicted.append(result.latency_ms["predicted"])
                if result.strategy:
                    series[strategy].chosen.add(result.strategy)
            print(f"  image {position + 1}/{len(items)}", file=sys.stderr, flush=True)
        if "auto" in series:
            with contextlib.suppress(JobTimeout):
                traced = await client.infer(items[0].image, model, timeout=120, trace=True)
                if traced.status == "ok" and traced.trace:
                    series["auto"].traced = traced
    return series


def run_one(
    model: str,
    link: str,
    devices: int,
    strategies: list[str],
    images: int,
    emulation: EmulationChoice = "auto",
) -> Run:
    started = time.monotonic()
    cluster = LocalCluster(devices, model=model, input_size=SIZE, link=link, emulation=emulation)
    try:
        cluster.start()
        asyncio.run(cluster.wait_ready(300))
        series = asyncio.run(_measure(cluster, model, strategies, images))
        assert cluster.emulation is not None and cluster.links is not None
        return Run(
            model,
            cluster.links.name,
            devices,
            tuple(cluster.emulation.effective),
            cluster.emulation.ideal_speedup,
            cluster.links.describe(),
            series,
            time.monotonic() - started,
            cluster.emulation.method,
        )
    finally:
        cluster.stop(keep_logs=bool(os.environ.get("EDGEDI_KEEP_LOGS")))


def _table(run: Run) -> list[str]:
    single = run.series.get("single")
    base = single.median_ms if single is not None else math.nan
    lines = [
        f"### {run.model}, {run.devices} devices, {run.link}",
        "",
        f"Speeds {'/'.join(f'{s:.2f}' for s in run.speeds)} of a core by {run.emulation} "
        f"(ideal speedup {run.ideal:.2f}×); links: {run.link_note}; {run.seconds:.0f} s.",
        "",
        "| strategy | median ms | p90 ms | speedup over single | predicted ms | prediction error | "
        "jobs | plan chosen |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, series in sorted(run.series.items(), key=lambda kv: kv[1].median_ms):
        speedup = base / series.median_ms if series.seconds else math.nan
        error = series.predicted_ms / series.median_ms - 1 if series.seconds else math.nan
        chosen = ", ".join(sorted(series.chosen)) if name in ("auto", "channels") else ""
        failures = f" ({series.failures} failed)" if series.failures else ""
        lines.append(
            f"| {name} | {series.median_ms:.1f} | {series.p90_ms:.1f} | {speedup:.2f}× | "
            f"{series.predicted_ms:.1f} | {error:+.0%} | {len(series.seconds)}{failures} | "
            f"{chosen} |"
        )
    lines.append("")
    return lines


def _gantts(runs: list[Run], folder: Path) -> list[Path]:
    """One traced job of `auto` per run: measured above the plan's prediction (Pillow)."""
    written = []
    for run in runs:
        auto = run.series.get("auto")
        if auto is None or auto.traced is None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        traced = auto.traced
        title = f"{run.model}, {run.link}, {run.devices} devices, {traced.strategy}"
        image = render_comparison(traced.trace, traced.predicted_trace, title)
        path = folder / f"gantt_{run.model}_{run.link}_{run.devices}.png"
        image.save(path)
        written.append(path)
    return written


def _plots(runs: list[Run], folder: Path) -> list[Path]:
    written = _gantts(runs, folder)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plots (pip install -e .[plots])", file=sys.stderr)
        return written
    folder.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for model in sorted({r.model for r in runs}):
        for link in sorted({r.link for r in runs}):
            points = sorted(
                (r.devices, r.series["single"].median_ms / r.series["auto"].median_ms)
                for r in runs
                if r.model == model
                and r.link == link
                and "auto" in r.series
                and "single" in r.series
            )
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=f"{model} ({link})")
    ideal = sorted({(r.devices, r.ideal) for r in runs})
    if ideal:
        axes.plot(*zip(*ideal, strict=True), "k--", label="ideal (Σ speeds / fastest)")
    axes.set_xlabel("devices")
    axes.set_ylabel("measured speedup over one device (auto)")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    path = folder / "speedup.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    written.append(path)
    figure, axes = plt.subplots(figsize=(5.5, 5.5))
    values = [
        (s.median_ms, s.predicted_ms, s.strategy)
        for r in runs
        for s in r.series.values()
        if s.seconds and s.predicted
    ]
    if values:
        axes.scatter([v[0] for v in values], [v[1] for v in values], s=12)
        top = max(max(v[0], v[1]) for v in values) * 1.1
        axes.plot([0, top], [0, top], "k--", linewidth=0.8, label="predicted = measured")
        axes.fill_between([0, top], [0, top * 0.85], [0, top * 1.15], alpha=0.15, label="±15 %")
        axes.set_xlabel("measured median latency, ms")
        axes.set_ylabel("predicted latency, ms")
        axes.legend()
        axes.grid(alpha=0.3)
        path = folder / "predicted_vs_measured.png"
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two models, 4 devices, loopback")
    parser.add_argument("--models", help=f"comma-separated (default: {','.join(ZOO)})")
    parser.add_argument("--devices", default="4", help="comma-separated counts (default 4)")
    parser.add_argument("--links", default="loopback", help="loopback,1gbit,100mbit")
    parser.add_argument("--strategies", help="comma-separated (default: all)")
    parser.add_argument("--images", type=int, default=10, help="images per strategy")
    parser.add_argument(
        "--emulation",
        choices=("auto", "quota", "paced", "slowdown"),
        default="auto",
        help="how device speeds are made (edgedi demo --emulation; default: CPU quotas)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/speedup.md"))
    parser.add_argument("--plots", type=Path, help="folder for PNG plots")
    args = parser.parse_args()
    models = args.models.split(",") if args.models else list(ZOO)
    if args.quick and not args.models:
        models = ["vgg16-edgedi", "resnet34"]
    strategies = args.strategies.split(",") if args.strategies else list(ALL_STRATEGIES)
    if "single" not in strategies:
        strategies.append("single")
    runs = []
    for model in models:
        for link in args.links.split(","):
            for devices in (int(d) for d in args.devices.split(",")):
                print(f"{model}, {devices} devices, {link} ...", file=sys.stderr, flush=True)
                runs.append(run_one(model, link, devices, strategies, args.images, args.emulation))
    command = shlex.join([".venv/bin/python", *sys.argv])
    lines = [
        "# Measured speedup of every strategy",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared, noisy); "
        f"{time.strftime('%Y-%m-%d')}. Every figure is a measurement through the real "
        "runtime (agent processes, a private Mosquitto, the direct data plane), jobs one "
        "at a time, strategies interleaved image by image; `predicted` is what the plan "
        "said before the job ran.",
        "",
    ]
    for run in runs:
        lines += _table(run)
    if args.plots is not None:
        for path in _plots(runs, args.plots):
            lines.append(f"![{path.stem}]({os.path.relpath(path, args.out.parent)})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
