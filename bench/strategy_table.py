"""The strategies side by side on the shipped example clusters.

For each shipped cluster (`planner/clusters/*.yaml`) and model (VGG-16, its EdgeDI
compact variant, ResNet-18, ResNet-34 at 200×200): every strategy's predicted
latency, speedup over `single`, throughput, bytes moved through the broker, segments
and devices used. Each plan is also replayed by the simulator; the table says whether
the simulated latency equals the prediction.

    .venv/bin/python bench/strategy_table.py [--models ...] [--clusters ...]
        [--out bench/results/strategies.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys

from edgedi.models.specs import get_spec
from edgedi.planner.cluster import parse_cluster, shipped_cluster_names, shipped_cluster_path
from edgedi.planner.errors import InfeasiblePlanError
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.simulator import simulate
from edgedi.planner.strategies import get_strategy, strategy_names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,vgg16-edgedi,resnet18,resnet34")
    parser.add_argument("--clusters", default=",".join(shipped_cluster_names()))
    parser.add_argument("--out", default="bench/results/strategies.md")
    args = parser.parse_args()
    lines = [
        "# Strategy comparison on the shipped clusters",
        "",
        "Command:",
        "",
        "```",
        " ".join(["python", *map(shlex.quote, sys.argv)]),
        "```",
        "",
        "Predicted by the planner's cost model with the clusters' profiles (see the YAML "
        "comments for how the Raspberry Pi profiles were derived); 200×200 input, one "
        "image at a time. *speedup* is over `single` (the best single device, image "
        "transfer included). `images` dispatches whole images, one per device: its "
        "latency is one image's, its img/s the steady-state throughput. *sim* says "
        "whether the discrete-event simulator replays the plan to the same latency "
        "(within 1e-9).",
        "",
    ]
    for cluster_name in args.clusters.split(","):
        path = shipped_cluster_path(cluster_name)
        cluster = parse_cluster(path.read_text(encoding="utf-8"), cluster_name)
        lines += [f"## {cluster.name}: {cluster.description}", ""]
        for model in args.models.split(","):
            spec = get_spec(model)
            problem = PlanningProblem(spec, cluster.devices, cluster.network, cluster.leader)
            single = get_strategy("single").plan_problem(problem).predicted_latency_s
            lines += [
                f"### {model} on {cluster.name}",
                "",
                "| strategy | latency ms | speedup | img/s | MB moved | segments | devices | sim |",
                "|---|---:|---:|---:|---:|---:|---:|---|",
            ]
            latencies: dict[str, float] = {}
            for name in strategy_names():
                plan = get_strategy(name).plan_problem(problem)
                try:
                    timeline = simulate(plan, spec, cluster.devices, cluster.network)
                except InfeasiblePlanError:  # channel segments: only the replay prices them
                    timeline = None
                same = timeline is not None and abs(
                    timeline.latency_s - plan.predicted_latency_s
                ) <= 1e-9 * max(1.0, plan.predicted_latency_s)
                latency = plan.predicted_latency_s
                if name != "images":
                    latencies[name] = latency
                segments = str(len(plan.segments)) if plan.mode == "rows" else "images"
                lines.append(
                    f"| {name} | {latency * 1000:.1f} | {single / latency:.2f}× "
                    f"| {plan.predicted_throughput:.2f} | {plan.predicted_bytes / 1e6:.2f} "
                    f"| {segments} | {len(plan.devices_used)} | {'=' if same else 'differs'} |"
                )
                print(f"{cluster.name} {model} {name}: {latency * 1000:.1f} ms", flush=True)
            lowest = min(latencies.values())
            winners = [n for n, v in latencies.items() if v <= lowest * (1 + 1e-9)]
            lines += ["", f"Lowest predicted latency: **{', '.join(winners)}**.", ""]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
