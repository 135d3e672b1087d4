"""Failover and re-dispatch times: what a fault costs a stream of jobs.

    .venv/bin/python bench/failover.py [--out bench/results/failover.md] [--rounds 3]

A demo-like cluster (`edgedi.agent.local_cluster`: 4 `edgedi agent` processes under
CPU quotas of 0.4/0.4/0.25/0.25 of a core, vgg16-edgedi at 200 px, the shipped
checkpoint) gets one job at a time through `edgedi.agent.client` (the default 5 s
re-submission), `equal` plans so every device holds a share of every job. Faults
land while a job is in flight (a fixed delay after its submission):

- worker SIGKILL: the broker publishes its Will at once; its tiles are re-sent.
  Restarted (as systemd would) before the next round.
- worker SIGSTOP for `--stall` seconds: nothing announces it; its tiles turn overdue
  (`jobs.straggler_min_s`, 1 s by default, or 3x the plan's prediction) and are copied;
  it leaves the membership once its heartbeats have been missing for 3 s.
- leader SIGKILL: the Will ends its term, the next candidate claims a higher epoch and
  runs the jobs in its journal. Restarted before the next round.

Each fault waits until the device is in use again (a suspect gets no tiles).
Per fault: the latency of the job it hit, against the median of the undisturbed
jobs before it; for the leader, the time from the kill to the new leader record.
Every job must be answered ok; a job that is not is counted as lost.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgedi.agent.client import InferenceClient, connect
from edgedi.agent.local_cluster import LocalCluster
from edgedi.broker.messages import JobResult
from edgedi.models.data import iter_images

MODEL = "vgg16-edgedi"
SIZE = 200
SPEEDS = (0.4, 0.4, 0.25, 0.25)
FAULT_DELAY_S = 0.15  # after submitting the job a fault hits
JOB_TIMEOUT_S = 60.0


@dataclass
class Outcome:
    fault: str
    baseline_s: float
    hit_s: float
    extra: dict[str, float] = field(default_factory=dict)
    lost: int = 0


async def _job(client: InferenceClient, image: npt.NDArray[np.uint8]) -> tuple[float, JobResult]:
    started = time.perf_counter()
    result = await client.infer(image, MODEL, strategy="equal", timeout=JOB_TIMEOUT_S)
    return time.perf_counter() - started, result


async def _baseline(
    client: InferenceClient, images: list[npt.NDArray[np.uint8]], count: int
) -> tuple[float, int]:
    latencies, lost = [], 0
    for image in images[:count]:
        seconds, result = await _job(client, image)
        if result.status == "ok":
            latencies.append(seconds)
        else:
            lost += 1
    return statistics.median(latencies), lost


async def _until_used(
    client: InferenceClient, image: npt.NDArray[np.uint8], device: str, most: int = 30
) -> None:
    """Jobs until one computes on `device`."""
    for _ in range(most):
        _, result = await _job(client, image)
        if device in result.devices:
            return
    raise RuntimeError(f"{device} was not used by {most} jobs in a row")


async def _hit(
    client: InferenceClient, image: npt.NDArray[np.uint8], fault: Callable[[], None]
) -> tuple[float, JobResult]:
    job = asyncio.create_task(_job(client, image))
    await asyncio.sleep(FAULT_DELAY_S)
    fault()
    return await job


async def _wait_for_leader(client: InferenceClient, not_device: str, limit_s: float) -> float:
    """The moment (perf_counter) a leader record names another device (10 ms polling)."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        record = await client.leader(timeout=0.5)
        if record is not None and record.device != not_device:
            return time.perf_counter()
        await asyncio.sleep(0.01)
    return float("nan")


async def _wait_for_devices(client: InferenceClient, count: int, limit_s: float = 60.0) -> None:
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        announcement = await client.current_plan(timeout=0.5)
        if announcement is not None and len(announcement.plan.devices) == count:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the plan never named {count} devices again")


