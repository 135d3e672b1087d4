"""What sending a direct job's tile tasks costs: one message per task, or one per device.

    .venv/bin/python bench/task_batches.py [--jobs N] [--out FILE]

A ResNet-34 job on the demo cluster's four devices is 72 direct tile tasks (18
segments × 4 tiles); the leader keeps its own 18 and sends 54 through the broker.
This sends such a job's tasks from a leader session to three device sessions
through a private Mosquitto, in one process, both ways, job by job in alternating
order: each task alone (`TileTask`, what devices older than 0.2 get), and one
`TileTaskBatch` per device. Measured per job: the CPU time of the process (all four
event loops: encoding, the MQTT client's work, PUBACKs, topic matching, decoding,
validation) and the wall time from the first publish until every device holds all
of its tasks. Medians over the jobs; the machine is shared, so the ratio of the
two, measured side by side, is what to read. On the demo cluster each loop runs
under a quota of 0.25-0.4 of a core, which multiplies its CPU time by 2.5-4.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edgedi.agent.direct import task_batches
from edgedi.broker import topics
from edgedi.broker.connection import MqttSession, Received, SessionSettings
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import RowsForward, TileTask, TileTaskBatch
from edgedi.broker.server import start_mosquitto
from edgedi.broker.tensors import Tensor

DEVICES = ("dev-1", "dev-2", "dev-3", "dev-4")  # dev-1 leads and keeps its own tasks
SEGMENTS = 18
INPUT_SIZE = 200
ROOT = topics.TopicRoot(prefix="edgedi/v1", cluster="bench")


def job_tasks(job_id: str) -> list[TileTask]:
    """A ResNet-34-shaped direct job: 4 row strips per segment, inputs in segment 0."""
    strips = ((0, 50), (50, 100), (100, 150), (150, 200))
    peers = tuple(DeviceId(device) for device in DEVICES)
    tasks = []
    for segment in range(SEGMENTS):
        for tile, device in enumerate(DEVICES):
            start, stop = strips[tile]
            tensor = None
            if segment == 0:
                rows = np.zeros((1, 3, stop - start + 4, INPUT_SIZE), np.float32)
                tensor = Tensor(rows)
            forward = (
                ()
                if segment == SEGMENTS - 1
                else (
                    RowsForward(tile=tile, device=DeviceId(device), rows=(start, stop)),
                    RowsForward(
                        tile=(tile + 1) % 4,
                        device=DeviceId(DEVICES[(tile + 1) % 4]),
                        rows=(stop - 1, stop),
                    ),
                )
            )
            tasks.append(
                TileTask(
                    sender="dev-1",
                    job_id=job_id,  # type: ignore[arg-type]
                    epoch=1,
                    plan_id="0123456789abcdef0123456789abcdef",
                    device=DeviceId(device),
                    model="resnet34",
                    model_digest="0123456789abcdef",
                    input_size=INPUT_SIZE,
                    segment=segment,
                    first_unit=segment,
                    last_unit=segment,
                    row_parts=strips,
                    tile=tile,
                    input_rows=(max(0, start - 2), min(INPUT_SIZE, stop + 2)),
                    input_columns=(0, INPUT_SIZE),
                    output_rows=(start, stop),
                    output_columns=(0, INPUT_SIZE),
                    tensor=tensor,
                    deadline=time.time() + 60,
                    deadline_in_s=60.0,
                    peers=peers,
                    forward=forward,
                )
            )
    return tasks


async def measure(port: int, jobs: int) -> dict[str, dict[str, list[float]]]:
    def settings(client: str) -> SessionSettings:
        return SessionSettings(client_id=f"bench-{client}", host="127.0.0.1", port=port)

    leader = MqttSession(settings("leader"), ROOT)
    devices = {device: MqttSession(settings(device), ROOT) for device in DEVICES[1:]}
    expected = 0
    received = 0
    complete = asyncio.Event()

    async def on_task(message: Received) -> None:
        nonlocal received
        item = message.message
        received += len(item.tasks) if isinstance(item, TileTaskBatch) else 1
        if received >= expected:
            complete.set()

    figures: dict[str, dict[str, list[float]]] = {
        way: {"cpu_ms": [], "wall_ms": []} for way in ("tasks", "batches")
    }
    async with asyncio.TaskGroup() as group:
        runs = [group.create_task(s.run()) for s in (leader, *devices.values())]
        for device, session in devices.items():
            await session.subscribe(topics.DEVICE_TASKS, on_task, device=device)
        for session in (leader, *devices.values()):
            await session.wait_connected(10.0)
        await asyncio.sleep(0.5)  # the subscriptions are in place at the broker
        for number in range(2 * jobs + 2):  # the first round of each way warms up
            way = ("tasks", "batches")[number % 2]
            remote = [t for t in job_tasks(f"job-{number}") if t.device != DEVICES[0]]
            messages: list[TileTask | TileTaskBatch] = list(remote)
            if way == "batches":
                messages = []
                for device in DEVICES[1:]:
                    messages += task_batches([t for t in remote if t.device == device])
            expected, received = len(remote), 0
            complete.clear()
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(
                *(
                    leader.publish(topics.DEVICE_TASKS, message, device=message.device)
                    for message in messages
                )
            )
            await asyncio.wait_for(complete.wait(), 30)
            if number >= 2:
                figures[way]["wall_ms"].append((time.perf_counter() - wall) * 1e3)
                figures[way]["cpu_ms"].append((time.process_time() - cpu) * 1e3)
            await asyncio.sleep(0.02)
        for session in (leader, *devices.values()):
            session.request_stop()
        await asyncio.gather(*runs, return_exceptions=True)
    return figures


def report(figures: dict[str, dict[str, list[float]]], command: str, jobs: int) -> str:
    def median(way: str, what: str) -> float:
        return statistics.median(figures[way][what])

    def spread(way: str, what: str) -> str:
        q = statistics.quantiles(figures[way][what], n=4)
        return f"{(q[2] - q[0]) / median(way, what):.0%}"

    lines = [
        "# Sending a direct job's tile tasks: one message per task, or one per device",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, "
        "a private Mosquitto on loopback, the leader and three devices as four MQTT "
        "sessions in one process (see the module docstring of `bench/task_batches.py`). "
        f"A ResNet-34-shaped job: {SEGMENTS} segments × 4 row strips, 54 tasks to the "
        f"three other devices. {jobs} jobs each way, alternating; medians (spread: "
        "interquartile range / median).",
        "",
        "| way | messages a job | CPU ms a job (all four loops) | spread | "
        "wall ms until all tasks are held | spread |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for way, count in (("tasks", 54), ("batches", 3)):
        lines.append(
            f"| {way} | {count} | {median(way, 'cpu_ms'):.2f} | {spread(way, 'cpu_ms')} | "
            f"{median(way, 'wall_ms'):.2f} | {spread(way, 'wall_ms')} |"
        )
    lines += [
        "",
        f"Batches take {median('batches', 'cpu_ms') / median('tasks', 'cpu_ms'):.2f}× the CPU "
        f"and {median('batches', 'wall_ms') / median('tasks', 'wall_ms'):.2f}× the wall time "
        "of one message per task, measured side by side in this run.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=60, help="jobs each way (default 60)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/task_batches.md"))
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/task_batches.py", *sys.argv[1:]])
    with start_mosquitto() as broker:
        figures = asyncio.run(measure(broker.port, args.jobs))
    text = report(figures, command, args.jobs)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
