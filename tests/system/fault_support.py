"""Fault injection on real `edgedi agent` processes: start, SIGKILL, restart, observe.

Each fault test gets a cluster of its own (a private broker, its own topic root),
so killing devices never disturbs the shared cluster of the other system tests.
Agents run as `python -m edgedi.agent.cli agent` with one torch thread and an
emulated slowdown, so jobs are long enough for a kill to land in the middle of one.
`ResultLog` records every message on `results/+` (not only the ones a client waits
for), which is what "none lost, none duplicated" is checked against.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from edgedi.agent.client import InferenceClient, connect
from edgedi.broker.connection import MqttSession, Received, SessionSettings
from edgedi.broker.messages import JobResult, LeaderRecord
from edgedi.broker.server import BrokerHandle, Preference, start_broker
from edgedi.broker.topics import JOB_RESULT, PLANNER_LEADER, TopicRoot
from edgedi.models.checkpoints import load_model
from edgedi.models.data import CLASSES, generate_image
from edgedi.models.training import normalize

MODEL = "tiny-edgedi"
INPUT_SIZE = 64
START_TIMEOUT_S = 90.0


def picture(seed: int) -> npt.NDArray[np.uint8]:
    return generate_image(seed % len(CLASSES), seed, INPUT_SIZE, seed // len(CLASSES))


def reference(seed: int) -> npt.NDArray[np.float64]:
    """Single-process probabilities of `picture(seed)` (the same seeded weights)."""
    torch.set_num_threads(1)
    model, _ = load_model(MODEL, INPUT_SIZE)
    with torch.inference_mode():
        logits = model(normalize(picture(seed)[None])).double()
    return torch.softmax(logits, dim=1).numpy().reshape(-1)


@dataclass
class FaultCluster:
    broker: BrokerHandle
    root: TopicRoot
    folder: Path
    slowdown: float
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    replaced: list[subprocess.Popen[bytes]] = field(default_factory=list)
    starts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def start(
        self,
        device: str,
        priority: int,
        *,
        environment: dict[str, str] | None = None,
        state: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start (or restart, as systemd's Restart=always would) one agent process.

        A process of the same device that still runs is kept (and stopped at the end).
        `environment` adds variables (libfaketime's); `state` names another state
        directory (a second board with the same id).
        """
        self.starts[device] += 1
        previous = self.processes.get(device)
        if previous is not None and previous.poll() is None:
            self.replaced.append(previous)
        command = [
            sys.executable, "-m", "edgedi.agent.cli", "agent",
            "--broker", f"{self.broker.host}:{self.broker.port}",
            "--id", device,
            "--topic-root", self.root.prefix,
            "--cluster", self.root.cluster,
            "--threads", "1",
            "--profile-seconds", "0.3",
            "--slowdown", str(self.slowdown),
            "--models", MODEL,
            "--input-size", str(INPUT_SIZE),
            "--priority", str(priority),
            "--state-dir", str(self.folder / f"state-{state or device}"),
            "--log-level", "info",
        ]  # fmt: skip
        variables = {k: v for k, v in os.environ.items() if not k.startswith("EDGEDI_")}
        variables.pop("NOTIFY_SOCKET", None)
        variables.update(environment or {})
        log = self.log_path(device).open("ab")
        try:
            process = self.processes[device] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=variables
            )
        finally:
            log.close()
        return process

    def kill(self, device: str) -> None:
        """SIGKILL: no drain, no goodbye; the broker fires its Will."""
        process = self.processes[device]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def freeze(self, device: str) -> None:
        """SIGSTOP: the process stalls with its connection open, like a hung device or a
        silent network loss (no Will until the broker's keepalive runs out)."""
        self.processes[device].send_signal(signal.SIGSTOP)

    def thaw(self, device: str) -> None:
        self.processes[device].send_signal(signal.SIGCONT)

    def log_path(self, device: str) -> Path:
        return self.folder / f"{device}.log"

    def logs(self) -> str:
        parts = []
        for device in sorted(self.processes):
            text = self.log_path(device).read_text(errors="replace")
            parts.append(f"===== {device} =====\n{text[-5000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        everything = [*self.processes.values(), *self.replaced]
        for process in everything:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a frozen agent cannot drain
                process.send_signal(signal.SIGTERM)
        for process in everything:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@asynccontextmanager
async def fault_cluster(
    folder: Path,
    devices: dict[str, int],
    slowdown: float = 20.0,
    environments: dict[str, dict[str, str]] | None = None,
    broker_kind: Preference = "auto",
) -> AsyncIterator[FaultCluster]:
    """Agents `devices` (name → election priority, lower wins) on a private broker (of
    `broker_kind`); `environments` adds variables to some agents' environment."""
    broker = await asyncio.to_thread(start_broker, prefer=broker_kind)
    root = TopicRoot(prefix=f"edgedi-faults/{uuid.uuid4().hex[:10]}", cluster="faults")
    cluster = FaultCluster(broker, root, folder, slowdown)
    passed = False
    try:
        for device, priority in devices.items():
            cluster.start(device, priority, environment=(environments or {}).get(device))
        yield cluster
        passed = True
    finally:
        cluster.stop()
        broker.stop()
        if not passed:
            sys.stderr.write(cluster.logs())


class ResultLog:
    """Every result and leader record published in a cluster, with arrival times."""

    def __init__(self, session: MqttSession) -> None:
        self.session = session
        self.results: dict[str, list[JobResult]] = defaultdict(list)
        self.leaders: list[tuple[float, LeaderRecord]] = []

    async def start(self) -> None:
        await self.session.subscribe(JOB_RESULT, self._on_result)
        await self.session.subscribe(PLANNER_LEADER, self._on_leader)

    async def _on_result(self, received: Received) -> None:
        assert isinstance(received.message, JobResult)
        self.results[received.message.job_id].append(received.message)

    async def _on_leader(self, received: Received) -> None:
        assert isinstance(received.message, LeaderRecord)
        self.leaders.append((time.monotonic(), received.message))

    def leader(self) -> LeaderRecord | None:
        return max((record for _, record in self.leaders), key=lambda r: r.epoch, default=None)

    def distinct_answers(self, job_id: str) -> int:
        """How many different answers were published for a job (a re-publication of
        the cached result is the same answer)."""
        return len({_answer(result) for result in self.results.get(job_id, [])})


def _answer(result: JobResult) -> tuple[Any, ...]:
    # Not the sender or epoch: a leader re-publishing a cached answer (a predecessor's,
    # perhaps) says it as itself. A second computation has timings of its own.
    timings = tuple(sorted(result.latency_ms.items()))
    return (result.status, result.probabilities, result.error, result.plan_id, timings)


@asynccontextmanager
async def observed(cluster: FaultCluster) -> AsyncIterator[tuple[InferenceClient, ResultLog]]:
    """A client and a result log on the cluster's broker."""
    settings = SessionSettings(
        host=cluster.broker.host, port=cluster.broker.port, client_id=f"log-{uuid.uuid4().hex[:8]}"
    )
    session = MqttSession(settings, cluster.root)
    log = ResultLog(session)
    await log.start()
    async with asyncio.TaskGroup() as group:
        group.create_task(session.run(), name="result-log")
        try:
            await session.wait_connected(10.0)
            async with connect(
                cluster.broker.host, cluster.broker.port, root=cluster.root
            ) as client:
                yield client, log
        finally:
            session.request_stop()


async def wait_for_plan(client: InferenceClient, devices: set[str]) -> float:
    """Until the retained plan names exactly `devices`; returns the seconds it took."""
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    while time.monotonic() < deadline:
        announcement = await client.current_plan(timeout=0.5)
        if announcement is not None and set(announcement.plan.devices) == devices:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no plan naming {sorted(devices)} within {START_TIMEOUT_S} s")
