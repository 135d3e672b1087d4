"""Does a throttled event loop stall its own compute thread through the GIL?

    sudo .venv/bin/python bench/loop_quota_gil.py [--model resnet34] [--speed 0.25]
        [--message-us 150] [--every-ms 3] [--passes 8] [--rounds 3]
        [--out bench/results/loop_quota_gil.md]

An emulated device is one agent process with two CPU quota groups of its speed
(`LocalCluster`): its compute thread in one, its event loop in the other. Both
threads share the process's GIL, which the compute thread takes between every torch
operator. When the loop's quota runs out while it holds the GIL (handling a
message), the kernel stops it until the next period, and the compute thread, whose
own quota is not used up, waits for the GIL meanwhile. A real board's loop is never
stopped that way.

This runs one such process: the compute thread runs the model's forward pass back
to back (one torch thread) in a group of `--speed`; the main thread stands for the
event loop, handling a message's worth of Python (`--message-us` of work at full
speed: msgpack, dicts, a tensor view) every `--every-ms`. The loop's group is
varied, rounds interleaved:

- `unlimited`: no quota (no throttling, but faster than the device it stands for);
- `quota`: the device's speed (what the demo does);
- `quota+burst`: the same quota, with a CFS burst of one period's quota (cgroup v1
  `cpu.cfs_burst_us`), so a loop that was idle can finish a message it started.

Needs root and cgroup v1.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import torch

from edgedi.agent.local_cluster import QUOTA_PERIOD_US, CpuQuotas
from edgedi.models.zoo import build_model

ROOT = Path(__file__).resolve().parent.parent
INPUT_SIZE = 200
WAYS = ("unlimited", "quota", "quota+burst")


def _message_work(payload: bytes, work_s: float) -> None:
    """About `work_s` of a loop's Python per message: decode, look up, view, repeat."""
    until = time.perf_counter() + work_s
    while time.perf_counter() < until:
        message = msgpack.unpackb(payload)
        rows = np.frombuffer(message["tensor"], dtype=np.float32)
        torch.from_numpy(rows.copy())
        _ = {key: value for key, value in message.items() if key != "tensor"}


def _throttled(group: Path) -> tuple[int, int]:
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stat["nr_periods"]), int(stat["nr_throttled"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--speed", type=float, default=0.25, help="the device's share of a core")
    parser.add_argument("--message-us", type=float, default=150.0)
    parser.add_argument("--every-ms", type=float, default=3.0)
    parser.add_argument("--passes", type=int, default=8, help="forward passes per way per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/loop_quota_gil.md")
    args = parser.parse_args(argv)

    quotas, why = CpuQuotas.detect()
    if quotas is None or quotas.version != 1:
        print(f"needs root and cgroup v1: {why or 'cgroup v2 here'}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    net = build_model(args.model, INPUT_SIZE, seed=0)
    x = torch.randn(1, *net.spec.input_shape[:1], INPUT_SIZE, INPUT_SIZE)
    payload = msgpack.packb({"job": "j", "segment": 3, "rows": [0, 12], "tensor": bytes(48 * 1024)})
    compute = quotas.create("gil-compute", args.speed)
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    throttled: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        for round_ in range(args.rounds):
            order = WAYS if round_ % 2 == 0 else WAYS[::-1]
            for way in order:
                loop_group = quotas.create(
                    f"gil-loop-{round_}-{way.replace('+', '-')}",
                    None if way == "unlimited" else args.speed,
                )
                if way == "quota+burst":
                    quota = int((loop_group / "cpu.cfs_quota_us").read_text())
                    (loop_group / "cpu.cfs_burst_us").write_text(str(quota))
                stop = threading.Event()
                passes: list[float] = []

                def computing(passes: list[float], stop: threading.Event) -> None:
                    with quotas.joined(compute), torch.no_grad():
                        net(x)  # warm, in the group
                        for _ in range(args.passes):
                            started = time.perf_counter()
                            net(x)
                            passes.append((time.perf_counter() - started) * 1000)
                    stop.set()

                with quotas.joined(loop_group):
                    before = _throttled(loop_group)
                    thread = threading.Thread(target=computing, args=(passes, stop))
                    thread.start()
                    while not stop.is_set():
                        _message_work(payload, args.message_us / 1e6)
                        time.sleep(args.every_ms / 1000)
                    thread.join()
                    after = _throttled(loop_group)
                periods = max(1, after[0] - before[0])
                throttled[way].append((after[1] - before[1]) / periods)
                times[way] += passes
                quotas.remove(loop_group)
                print(
                    f"round {round_ + 1}, loop {way}: median {statistics.median(passes):.0f} ms, "
                    f"loop throttled in {throttled[way][-1]:.0%} of its periods",
                    flush=True,
                )
    finally:
        quotas.remove_all()

    base = statistics.median(times["unlimited"])
    command = "python bench/loop_quota_gil.py " + shlex.join(argv or sys.argv[1:])
    lines = [
        "# A throttled event loop and its compute thread's GIL",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python "
        f"{platform.python_version()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}  ",
        f"One process: its compute thread runs {args.model}'s forward pass at "
        f"{INPUT_SIZE}×{INPUT_SIZE} (one torch thread) under a CPU quota of {args.speed} "
        f"of a core (period {QUOTA_PERIOD_US} µs); its main thread, standing for the "
        f"event loop, handles {args.message_us:.0f} µs of a message's Python every "
        f"{args.every_ms} ms, in a group of its own. {args.rounds} rounds of "
        f"{args.passes} passes per way, order reversed every other round.",
        "",
        "| the loop's group | forward pass, median ms | × unlimited | loop throttled "
        "in (share of its periods) |",
        "|---|---:|---:|---:|",
    ]
    for way in WAYS:
        median = statistics.median(times[way])
        lines.append(
            f"| {way} | {median:.0f} | {median / base:.2f} | "
            f"{statistics.mean(throttled[way]):.0%} |"
        )
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
