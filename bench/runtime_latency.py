"""Runtime latency on loopback: what the runtime itself costs, and what parallelism buys.

    .venv/bin/python bench/runtime_latency.py [--out bench/results/runtime_latency.md] [--quick]

Both parts run real `edgedi agent` processes (one torch thread each) against a
private broker, started by `edgedi.agent.local_cluster` (the demo's launcher), and
send jobs one at a time through `edgedi.agent.client`, timing each round trip.

(a) Overhead, tiny models (`tiny` has no attention gate, `tiny-edgedi` one) at 200 px
    on 3 agents, for several strategies (per-job strategy override), once at full
    speed (no emulation: the runtime's floor) and once with every agent under a
    0.4-core CPU quota (what the demo's devices pay). Per job:
    overhead = client round trip - (slowest tile's compute per segment, summed
    + the leader's image preparation + the tail), from the JobResult's latency
    breakdown. `single` runs everything on the leader (no tile crosses the broker),
    so its overhead is the per-job cost (submit and result hops, bookkeeping); for
    the others, (overhead - that) / synchronisation rounds, where a round is a
    segment's scatter + gather or a gate's partials + combined value.
(b) vgg16-edgedi at 200 px, the same images on 1, 2, 3 and 4 agents with EQUAL
    quotas (0.3 of a core each), so the comparison is about parallelism alone;
    the strategy of the plan in force (edgeci) beside `equal` and `single`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgedi.agent.client import connect
from edgedi.agent.cluster_view import ClusterView
from edgedi.agent.local_cluster import Calibration, EmulationChoice, LocalCluster
from edgedi.agent.planning import profile_from_birth
from edgedi.broker.messages import JobResult
from edgedi.models.data import iter_images
from edgedi.models.specs import get_spec
from edgedi.planner.strategies import get_strategy

SIZE = 200
OVERHEAD_STRATEGIES = ("single", "equal", "proportional", "edgeci", "modnn", "deepthings")
SCALING_STRATEGIES = (None, "equal", "single")  # None: the plan in force (edgeci)
EQUAL_QUOTA = 0.3


@dataclass
class Sample:
    seconds: float
    result: JobResult

    @property
    def breakdown(self) -> dict[str, float]:
        return dict(self.result.latency_ms)

    @property
    def compute_ms(self) -> float:
        stages = self.result.latency_ms
        return sum(stages.get(stage, 0.0) for stage in ("worker_compute", "prepare", "tail"))

    @property
    def overhead_ms(self) -> float:
        return self.seconds * 1000 - self.compute_ms

    @property
    def segments(self) -> int:
        return sum(1 for stage in self.result.latency_ms if stage.startswith("segment_"))


@dataclass
class Series:
    label: str
    samples: list[Sample] = field(default_factory=list)
    failures: int = 0

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else math.nan

    def p90(self, values: list[float]) -> float:
        if not values:
            return math.nan
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]

    @property
    def latency_ms(self) -> list[float]:
        return [sample.seconds * 1000 for sample in self.samples]


async def _measure(
    cluster: LocalCluster,
    model: str,
    strategies: tuple[str | None, ...],
    count: int,
    warm_up: int = 2,
) -> dict[str | None, Series]:
    images = [sample.image for sample in iter_images(2024, SIZE, count=count + warm_up)]
    series = {strategy: Series(strategy or "plan in force") for strategy in strategies}
    async with connect(cluster.host, cluster.port, root=cluster.root) as client:
        for position, image in enumerate(images):
            # Strategies take turns on each image, so load drift hits all alike.
            for strategy in strategies:
                started = time.perf_counter()
                result = await client.infer(image, model, strategy=strategy, timeout=60)
                elapsed = time.perf_counter() - started
                if position < warm_up:
                    continue
                if result.status != "ok":
                    series[strategy].failures += 1
                    print(f"  {model} {strategy}: error {result.error}", file=sys.stderr)
                    continue
                series[strategy].samples.append(Sample(elapsed, result))
    return series


def planned_megabytes(view: ClusterView, model: str, strategy: str | None) -> float:
    """Bytes the leader's plan moves per job, re-planned here from the same births."""
    births = [view.devices[device].birth for device in sorted(view.devices)]
    profiles = [profile_from_birth(birth) for birth in births if birth is not None]
    assert view.leader is not None
    plan = get_strategy(strategy or "edgeci").plan(
        get_spec(model, SIZE), profiles, epoch=1, leader=view.leader.device, plan_id="bench"
    )
    return plan.predicted_bytes / 1e6


