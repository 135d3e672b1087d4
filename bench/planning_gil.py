"""How much a re-plan slows the leader's own computing: planning on a thread, or in a process.

    .venv/bin/python bench/planning_gil.py [--model resnet34] [--plan-model resnet34]
        [--devices 4] [--passes 10] [--rounds 3] [--out bench/results/planning_gil.md]

A leader computes tiles on its compute thread (one torch thread) and, when its
devices' speeds or membership change, plans again: `auto`'s search over strategies
and device counts, pure Python, most of a second of CPU for ResNet-34. This times the
model's forward pass on a thread of this process, as the compute thread runs it,
three ways, rounds interleaved:

- alone;
- while `auto` plans over and over on a thread of this process at nice 19 (how the
  leader planned until session 11);
- while it plans over and over in a `PlanWorker` process at nice 19 (how it plans now).

The planner's profiles are made up (1 ns per multiply-add at speed 1, speeds 1, 1,
0.6, 0.6): the search's cost, not its answer, is what matters here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgedi.agent.plan_worker import PlanWorker
from edgedi.models.specs import get_spec
from edgedi.models.zoo import build_model
from edgedi.planner.cost import NetworkModel
from edgedi.planner.profiles import DeviceProfile, TimeModel
from edgedi.planner.strategies.auto import candidates

ROOT = Path(__file__).resolve().parent.parent
INPUT_SIZE = 200
SPEEDS = (1.0, 1.0, 0.6, 0.6)


def profiles(count: int) -> list[DeviceProfile]:
    return [
        DeviceProfile(
            device=f"dev-{index + 1}",
            time_models={},
            default=TimeModel(seconds_per_mac=1e-9 / speed, seconds_fixed=1e-4 / speed),
            memory_bytes=2**31,
            bandwidth=12.5e6,
            latency_s=5e-4,
        )
        for index, speed in enumerate(SPEEDS[:count])
    ]


def search(model: str, count: int) -> int:
    """One `auto` search, as the leader makes it; how many candidates it found."""
    found = candidates(
        get_spec(model, INPUT_SIZE),
        profiles(count),
        leader="dev-1",
        epoch=1,
        network=NetworkModel(),
    )
    return len(found)


def _nice_thread(body: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        body()

    return run


class Background:
    """Searches over and over until stopped: on a thread, or through a `PlanWorker`."""

    def __init__(self, how: str, model: str, count: int) -> None:
        self.how, self.model, self.count = how, model, count
        self.searches = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker = PlanWorker() if how == "process" else None

    def warm(self) -> None:
        if self._worker is not None:
            asyncio.run(self._worker.run(search, self.model, self.count))

    def __enter__(self) -> Background:
        if self.how == "thread":
            body = _nice_thread(self._search_here)
        elif self.how == "process":
            body = self._search_there
        else:
            return self
        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()
        time.sleep(0.2)  # the search is under way
        return self

    def _search_here(self) -> None:
        while not self._stop.is_set():
            search(self.model, self.count)
            self.searches += 1

    def _search_there(self) -> None:
        assert self._worker is not None

        async def loop() -> None:
            assert self._worker is not None
            while not self._stop.is_set():
                await self._worker.run(search, self.model, self.count)
                self.searches += 1

        asyncio.run(loop())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet34", help="the model the compute thread runs")
    parser.add_argument("--plan-model", default="resnet34", help="the model auto plans")
    parser.add_argument("--devices", type=int, default=4, choices=range(1, len(SPEEDS) + 1))
    parser.add_argument("--passes", type=int, default=10, help="forward passes per way per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/planning_gil.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    net = build_model(args.model, INPUT_SIZE, seed=0)
    x = torch.randn(1, *net.spec.input_shape)

    def forward_ms() -> float:
        with torch.no_grad():
            started = time.perf_counter()
            net(x)
            return (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    found = search(args.plan_model, args.devices)
    one_search_s = time.perf_counter() - started
    for _ in range(3):
        forward_ms()
    ways = ("alone", "thread", "process")
    backgrounds = {way: Background(way, args.plan_model, args.devices) for way in ways}
    backgrounds["process"].warm()
    times: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for round_ in range(args.rounds):
            order = ways if round_ % 2 == 0 else ways[::-1]
            for way in order:
                with backgrounds[way]:
                    times[way] += [forward_ms() for _ in range(args.passes)]
                print(f"round {round_ + 1}, {way}: median {statistics.median(times[way]):.1f} ms")
    finally:
        for background in backgrounds.values():
            background.close()

    alone = statistics.mean(times["alone"])
    command = "python bench/planning_gil.py " + shlex.join(argv or sys.argv[1:])
    lines = [
        "# A re-plan beside the compute thread: on a thread, or in a process",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python "
        f"{platform.python_version()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}  ",
        f"The compute thread: one {args.model} forward pass at {INPUT_SIZE}×{INPUT_SIZE}, "
        f"one torch thread. The planning: `auto` over {args.devices} made-up devices for "
        f"{args.plan_model} ({found} candidates, {one_search_s:.2f} s per search alone), "
        f"over and over, at nice 19. {args.rounds} rounds of {args.passes} passes per way, "
        "order reversed every other round.",
        "",
        "| while the leader plans | forward pass, median ms | mean ms | p90 ms | max ms "
        "| mean × alone | searches |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "alone": "not planning",
        "thread": "on a thread of the agent (until session 11)",
        "process": "in a `PlanWorker` process (now)",
    }
    for way in ways:
        values = sorted(times[way])
        mean = statistics.mean(values)
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        lines.append(
            f"| {labels[way]} | {statistics.median(values):.1f} | {mean:.1f} | {p90:.1f} | "
            f"{values[-1]:.1f} | {mean / alone:.2f} | "
            f"{backgrounds[way].searches if way != 'alone' else '-'} |"
        )
    lines += [
        "",
        "The mean is what the compute thread loses over a search: only the passes "
        "that overlap its pure-Python phases are slowed, those many times over. "
        "On a thread, the search holds the GIL for the interpreter's switch interval "
        "(5 ms) at a time, and the compute thread needs it between every torch "
        "operator; nice 19 does not help while both have a core. In a process of its "
        "own the search shares only the cores.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
