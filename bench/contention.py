"""How much slower the emulated devices compute when they all compute at once.

    .venv/bin/python bench/contention.py [--model vgg16] [--seconds 12] [--rounds 3]
        [--out bench/results/contention.md]

The demo cluster emulates four boards with CPU quotas (0.4/0.4/0.25/0.25 of a core)
on one machine. Quotas make each device as slow as asked, but they cannot give each
its own caches, memory bus and scheduler slot: when all four compute together they
share them, which real boards do not. This measures that cost with no runtime at all:
one process per device, in a quota group of its speed exactly as `LocalCluster` makes
them, runs the model's whole forward pass back to back (one torch thread), first each
alone and then all four at once, rounds interleaved. The ratio of the two medians is
each device's *contention slowdown*.

A distributed job keeps all devices computing at once while its one-device baseline
computes alone, so on this machine the ideal speedup (Σ speeds / fastest) is out of
reach by that factor before any halo, message or wait is paid: the report gives the
ideal the contention leaves (Σ speed_i / slowdown_i, over the fastest alone).
Needs root and a cgroup CPU controller (as the demo's quota emulation does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgedi.agent.local_cluster import QUOTA_PERIOD_US, SPEED_PATTERN, CpuQuotas

ROOT = Path(__file__).resolve().parent.parent

# Runs in each device's process: build the model, say so, wait for "go" (by then the
# parent has moved it into its quota group), time whole forward passes until the
# deadline it is given, print the times as JSON.
_CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from edgedi.models.zoo import build_model
model = build_model(sys.argv[1], int(sys.argv[2]), seed=0)
x = torch.randn(1, 1, int(sys.argv[2]), int(sys.argv[2]))
with torch.inference_mode():
    model(x)
    print("ready", flush=True)
    seconds = float(sys.stdin.readline())
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - started)
print(json.dumps(times), flush=True)
"""


@dataclass
class Device:
    name: str
    speed: float
    alone: list[float] = field(default_factory=list)
    """Median forward time of each round's solo phase, seconds."""
    together: list[float] = field(default_factory=list)
    """Median forward time of each round's all-at-once phase, seconds."""


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class _Child:
    def __init__(self, model: str, size: int, quotas: CpuQuotas, group: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, model, str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the timing process for {group.name} did not start")
        quotas.add(group, self.process.pid)

    def go(self, seconds: float) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{seconds}\n")
        self.process.stdin.flush()

    def times(self) -> list[float]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        self.process.wait(timeout=60)
        times: list[float] = json.loads(line)
        if not times:
            raise RuntimeError("a timing process ran no forward pass")
        return times


def _phase(
    devices: list[Device], groups: list[Path], quotas: CpuQuotas, args: argparse.Namespace
) -> list[float]:
    """Start one process per device in its group, all timing at once: their medians."""
    children = [_Child(args.model, args.size, quotas, group) for group in groups]
    try:
        for child in children:
            child.go(args.seconds)
        return [statistics.median(child.times()) for child in children]
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=12.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/contention.md")
    args = parser.parse_args()
    quotas, why = CpuQuotas.detect()
    if quotas is None:
        print(f"contention: cannot emulate device speeds here: {why}", file=sys.stderr)
        return 2
    devices = [Device(f"dev-{i + 1}", speed) for i, speed in enumerate(SPEED_PATTERN)]
    groups = [quotas.create(f"bench-{d.name}", d.speed, QUOTA_PERIOD_US) for d in devices]
    loads = [_load_average()]
    started = time.monotonic()
    try:
        for round_ in range(args.rounds):
            for position, device in enumerate(devices):
                (median,) = _phase([device], [groups[position]], quotas, args)
                device.alone.append(median)
            for device, median in zip(devices, _phase(devices, groups, quotas, args), strict=True):
                device.together.append(median)
            loads.append(_load_average())
            print(
                f"round {round_ + 1}/{args.rounds}: "
                + ", ".join(
                    f"{d.name} {d.alone[-1] * 1e3:.0f} ms alone, {d.together[-1] * 1e3:.0f} "
                    "together"
                    for d in devices
                ),
                file=sys.stderr,
            )
    finally:
        for group in groups:
            quotas.remove(group)
    _write(args, devices, loads, time.monotonic() - started)
    return 0


def _write(
    args: argparse.Namespace, devices: list[Device], loads: list[str], elapsed: float
) -> None:
    fastest = max(devices, key=lambda d: d.speed)
    fastest_alone = statistics.median(fastest.alone)
    ideal = sum(d.speed for d in devices) / fastest.speed
    # Each device's throughput together, in units of the fastest device alone.
    contended = sum(fastest_alone / statistics.median(d.together) for d in devices)
    command = " ".join(["bench/contention.py", *map(shlex.quote, sys.argv[1:])])
    lines = [
        "# Contention: the emulated devices computing alone and all at once",
        "",
        f"Command: `.venv/bin/python {command}` ({elapsed:.0f} s)",
        "",
        f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical "
        f"cores; Python {platform.python_version()}; one torch thread per device",
        f"- model {args.model} at {args.size} px, whole forward passes back to back, "
        f"{args.seconds:.0f} s per phase, {args.rounds} rounds (each device alone in "
        "turn, then all four at once); quota groups of "
        + "/".join(f"{d.speed:g}" for d in devices)
        + f" of a core, period {QUOTA_PERIOD_US / 1000:g} ms, as the demo makes them",
        "- load average (1/5/15 min) before and after each round: " + " → ".join(loads),
        "",
        "| device | speed | alone ms (median of rounds) | together ms | slowdown | each round "
        "(alone / together) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for d in devices:
        alone = statistics.median(d.alone)
        together = statistics.median(d.together)
        rounds = ", ".join(
            f"{a * 1e3:.0f}/{t * 1e3:.0f}" for a, t in zip(d.alone, d.together, strict=True)
        )
        lines.append(
            f"| {d.name} | {d.speed:g} | {alone * 1e3:.1f} | {together * 1e3:.1f} | "
            f"{together / alone:.2f}× | {rounds} |"
        )
    lines += [
        "",
        f"Ideal speedup for these speeds: **{ideal:.2f}×** (Σ speeds / fastest). With every "
        "device computing at its contended speed and the one-device baseline alone, the "
        f"most a perfect partition could measure here is **{contended:.2f}×** "
        "(Σ over devices of the fastest device's time alone / that device's time "
        f"together): {contended / ideal:.0%} of the ideal, before any halo, message or "
        "wait.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