def _gate_count(model: str) -> int:
    spec = get_spec(model, SIZE)
    return sum(1 for unit in spec.spatial_units for op in unit.ops if op.kind == "gate")


def _overhead_rows(
    setting: str, model: str, series: dict[str | None, Series], gates: int, view: ClusterView
) -> list[str]:
    rows = []
    single = series.get("single")
    per_job = (
        single.median([sample.overhead_ms for sample in single.samples])
        if single is not None
        else math.nan
    )
    for strategy, data in series.items():
        if not data.samples:
            rows.append(f"| {setting} | {model} | {strategy} | - | - | - | failed | | | | |")
            continue
        segments = statistics.median_low([sample.segments for sample in data.samples])
        devices = statistics.median_low([len(sample.result.devices) for sample in data.samples])
        overhead = data.median([sample.overhead_ms for sample in data.samples])
        rounds = segments + gates
        per_round = (overhead - per_job) / rounds if strategy != "single" and rounds else math.nan
        rows.append(
            f"| {setting} | {model} | {strategy} | {devices} | {segments} + {gates} | "
            f"{planned_megabytes(view, model, strategy):.2f} | "
            f"{data.median(data.latency_ms):.1f} | "
            f"{data.median([sample.compute_ms for sample in data.samples]):.1f} | "
            f"{overhead:.1f} | "
            + (f"{per_round:.2f}" if not math.isnan(per_round) else "(per job)")
            + f" | {data.failures} |"
        )
    return rows


def part_a(count: int) -> list[str]:
    rows = [
        "| emulation | model | strategy | devices | rounds (segments + gates) | MB moved "
        "| round trip ms | compute ms | overhead ms | overhead per round ms | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    settings: list[tuple[str, EmulationChoice, tuple[float, ...]]] = [
        ("none (full speed)", "none", (1.0, 1.0, 1.0)),
        ("quota 0.4 core each", "quota", (0.4, 0.4, 0.4)),
    ]
    for setting, emulation, speeds in settings:
        with LocalCluster(
            3,
            speeds=speeds,
            model="tiny-edgedi",
            models=("tiny-edgedi", "tiny"),
            input_size=SIZE,
            emulation=emulation,
        ) as cluster:
            view = cluster.wait_ready_sync(120)
            for model in ("tiny", "tiny-edgedi"):
                print(f"(a) {setting}: {model}", file=sys.stderr)
                series = asyncio.run(_measure(cluster, model, OVERHEAD_STRATEGIES, count))
                rows += _overhead_rows(setting, model, series, _gate_count(model), view)
    return rows


