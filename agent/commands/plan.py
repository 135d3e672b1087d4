"""`edgedi plan`: plan a model on a cluster with one or more strategies and compare them.

    edgedi plan --cluster pi-mixed --model vgg16
    edgedi plan --cluster my-cluster.yaml --model resnet34 --strategy edgeci edgedi
    edgedi plan --cluster synthetic:64 --model vgg16 --json
    edgedi plan --cluster pi4x4 --model resnet18 --gantt timeline.png

`--cluster` takes a YAML file, the name of a shipped example (pi-mixed, pi4x4,
pi5-wifi) or `synthetic:N[:SEED]` for a generated fleet of N devices. The table shows
each strategy's predicted latency, its speedup over `single`, its throughput, the bytes
it moves through the broker and its segments; `--json` prints one object per strategy.
`--gantt` draws the simulated timeline of the first strategy given (edgeci by default).
`--validate` only checks the cluster file and prints `field.path: message` lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from edgedi.models.specs import DEFAULT_INPUT_SIZE, MODEL_NAMES, UnknownModelError, get_spec
from edgedi.planner.cluster import (
    Cluster,
    parse_cluster,
    shipped_cluster_names,
    shipped_cluster_path,
    synthetic_cluster,
)
from edgedi.planner.errors import ClusterConfigError, PlannerError
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.strategies import DEFAULT_STRATEGY, get_strategy, strategy_names

MEGABYTE = 1e6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster",
        required=True,
        help="cluster YAML file, a shipped name "
        f"({', '.join(shipped_cluster_names())}) or synthetic:N[:SEED]",
    )
    parser.add_argument("--model", help=f"model to plan ({', '.join(MODEL_NAMES)})")
    parser.add_argument(
        "--strategy",
        action="extend",
        nargs="+",
        dest="strategies",
        metavar="S",
        help=f"strategy (repeatable; default: all of {', '.join(strategy_names())})",
    )
    parser.add_argument("--leader", help="coordinating device (default: the cluster's)")
    parser.add_argument(
        "--size",
        type=int,
        default=DEFAULT_INPUT_SIZE,
        help=f"input side in pixels (default {DEFAULT_INPUT_SIZE})",
    )
    parser.add_argument("--epoch", type=int, default=0, help="epoch stamped on the plans")
    parser.add_argument(
        "--tail-on-leader", action="store_true", help="always finish (pooling + head) on the leader"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--with-plans", action="store_true", help="with --json: include each full plan"
    )
    parser.add_argument(
        "--gantt",
        type=Path,
        metavar="OUT.png",
        help="draw the simulated timeline of the first strategy",
    )
    parser.add_argument(
        "--validate", action="store_true", help="only validate the cluster description"
    )


def load_cluster(text: str) -> Cluster:
    """A cluster from a file path, a shipped name or `synthetic:N[:SEED]`."""
    if text.startswith("synthetic:"):
        fields = text.split(":")
        try:
            devices = int(fields[1])
            seed = int(fields[2]) if len(fields) > 2 else 0
        except (IndexError, ValueError):
            raise ClusterConfigError(text, ["(cluster): expected synthetic:N[:SEED]"]) from None
        return synthetic_cluster(devices, seed)
    path = Path(text)
    if not path.exists() and text in shipped_cluster_names():
        path = shipped_cluster_path(text)
    try:
        content = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ClusterConfigError(text, [f"(file): {error.strerror or error}"]) from None
    return parse_cluster(content, str(path))


def _row(
    strategy: str, plan_latency: float, single: float | None, plan: Any, seconds: float
) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "latency_s": plan_latency,
        "speedup": (single / plan_latency) if single and plan_latency > 0 else None,
        "throughput_per_s": plan.predicted_throughput,
        "bytes": plan.predicted_bytes,
        "segments": len(plan.segments),
        "devices_used": len(plan.devices_used),
        "mode": plan.mode,
        "planning_s": seconds,
    }


def run(args: argparse.Namespace) -> int:
    try:
        cluster = load_cluster(args.cluster)
    except ClusterConfigError as error:
        print(f"{error.source}: invalid cluster description", file=sys.stderr)
        for line in error.problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    if args.validate:
        print(f"{cluster.name}: {len(cluster.devices)} devices, leader {cluster.leader}: ok")
        return 0
    if not args.model:
        print("edgedi plan: --model is required", file=sys.stderr)
        return 2
    try:
        spec = get_spec(args.model, args.size)
    except (UnknownModelError, ValueError) as error:
        print(f"edgedi plan: {error}", file=sys.stderr)
        return 2
    names = args.strategies or list(strategy_names())
    unknown = [n for n in names if n not in strategy_names()]
    if unknown:
        print(
            f"edgedi plan: unknown strategy {', '.join(unknown)}; known: "
            f"{', '.join(strategy_names())}",
            file=sys.stderr,
        )
        return 2
    leader = args.leader or cluster.leader
    try:
        problem = PlanningProblem(
            spec, cluster.devices, cluster.network, leader, tail_on_leader=args.tail_on_leader
        )
        # `single` is the reference for the speedups, planned even when not listed.
        single = get_strategy("single").plan_problem(problem).predicted_latency_s
        rows, plans = [], {}
        for name in names:
            started = time.perf_counter()
            plan = get_strategy(name).plan_problem(problem, epoch=args.epoch)
            elapsed = time.perf_counter() - started
            plans[name] = plan
            row = _row(name, plan.predicted_latency_s, single, plan, elapsed)
            if args.json and args.with_plans:
                row["plan"] = plan.to_wire()
            rows.append(row)
    except PlannerError as error:
        print(f"edgedi plan: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(cluster, spec.name, rows)
    if args.gantt is not None:
        from edgedi.planner.gantt import render_gantt
        from edgedi.planner.simulator import simulate

        chosen = args.strategies[0] if args.strategies else DEFAULT_STRATEGY
        plan = plans.get(chosen) or get_strategy(chosen).plan_problem(problem)
        try:
            timeline = simulate(plan, spec, cluster.devices, cluster.network)
        except PlannerError as error:
            print(f"edgedi plan: --gantt: {error}", file=sys.stderr)
            return 1
        title = (
            f"{chosen} · {spec.name} on {cluster.name} · simulated "
            f"{timeline.latency_s * 1000:.1f} ms"
        )
        image = render_gantt(timeline, [d.device for d in cluster.devices], title)
        image.save(args.gantt)
        if not args.json:
            print(f"timeline of {chosen} written to {args.gantt}")
    return 0


def _print_table(cluster: Cluster, model: str, rows: list[dict[str, Any]]) -> None:
    print(f"{model} on {cluster.name} ({len(cluster.devices)} devices, leader {cluster.leader})")
    header = (
        "strategy",
        "latency ms",
        "speedup",
        "img/s",
        "MB moved",
        "segments",
        "devices",
        "plan ms",
    )
    table = [header]
    for row in rows:
        speedup = row["speedup"]
        table.append(
            (
                row["strategy"],
                f"{row['latency_s'] * 1000:.2f}",
                "-" if speedup is None else f"{speedup:.2f}×",
                f"{row['throughput_per_s']:.2f}",
                f"{row['bytes'] / MEGABYTE:.2f}",
                str(row["segments"]) if row["mode"] == "rows" else "images",
                str(row["devices_used"]),
                f"{row['planning_s'] * 1000:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for number, line in enumerate(table):
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells))
        if number == 0:
            print("  ".join("-" * w for w in widths))