async def _run(cluster: LocalCluster, rounds: int, stall_s: float) -> list[Outcome]:
    images = [sample.image for sample in iter_images(7, SIZE, count=8)]
    outcomes: list[Outcome] = []
    async with connect(cluster.host, cluster.port, root=cluster.root) as client:
        await _wait_for_devices(client, len(SPEEDS))
        for _ in range(2):  # warm-up
            await _job(client, images[0])
        for number in range(rounds):
            # Worker SIGKILL (the last device: never the leader, which has priority 0).
            victim = cluster.device_ids[-1]
            await _until_used(client, images[0], victim)
            base, lost = await _baseline(client, images, 4)
            seconds, result = await _hit(client, images[4], functools.partial(cluster.kill, victim))
            outcomes.append(
                Outcome("worker SIGKILL", base, seconds, lost=lost + (result.status != "ok"))
            )
            cluster.restart(victim)
            await _wait_for_devices(client, len(SPEEDS))

            # Worker SIGSTOP for stall_s seconds, once the restarted worker is in use
            # again (a fresh process's first, slow tiles can make it a suspect for a
            # while, and a suspect gets no tiles to stall).
            await _until_used(client, images[0], victim)
            base, lost = await _baseline(client, images, 4)
            stalled_at = time.perf_counter()
            seconds, result = await _hit(
                client, images[5], functools.partial(cluster.freeze, victim)
            )
            during = []
            while time.perf_counter() - stalled_at < stall_s:
                more, other = await _job(client, images[6])
                during.append(more)
                lost += other.status != "ok"
            cluster.thaw(victim)
            await _wait_for_devices(client, len(SPEEDS))
            outcomes.append(
                Outcome(
                    "worker SIGSTOP",
                    base,
                    seconds,
                    {"later jobs during the stall (median s)": statistics.median(during)}
                    if during
                    else {},
                    lost=lost + (result.status != "ok"),
                )
            )

            # Leader SIGKILL.
            record = await client.leader()
            assert record is not None
            leader = record.device
            base, lost = await _baseline(client, images, 4)
            killed: list[float] = []

            def kill_leader(device: str = leader, killed: list[float] = killed) -> None:
                killed.append(time.perf_counter())
                cluster.kill(device)

            job = asyncio.create_task(_hit(client, images[7], kill_leader))
            await asyncio.sleep(FAULT_DELAY_S + 0.01)
            takeover = await _wait_for_leader(client, leader, 30.0) - killed[0]
            seconds, result = await job
            outcomes.append(
                Outcome(
                    "leader SIGKILL",
                    base,
                    seconds,
                    {"new leader record after the kill (s)": takeover},
                    lost=lost + (result.status != "ok"),
                )
            )
            cluster.restart(leader)
            await _wait_for_devices(client, len(SPEEDS))
            print(f"round {number + 1}/{rounds} done", file=sys.stderr)
    return outcomes


def _table(outcomes: list[Outcome]) -> list[str]:
    rows = [
        "| fault | rounds | undisturbed job (median s) | job hit by the fault (median s) "
        "| cost of the fault (median s) | other | jobs not answered ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for fault in dict.fromkeys(outcome.fault for outcome in outcomes):
        group = [outcome for outcome in outcomes if outcome.fault == fault]
        base = statistics.median(o.baseline_s for o in group)
        hit = statistics.median(o.hit_s for o in group)
        cost = statistics.median(o.hit_s - o.baseline_s for o in group)
        extra_keys = dict.fromkeys(key for o in group for key in o.extra)
        other = "; ".join(
            f"{key}: {statistics.median(o.extra[key] for o in group if key in o.extra):.2f}"
            for key in extra_keys
        )
        rows.append(
            f"| {fault} | {len(group)} | {base:.2f} | {hit:.2f} | {cost:+.2f} | {other or '-'} "
            f"| {sum(o.lost for o in group)} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/failover.md"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stall", type=float, default=5.0, help="seconds a worker is frozen")
    args = parser.parse_args()
    with LocalCluster(len(SPEEDS), speeds=SPEEDS, model=MODEL, input_size=SIZE) as cluster:
        cluster.wait_ready_sync(180)
        assert cluster.emulation is not None
        emulation = cluster.emulation.describe()
        outcomes = asyncio.run(_run(cluster, args.rounds, args.stall))
    command = " ".join(["bench/failover.py", *sys.argv[1:]])
    lines = [
        "# Failover and re-dispatch times",
        "",
        f"`.venv/bin/python {command}` on {platform.node()} ({platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}); {emulation}.",
        "",
        f"{MODEL} at {SIZE} px, `equal` plans over 4 devices, one job at a time; each fault "
        f"lands {FAULT_DELAY_S:.2f} s after a job was submitted. Cost = latency of the job "
        "the fault hit minus the median of the 4 undisturbed jobs just before it.",
        "",
        *_table(outcomes),
        "",
        "What the numbers mean: a killed worker's Will arrives within milliseconds, so its "
        "tiles are re-sent at once and the job pays roughly one more tile compute. A frozen "
        "worker says nothing: the job waits until its tile is overdue (1 s floor by "
        "default), then a copy runs elsewhere; later jobs avoid the suspect device. A "
        "killed leader's Will ends its term at once; the next candidate claims a higher "
        "epoch and re-runs the in-flight job from its journal, from the start.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