def part_b(count: int, sizes: tuple[int, ...]) -> tuple[list[str], str]:
    header = [
        "| agents | strategy | MB moved | median ms | p90 ms | speedup vs 1 agent "
        "| vs single, same cluster | ideal | slowest tiles ms | scatter ms | gate rounds ms "
        "| failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: list[str] = []
    calibration: Calibration | None = None
    baseline: float | None = None
    notes = ""
    for agents in sizes:
        print(f"(b) {agents} agent(s)", file=sys.stderr)
        with LocalCluster(
            agents,
            speeds=(EQUAL_QUOTA,) * agents,
            model="vgg16-edgedi",
            input_size=SIZE,
            emulation="quota",
            calibration=calibration,
        ) as cluster:
            view = cluster.wait_ready_sync(180)
            calibration = cluster.calibration
            assert cluster.emulation is not None
            if not notes and cluster.calibration is not None:
                notes = cluster.calibration.describe("vgg16-edgedi")
            strategies = SCALING_STRATEGIES if agents > 1 else (None, "single")
            series = asyncio.run(_measure(cluster, "vgg16-edgedi", strategies, count))
            alone = series["single"]
            alone_median = alone.median(alone.latency_ms)
            for strategy, data in series.items():
                median = data.median(data.latency_ms)
                if agents == 1 and strategy is None:
                    baseline = median
                speedup = baseline / median if baseline and data.samples else math.nan
                within = alone_median / median if data.samples else math.nan

                def stage(name: str, data: Series = data) -> float:
                    values = [s.breakdown.get(name, 0.0) for s in data.samples]
                    return data.median(values)

                label = "edgeci (plan in force)" if strategy is None else strategy
                measured = cluster.emulation.measured
                speeds = "" if measured is None else f" ({'/'.join(f'{v:.2f}' for v in measured)})"
                rows.append(
                    f"| {agents}{speeds if strategy is None else ''} | {label} | "
                    f"{planned_megabytes(view, 'vgg16-edgedi', strategy):.2f} | {median:.1f} | "
                    f"{data.p90(data.latency_ms):.1f} | {speedup:.2f}x | {within:.2f}x | "
                    f"{agents if strategy != 'single' else 1}x | {stage('worker_compute'):.1f} | "
                    f"{stage('scatter'):.1f} | {stage('reductions'):.1f} | {data.failures} |"
                )
    return header + rows, notes


def machine_info() -> list[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from edgedi.broker.server import find_mosquitto

    broker = "Mosquitto" if find_mosquitto() else "embedded amqtt"
    return [
        f"- {cpu}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, broker: {broker} "
        "on loopback",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/runtime_latency.md"))
    parser.add_argument("--quick", action="store_true", help="fewer jobs (a smoke run)")
    args = parser.parse_args(argv)
    count_a, count_b = (5, 3) if args.quick else (20, 10)
    started = time.monotonic()
    overhead = part_a(count_a)
    scaling, calibration = part_b(count_b, (1, 2, 3, 4))
    elapsed = time.monotonic() - started
    command = "python bench/runtime_latency.py" + (" --quick" if args.quick else "")
    lines = [
        "# Runtime latency on loopback",
        "",
        f"Made by `.venv/bin/{command}` on {time.strftime('%Y-%m-%d')} in {elapsed:.0f} s:",
        "",
        *machine_info(),
        "",
        "Real `edgedi agent` processes (one torch thread each) and a private broker, started",
        "by `edgedi.agent.local_cluster`; jobs one at a time through `edgedi.agent.client`;",
        "times are client round trips (submit to result), medians over "
        f"{count_a} (a) and {count_b} (b) jobs after 2 warm-up jobs, strategies taking turns "
        "image by image. The machine is shared and noisy: read differences under ~10 % as noise.",
        "",
        "## (a) The runtime's overhead per job and per synchronisation round",
        "",
        f"3 agents, {SIZE} px images. compute = slowest tile per segment (summed) + the leader's",
        "image preparation + the tail, from the JobResult's latency breakdown; overhead =",
        "round trip - compute. `single` keeps every step on the leader, so its overhead is",
        "the per-job cost; the others' per-round figure is (overhead - that) / rounds, so",
        "it includes moving the round's data: MB moved is the plan's predicted bytes per job",
        "(re-planned here by the same planner from the agents' births).",
        "",
        *overhead,
        "",
        "## (b) vgg16-edgedi end to end on 1-4 agents with equal speeds",
        "",
        f"Every agent under a {EQUAL_QUOTA}-core CPU quota (measured speeds in brackets, in",
        f"cores); {SIZE} px; one calibrated profile for all ({calibration}). Speedup: the",
        "1-agent median over this row's median, and (steadier on a shared machine, whose",
        "load drifts between clusters) the median of `single` in the same cluster, same",
        "images, over this row's median; ideal: the number of agents (`single`: 1).",
        "",
        *scaling,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
