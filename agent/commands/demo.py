"""`edgedi demo`: the main job, on this machine alone.

A private MQTT broker and N `edgedi agent` processes of different speeds
(`edgedi.agent.local_cluster`: CPU quotas when possible, else `--slowdown`), then a
stream of synthetic steel-defect images through the runtime, each result printed as
it arrives, and a summary with the measured speedup over one device.

The speedup is measured, not predicted: every image runs twice through the same
runtime, one job at a time, once with the plan in force (all devices) and once with
the `single` strategy (the fastest device alone, a per-job strategy override), in
alternating order so drift in the machine's load hits both alike. The summary also
says what the speedup would ideally be for the emulated speeds, how the speeds were
emulated, and whether the model's weights are trained (then the stream's accuracy is
reported) or random (predictions are meaningless, and the summary says so).

With `--broker` (or a broker address from `EDGEDI_BROKER__*` or `--config`: the
connection options every command takes, `edgedi.agent.connection`) the agents and
the stream run on that existing broker instead, in a cluster of their own
(`demo-...` unless `--cluster` names one); its account and TLS settings go to every
agent, so the broker must let that one account act as every demo device.

Exit status: 0 when every job got an ok result; 1 when any failed or timed out, or
the cluster did not start; 2 for bad arguments; 130 on Ctrl-C (the cluster is always
stopped and its cgroups removed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgedi.agent.connection import add_connection_arguments

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import numpy as np
    import numpy.typing as npt

    from edgedi.agent.client import InferenceClient
    from edgedi.agent.config import BrokerSettings
    from edgedi.agent.local_cluster import LocalCluster
    from edgedi.broker.messages import JobResult
    from edgedi.broker.plan import Plan

# Images of a seed the shipped checkpoint never saw (it trained on seed 0 and was
# checked on seed 1), so the reported accuracy is on unseen images.
DEFAULT_SEED = 1000
# Breakdown stages shown in the summary, in pipeline order, with readable names.
_STAGES = (
    ("scatter", "scatter"),
    ("compute", "compute"),
    ("worker_compute", "of which slowest tiles"),
    ("reductions", "gate rounds"),
    ("gather", "gather"),
    ("tail", "tail"),
    ("total", "total on the leader"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument(
        "--devices", type=int, default=4, metavar="N", help="local agents (default 4)"
    )
    parser.add_argument(
        "--images", type=int, default=24, metavar="K", help="images to stream (default 24)"
    )
    parser.add_argument("--model", default="vgg16-edgedi", help="zoo model (default vgg16-edgedi)")
    parser.add_argument(
        "--strategy", help="partitioning strategy of the plan (default: the agents' auto)"
    )
    parser.add_argument(
        "--size", type=int, default=200, metavar="PX", help="image side length (default 200)"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"image stream seed (default {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--emulation",
        choices=("auto", "quota", "paced", "slowdown", "none"),
        default="auto",
        help="how device speeds are made: cgroup CPU quotas when possible (auto); paced "
        "(each compute step takes its CPU time / speed, event loops under quotas); "
        "--slowdown sleeps relative to the fastest; or none",
    )
    parser.add_argument(
        "--link",
        choices=("loopback", "100mbit", "1gbit"),
        default="loopback",
        help="links between the devices: loopback, or emulated Ethernet shaped with tc "
        "(network namespaces; needs root, else loopback)",
    )
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the one-device runs (no measured speedup)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="per job (default 60)"
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="for the cluster to start (default 180)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the agents' logs (the folder is printed)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the run's figures on stdout at the end (the "
        "progress and the human summary go to stderr)",
    )
    parser.add_argument(
        "--gantt",
        type=Path,
        metavar="PNG",
        help="write the traced job's timeline, measured above predicted, to this PNG file",
    )


@dataclass
class _Run:
    """One job's outcome as the client saw it."""

    result: JobResult | None
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.status == "ok"


@dataclass
class _Image:
    name: str
    label: int
    image: npt.NDArray[np.uint8]
    distributed: _Run | None = None
    single: _Run | None = None


@dataclass
class _Weights:
    trained: bool
    description: str
    accuracy: float | None = None
    data_seeds: set[int] = field(default_factory=set)


def warm_up_jobs_for_auto() -> int:
    """The leader measures its best candidates (`auto.EXPLORED` and the best one-device
    plan) on `MEASURED_JOBS` jobs each, then keeps the fastest: one more than that."""
    from edgedi.agent.planning import MEASURED_JOBS
    from edgedi.planner.strategies.auto import EXPLORED

    return MEASURED_JOBS * (EXPLORED + 1) + 1


async def settle(
    run: Callable[[], Awaitable[JobResult | None]], minimum: int, cap: int | None = None
) -> list[JobResult | None]:
    """Warm-up jobs until the leader has settled on a plan (strategy `auto`).

    At least `minimum` jobs; then more until the last `2 × MEASURED_JOBS + 1` ran one
    plan, at most `cap` (default 4 × `minimum`: a deep model's exploration, two or
    three rounds of 10-15 jobs with a judged group after each, took 30-45 jobs in
    session 9). The leader re-plans after each group of jobs it measures: the plan it
    keeps is judged again on its first group, and a re-plan then (a fit, when it
    measured off its prediction) starts another round of candidates measured side by
    side; devices that join late restart its exploration.
    """
    from edgedi.agent.planning import MEASURED_JOBS

    cap = 4 * minimum if cap is None else cap
    steady = 2 * MEASURED_JOBS + 1
    results: list[JobResult | None] = []
    while len(results) < cap:
        results.append(await run())
        if len(results) < minimum:
            continue
        recent = results[-steady:]
        plans = {result.plan_id if result is not None else None for result in recent}
        if len(recent) == steady and len(plans) == 1 and None not in plans:
            break
    return results


_HUMAN = sys.stdout
"""Where the human-readable lines go: stderr when --json owns stdout."""


def _say(*lines: str) -> None:
    for line in lines:
        print(line, file=_HUMAN)
    _HUMAN.flush()


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the demo like Ctrl-C: through the `finally` that stops the cluster.

    Delivered as SIGINT when that is handled, so that inside `asyncio.run` the loop's
    own SIGINT handler cancels the running task cleanly (a KeyboardInterrupt raised
    at a random point of the loop can leave the MQTT client waiting out its timeouts).
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)


def run(args: argparse.Namespace) -> int:
    from edgedi.models.specs import MODEL_NAMES, get_spec

    if args.model not in MODEL_NAMES:
        print(f"unknown model {args.model!r}; known: {', '.join(MODEL_NAMES)}", file=sys.stderr)
        return 2
    if args.devices < 1 or args.images < 1:
        print("--devices and --images must be at least 1", file=sys.stderr)
        return 2
    try:
        get_spec(args.model, args.size)
    except ValueError as error:
        print(f"--size {args.size}: {error}", file=sys.stderr)
        return 2
    if args.strategy is not None:
        from edgedi.planner.strategies import strategy_names

        if args.strategy not in strategy_names():
            known = ", ".join(strategy_names())
            print(f"unknown strategy {args.strategy!r}; known: {known}", file=sys.stderr)
            return 2
    global _HUMAN
    _HUMAN = sys.stderr if args.json else sys.stdout
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _demo(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load_weights(model: str, size: int) -> tuple[Any, _Weights]:
    from edgedi.models.checkpoints import load_model, read_sidecar, shipped_checkpoint

    network, description = load_model(model, size, "auto")
    path = shipped_checkpoint(model)
    if path is None:
        return network, _Weights(False, description)
    record = read_sidecar(path) or {}
    accuracy = record.get("accuracy")
    seeds = set()
    for section in (record.get("data"), (record.get("unseen") or {}).get("data")):
        if isinstance(section, dict) and isinstance(section.get("seed"), int):
            seeds.add(section["seed"])
    return network, _Weights(
        True, description, accuracy if isinstance(accuracy, float) else None, seeds
    )


def _existing_broker(args: argparse.Namespace) -> tuple[bool, BrokerSettings] | None:
    """(whether to use an existing broker, its settings) from the connection options;
    None (after saying why) when they are invalid.

    Without a broker address (flag, environment or file) the demo starts its own.
    On an existing broker the cluster is a fresh `demo-...` one unless named, so the
    demo's agents never join a fleet's cluster."""
    from edgedi.agent.config import ConfigError
    from edgedi.agent.connection import load_from_arguments

    try:
        broker = load_from_arguments(args)
    except ConfigError as error:
        for line in error.lines:
            print(line, file=sys.stderr)
        return None
    given = broker.model_fields_set
    if not given & {"host", "port"}:
        return False, broker
    if "cluster" not in given:
        broker = broker.model_copy(update={"cluster": f"demo-{uuid.uuid4().hex[:8]}"})
    return True, broker


def _demo(args: argparse.Namespace) -> int:
    from edgedi.agent.connection import describe
    from edgedi.agent.local_cluster import ClusterError, LocalCluster
    from edgedi.models.checkpoints import CheckpointError

    started = time.monotonic()
    _say(
        f"edgedi demo: {args.model} at {args.size}x{args.size} px on {args.devices} local device(s)"
    )
    try:
        network, weights = _load_weights(args.model, args.size)
    except CheckpointError as error:
        print(f"cannot load {args.model}: {error}", file=sys.stderr)
        return 2
    if weights.trained:
        _say(f"weights: TRAINED checkpoint: {weights.description}")
        if args.seed in weights.data_seeds:
            _say(f"  note: image seed {args.seed} was used to train or test this checkpoint")
    else:
        _say(
            f"weights: RANDOM (no trained checkpoint for {args.model}): predictions are "
            "meaningless and no accuracy is reported; latency and speedup are still real"
        )
    existing = _existing_broker(args)
    if existing is None:
        return 2
    cluster = LocalCluster(
        args.devices,
        model=args.model,
        input_size=args.size,
        strategy=args.strategy,
        emulation=args.emulation,
        link=args.link,
        cluster=existing[1].cluster,
        topic_prefix=existing[1].topic_root,
        connection=existing[1] if existing[0] else None,
    )
    failed = True
    try:
        _say("measuring one core of this machine, then starting the broker and the agents ...")
        try:
            cluster.start()
            assert cluster.emulation is not None and cluster.links is not None
            _say(f"devices: {cluster.emulation.describe()}")
            _say(f"links: {cluster.links.describe()}")
            if cluster.calibration is not None:
                _say(f"profile: {cluster.calibration.describe(args.model)}")
            kind = cluster.broker.kind if cluster.broker is not None else "existing broker"
            settings = cluster.connection_settings()
            _say(
                f"broker: {kind} on {describe(settings)} ({cluster.links.label}); watch it live "
                f"with: edgedi watch --broker {cluster.broker_address}"
                + (f" --cluster {settings.cluster}" if settings.cluster != "default" else "")
            )
            view = asyncio.run(cluster.wait_ready(args.ready_timeout))
        except ClusterError as error:
            print(f"the local cluster did not start: {error}", file=sys.stderr)
            return 1
        assert view.leader is not None and view.plan is not None
        _say(
            f"cluster ready after {time.monotonic() - started:.1f} s: leader "
            f"{view.leader.device} (epoch {view.leader.epoch})"
        )
        code = asyncio.run(_stream(args, cluster, view.plan.plan, network, weights))
        failed = code != 0
        return code
    except KeyboardInterrupt:
        failed = False  # asked to stop: nothing to investigate
        print("\ninterrupted: stopping the local cluster", file=sys.stderr)
        raise
    finally:
        keep = args.keep_logs or failed
        cluster.stop(keep_logs=keep)
        if keep and cluster.agents:
            _say(f"agent logs kept in {cluster.log_dir}")


async def _timed(
    client: InferenceClient, item: _Image, model: str, strategy: str | None, limit_s: float
) -> _Run:
    from edgedi.agent.client import JobTimeout

    started = time.perf_counter()
    try:
        result = await client.infer(item.image, model, strategy=strategy, timeout=limit_s)
    except JobTimeout as error:
        return _Run(None, time.perf_counter() - started, str(error))
    run = _Run(result, time.perf_counter() - started)
    if result.status != "ok":
        run.error = result.error
    return run


async def _traced_job(
    client: InferenceClient, item: _Image, model: str, limit_s: float, strategy: str | None = None
) -> JobResult | None:
    from edgedi.agent.client import JobTimeout

    try:
        result = await client.infer(
            item.image, model, strategy=strategy, timeout=limit_s, trace=True
        )
    except JobTimeout:
        return None
    return result if result.status == "ok" and result.trace else None


def _factors_summary(
    cluster: LocalCluster, distributed: JobResult, single: JobResult
) -> tuple[list[str], dict[str, float] | None]:
    """The traced job's speedup over a traced `single` job, taken apart into factors."""
    from edgedi.agent.speedup_factors import speedup_factors

    assert cluster.emulation is not None
    speeds = dict(zip(cluster.device_ids, cluster.emulation.effective, strict=True))
    try:
        factors = speedup_factors(
            distributed.trace,
            distributed.latency_ms.get("total", 0.0),
            single.trace,
            single.latency_ms.get("total", 0.0),
            speeds,
        )
    except ValueError as error:
        return [f"  (no speedup factors for the traced jobs: {error})"], None
    return [
        f"  why not the ideal, from this job and one traced job of single "
        f"({factors.single_ms:.0f} ms): ideal {factors.ideal:.2f}x",
        f"    x {factors.work_ratio:.2f} work: the plan computed "
        f"{factors.distributed_work_ms:.0f} ms of one-core work, one device "
        f"{factors.single_work_ms:.0f} ms (halo rows computed twice, small tiles, caches "
        "shared by devices computing at once)",
        f"    x {factors.distributed_busy:.0%} busy: the devices computed that share of what "
        "they could have in the job's time (the rest waiting for rows, gates, tasks, the tail)",
        f"    / {factors.single_busy:.0%} busy: the one device's share of its job",
        f"    = {factors.speedup:.2f}x for these two jobs",
        *(
            [
                "    (under CPU quotas a step shorter than a period can run at a whole core's "
                "pace, so the work of short steps is under-counted and their share busy with "
                "it; --emulation paced times every step as the device's speed makes it)"
            ]
            if cluster.emulation.method.startswith("cgroup")
            else []
        ),
    ], factors.as_dict()


def _sync_summary(traced: JobResult) -> tuple[list[str], dict[str, Any] | None]:
    """What the traced job's synchronisation points cost beyond computing."""
    from edgedi.agent.sync_costs import sync_costs

    costs = sync_costs(traced.trace)
    if costs.boundary_ms is None and costs.exchange_ms is None:
        return [], None
    parts = []
    if costs.boundary_ms is not None:
        parts.append(
            f"{len(costs.boundaries_ms)} segment boundaries at a median {costs.boundary_ms:.1f} ms"
        )
    if costs.exchange_ms is not None:
        parts.append(
            f"{len(costs.exchanges_ms)} exchanges within segments (gates, channel units) "
            f"at {costs.exchange_ms:.1f} ms"
        )
    return [
        f"  synchronisation on the critical path: {'; '.join(parts)}, each beyond the longest "
        "computing of its step (rows, partials and results on their way, the devices' "
        "imbalance; below 0 where interiors overlapped it)",
    ], {
        "boundaries_ms": list(costs.boundaries_ms),
        "exchanges_ms": list(costs.exchanges_ms),
        "boundary_ms": costs.boundary_ms,
        "exchange_ms": costs.exchange_ms,
    }


def _trace_summary(result: JobResult) -> tuple[list[str], dict[str, Any]]:
    """A traced job's chart and per-device times, for the person and for `--json`."""
    from edgedi.agent.trace_chart import LEGEND, device_times, render_trace

    total = result.latency_ms.get("total", 0.0)
    times = device_times(result.trace)
    lines = [
        "",
        f"one more job, traced ({result.strategy}, {total:.1f} ms on the leader; each "
        "device's own clock):",
        *("  " + line for line in render_trace(result.trace)),
        f"  {LEGEND}",
        "  the leader's steps, ms: "
        + ", ".join(
            f"{step} {value:.1f}"
            for step, value in result.latency_ms.items()
            if step not in ("total", "predicted") and not step.startswith("segment_")
        ),
        "  per device: "
        + "; ".join(
            f"{t.device} computes {t.compute_ms:.0f} ms, idle {t.idle_ms:.0f} ms" for t in times
        ),
    ]
    figures = {
        "strategy": result.strategy,
        "total_ms": total,
        "predicted_ms": result.latency_ms.get("predicted"),
        "spans": [span.model_dump(mode="json") for span in result.trace],
        "predicted_spans": [span.model_dump(mode="json") for span in result.predicted_trace],
        "devices": {
            t.device: {"compute_ms": t.compute_ms, "idle_ms": t.idle_ms, "until_ms": t.until_ms}
            for t in times
        },
    }
    return lines, figures


async def _stream(
    args: argparse.Namespace, cluster: LocalCluster, plan: Plan, network: Any, weights: _Weights
) -> int:
    from edgedi.agent.client import connect_to
    from edgedi.agent.cluster_view import describe_plan
    from edgedi.agent.progress import ProgressBar
    from edgedi.models.data import CLASSES, iter_images

    _say("plan in force:", *("  " + line for line in describe_plan(plan)))
    baseline = cluster.fastest
    items = [
        _Image(sample.name, sample.label, sample.image)
        for sample in iter_images(args.seed, args.size, count=args.images)
    ]
    how = (
        ", each run twice, one job at a time: with the plan in force, and with strategy "
        f"single (the fastest device alone, {baseline} here) through the same runtime, "
        "in alternating order"
        if args.baseline
        else ", one job at a time, with the plan in force"
    )
    _say(f"stream: {len(items)} synthetic defect images (seed {args.seed}){how}")
    async with connect_to(cluster.connection_settings()) as client:
        # Jobs first that are not counted: the first run of a plan pays one-off costs
        # (allocations, planning), and the leader measures its best candidate plans on
        # its first jobs and settles on the fastest (`Planning.observe_job`), as it
        # does in service.
        warm = _Image("warm-up", 0, items[0].image)
        warm_runs: list[_Run] = []

        async def warm_up_job() -> JobResult | None:
            warm_runs.append(await _timed(client, warm, args.model, None, args.timeout))
            return warm_runs[-1].result

        if args.strategy in (None, "auto"):
            await settle(warm_up_job, warm_up_jobs_for_auto())
        else:
            for _ in range(warm_up_jobs_for_auto()):
                await warm_up_job()
        warm_up_jobs = len(warm_runs)
        if args.baseline:
            warm_runs.append(await _timed(client, warm, args.model, "single", args.timeout))
        for warm_run in warm_runs:
            if not warm_run.ok:
                _say(f"warm-up job failed: {warm_run.error}")
        _say(
            f"warm-up done ({warm_up_jobs} jobs with the plan in force, 1 with single; not "
            "counted: the leader measures its best plans on them, fits its message costs "
            "and keeps the fastest, until the last jobs all ran one plan)"
        )
        width = max(len(item.name) for item in items)
        class_width = max(len(name) for name in CLASSES)
        with ProgressBar(len(items), label="images", stream=_HUMAN) as bar:
            for position, item in enumerate(items):
                order: list[str | None] = [None, "single"] if args.baseline else [None]
                if position % 2:
                    order.reverse()
                for strategy in order:
                    outcome = await _timed(client, item, args.model, strategy, args.timeout)
                    if strategy is None:
                        item.distributed = outcome
                    else:
                        item.single = outcome
                bar.write(_result_line(position, len(items), item, width, class_width, weights))
                bar.advance()
        announcement = await client.current_plan()
        final = announcement.plan if announcement is not None else plan
        # One more job, not counted, with its timeline: where the time of a job goes;
        # and one of `single`, to say why the first is not the ideal speedup faster.
        traced = await _traced_job(client, items[0], args.model, args.timeout)
        traced_single = (
            await _traced_job(client, items[0], args.model, args.timeout, "single")
            if args.baseline and traced is not None
            else None
        )
    reference = await asyncio.to_thread(_reference_probabilities, network, items)
    lines, figures = _summary(args, cluster, items, weights, reference, final)
    for line in lines:
        _say(line)
    if traced is not None:
        trace_lines, figures["trace"] = _trace_summary(traced)
        sync_lines, figures["sync"] = _sync_summary(traced)
        if traced_single is not None:
            factor_lines, figures["factors"] = _factors_summary(cluster, traced, traced_single)
            trace_lines += factor_lines
        trace_lines += sync_lines
        for line in trace_lines:
            _say(line)
        if args.gantt is not None:
            from edgedi.agent.trace_chart import render_comparison

            title = f"{args.model}, {traced.strategy}"
            image = render_comparison(traced.trace, traced.predicted_trace, title)
            args.gantt.parent.mkdir(parents=True, exist_ok=True)
            image.save(args.gantt)
            _say(f"  the timeline, measured above predicted: {args.gantt}")
    if args.json:
        print(json.dumps(figures, sort_keys=True))
        sys.stdout.flush()
    runs = [run for item in items for run in (item.distributed, item.single) if run is not None]
    failures = sum(1 for run in runs if not run.ok) + sum(1 for run in warm_runs if not run.ok)
    return 1 if failures else 0


def _class_name(label: int | None) -> str:
    from edgedi.models.data import CLASSES

    if label is None:
        return "?"
    return CLASSES[label] if 0 <= label < len(CLASSES) else f"class {label}"


def _devices(devices: tuple[str, ...]) -> str:
    return ",".join(devices)


def _result_line(
    position: int, total: int, item: _Image, width: int, class_width: int, weights: _Weights
) -> str:
    counter = f"[{position + 1:>{len(str(total))}}/{total}]"
    head = f"{counter} {item.name:<{width}}  true {_class_name(item.label):<{class_width}}"
    run = item.distributed
    if run is None or not run.ok or run.result is None:
        error = run.error if run is not None else "not run"
        text = f"{head}  ERROR: {error}"
    else:
        result = run.result
        label = result.label
        confidence = (
            result.probabilities[label] if label is not None and result.probabilities else math.nan
        )
        verdict = ""
        if weights.trained:
            verdict = "  ok  " if label == item.label else "  MISS"
        text = (
            f"{head}  predicted {_class_name(label):<{class_width}} p={confidence:.2f}{verdict}"
            f"  {run.seconds * 1000:7.1f} ms on {_devices(result.devices)}"
        )
    single = item.single
    if single is not None:
        if single.ok and single.result is not None:
            text += (
                f"  | single {single.seconds * 1000:7.1f} ms on {_devices(single.result.devices)}"
            )
        else:
            text += f"  | single ERROR: {single.error}"
    return text


def _reference_probabilities(network: Any, items: list[_Image]) -> list[npt.NDArray[np.float64]]:
    """The same model in this one process (a plain forward pass), for the exactness line."""
    import numpy as np
    import torch

    from edgedi.models.training import normalize

    outputs = []
    with torch.inference_mode():
        for item in items:
            logits = network(normalize(np.asarray(item.image)[None])).double()
            outputs.append(torch.softmax(logits, dim=1).numpy().reshape(-1))
    return outputs


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = fraction * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _latency_row(name: str, runs: list[_Run], width: int) -> str:
    values = [run.seconds * 1000 for run in runs if run.ok]
    if not values:
        return f"    {name:<{width}}  (no successful job)"
    return (
        f"    {name:<{width}}  {statistics.median(values):8.1f} {_percentile(values, 0.9):8.1f} "
        f"{statistics.fmean(values):8.1f}"
    )


def _median_ms(runs: list[_Run]) -> float | None:
    values = [run.seconds * 1000.0 for run in runs if run.ok]
    return statistics.median(values) if values else None


def _spread(runs: list[_Run]) -> float | None:
    """Interquartile range / median of the successful runs: how noisy they were."""
    values = sorted(run.seconds for run in runs if run.ok)
    if len(values) < 4:
        return None
    quartiles = statistics.quantiles(values, n=4)
    return (quartiles[2] - quartiles[0]) / statistics.median(values)


def _summary(
    args: argparse.Namespace,
    cluster: LocalCluster,
    items: list[_Image],
    weights: _Weights,
    reference: list[npt.NDArray[np.float64]],
    final: Plan,
) -> tuple[list[str], dict[str, Any]]:
    """The summary's lines, and the same figures for `--json`."""
    import numpy as np

    emulation = cluster.emulation
    assert emulation is not None and cluster.links is not None
    distributed = [item.distributed for item in items if item.distributed is not None]
    single = [item.single for item in items if item.single is not None]
    runs = distributed + single
    failed = sum(1 for run in runs if not run.ok)
    name_width = 44
    lines = [
        "",
        f"summary: {len(runs) - failed}/{len(runs)} jobs ok"
        + (f", {failed} FAILED or timed out" if failed else ""),
        f"  {'latency per image, ms (client round trip)':<{name_width + 2}}"
        f"{'median':>8} {'p90':>8} {'mean':>8}",
    ]
    lines.append(
        _latency_row(
            f"distributed ({args.devices} devices, plan in force)", distributed, name_width
        )
    )
    if single:
        lines.append(_latency_row(f"one device ({_single_devices(single)})", single, name_width))
    ok_distributed = [run.seconds for run in distributed if run.ok]
    ok_single = [run.seconds for run in single if run.ok]
    speeds = "+".join(f"{speed:.2f}" for speed in emulation.effective)
    speedup = None
    if ok_distributed and ok_single:
        speedup = statistics.median(ok_single) / statistics.median(ok_distributed)
        lines.append(
            f"  measured speedup over one device: {speedup:.2f}x (median one-device latency / "
            "median distributed latency, same images, same run, this machine)"
        )
    # The plan in force at the end, against the jobs that ran with it.
    with_final = [
        run for run in distributed if run.ok and run.result and run.result.plan_id == final.plan_id
    ]
    measured_final = _median_ms(with_final)
    predicted_ms = final.predicted_latency_s * 1000.0
    error = None
    if measured_final is not None:
        error = predicted_ms / measured_final - 1.0
        lines.append(
            f"  plan in force at the end ({final.strategy}, {len(final.devices_used)} of "
            f"{len(final.devices)} devices): predicted {predicted_ms:.1f} ms, measured median "
            f"{measured_final:.1f} ms over its {len(with_final)} jobs "
            f"(prediction {error:+.0%})"
        )
    lines.append(
        f"  ideal speedup for these speeds: {emulation.ideal_speedup:.2f}x "
        f"(({speeds}) / {max(emulation.effective):.2f}: perfect balance, free transfers)"
    )
    if ok_distributed:
        throughput = len(ok_distributed) / sum(ok_distributed)
        text = f"  throughput, one image at a time: {throughput:.2f} images/s distributed"
        if ok_single:
            text += f", {len(ok_single) / sum(ok_single):.2f} images/s on one device"
        lines.append(text)
    breakdown = _breakdown(distributed)
    if breakdown:
        lines.append(f"  where a distributed job's time goes (median ms): {breakdown}")
    results = [
        (item, item.distributed.result)
        for item in items
        if item.distributed is not None and item.distributed.ok and item.distributed.result
    ]
    if weights.trained and results:
        correct = sum(1 for item, result in results if result.label == item.label)
        known = f"; checkpoint's test accuracy {weights.accuracy:.1%}" if weights.accuracy else ""
        lines.append(
            f"  accuracy on the stream: {correct}/{len(results)} = {correct / len(results):.1%} "
            f"(trained checkpoint, unseen synthetic images{known})"
        )
    elif not weights.trained:
        lines.append("  accuracy: not reported (random weights: the predictions mean nothing)")
    if results:
        by_name = {
            item.name: probabilities for item, probabilities in zip(items, reference, strict=True)
        }
        differences = [
            float(np.max(np.abs(np.asarray(result.probabilities) - by_name[item.name])))
            for item, result in results
        ]
        worst = max(differences)
        verdict = "identical" if worst <= 1e-5 else "DIFFERENT (above 1e-5)"
        lines.append(
            f"  exactness: distributed probabilities vs one plain forward pass in one process: "
            f"max |difference| {worst:.1e} over {len(results)} images: {verdict}"
        )
    caveat = {
        "cgroup-v1": "each device's compute thread and its event loop have quota groups of "
        "its speed (the loop's CPU use is small; the loop is not stalled by the compute's "
        "quota), and a quota still stalls a busy thread for a few ms per 5 ms period, which "
        "a really slow device does not do",
        "cgroup-v2": "CPU quotas add throttling stalls (a few ms per 5 ms period) that a "
        "really slow device does not have",
        "paced": "each compute step runs at this machine's full speed and then waits "
        "until its CPU time / speed has passed (a step that waited for a core because "
        "others computed at once loses nothing while the wait fits in that time), so no "
        "quota stalls; "
        + (
            "the event loops are under quotas of the same speeds"
            if emulation.loops_under_quotas
            else "the event loops are not throttled"
        ),
        "slowdown": f"the agents share this machine's {emulation.cores} cores and only their "
        "compute steps are slowed (message handling runs at full speed)",
        "none": f"the agents share this machine's {emulation.cores} cores at full speed",
    }[emulation.method]
    lines.append(
        f"  honesty: the devices are processes on this one machine ({emulation.method}); "
        f"{cluster.links.caveat}; {caveat}"
    )
    spread_distributed, spread_single = _spread(distributed), _spread(single)
    if spread_distributed is not None:
        noise = f"  noise: interquartile range / median {spread_distributed:.0%} distributed"
        if spread_single is not None:
            noise += f", {spread_single:.0%} one device"
        lines.append(noise)
    figures: dict[str, Any] = {
        "model": args.model,
        "size": args.size,
        "devices": args.devices,
        "speeds": list(emulation.effective),
        "emulation": emulation.method,
        "link": cluster.links.name,
        "link_measured_mbit": cluster.links.measured_mbit,
        "images": len(items),
        "jobs_ok": len(runs) - failed,
        "jobs_failed": failed,
        "strategy": final.strategy,
        "devices_used": list(final.devices_used),
        "ideal_speedup": emulation.ideal_speedup,
        "measured_speedup": speedup,
        "median_ms": {"distributed": _median_ms(distributed), "single": _median_ms(single)},
        "p90_ms": {
            "distributed": _percentile(ok_distributed, 0.9) * 1000 if ok_distributed else None,
            "single": _percentile(ok_single, 0.9) * 1000 if ok_single else None,
        },
        "spread": {"distributed": spread_distributed, "single": spread_single},
        "predicted_ms": predicted_ms,
        "measured_ms_with_final_plan": measured_final,
        "prediction_error": error,
        "accuracy": None,
        "max_abs_difference": None,
    }
    if weights.trained and results:
        figures["accuracy"] = sum(1 for i, r in results if r.label == i.label) / len(results)
    if results:
        figures["max_abs_difference"] = worst
    return lines, figures


def _single_devices(runs: list[_Run]) -> str:
    """Which device the `single` jobs ran on (the planner picks it, not the demo)."""
    used = Counter(run.result.devices for run in runs if run.ok and run.result is not None)
    if not used:
        return "strategy single"
    devices = used.most_common(1)[0][0]
    if len(devices) == 1:
        return f"{devices[0]}, strategy single"
    return f"strategy single on {'+'.join(devices)}: one computes, the leader runs the tail"


def _breakdown(runs: list[_Run]) -> str:
    stages: dict[str, list[float]] = {}
    for run in runs:
        if run.ok and run.result is not None:
            for stage, value in run.result.latency_ms.items():
                stages.setdefault(stage, []).append(value)
    parts = [
        f"{label} {statistics.median(stages[stage]):.1f}"
        for stage, label in _STAGES
        if stage in stages
    ]
    return ", ".join(parts)
