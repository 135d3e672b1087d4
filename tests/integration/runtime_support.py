"""Helpers for the runtime's integration tests: in-process agents on the test broker.

Each agent runs `Agent.run()` as a task of the test's loop with one torch thread,
a fixed profile (no start-up benchmark) and a short election settle time, so a
cluster of three is up in about a second. `running_cluster` always stops every
agent, also when the test fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from edgedi.agent.config import AgentSettings
from edgedi.agent.device import ProfileTable
from edgedi.agent.model_store import TORCH_RNG_LOCK
from edgedi.agent.runtime import Agent
from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import TopicRoot

MODELS = ("tiny-edgedi", "tiny")
INPUT_SIZE = 48


def profile(speed: float = 1.0) -> ProfileTable:
    """A plausible fitted profile; `speed` > 1 is a faster device."""
    base = {
        "conv1x1": (1.0e-10, 2e-6),
        "conv3x3": (1.2e-10, 3e-6),
        "convkxk": (1.5e-10, 3e-6),
        "depthwise": (4e-10, 3e-6),
        "pool": (3e-10, 2e-6),
        "gate": (5e-10, 5e-6),
        "fc": (2e-10, 2e-6),
    }
    return {name: (a / speed, b / speed) for name, (a, b) in base.items()}


def agent_settings(
    broker: BrokerHandle, root: TopicRoot, device_id: str, **sections: dict[str, Any]
) -> AgentSettings:
    values: dict[str, Any] = {
        "device_id": device_id,
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "topic_root": root.prefix,
            "cluster": root.cluster,
            "link_mbit_s": 1000.0,
        },
        # The tests set each device's speed through its announced profile (`profile`)
        # and plan with a strategy that uses every device; the measured tile costs and
        # `auto` have tests of their own.
        "compute": {
            "threads": 1,
            "models": list(MODELS),
            "input_size": INPUT_SIZE,
            "measure_tiles": False,
        },
        "planner": {"strategy": "edgeci"},
        "jobs": {"drain_s": 2.0, "deadline_s": 20.0},
    }
    for section, overrides in sections.items():
        values.setdefault(section, {}).update(overrides)
    return AgentSettings(**values)


@dataclass
class Cluster:
    broker: BrokerHandle
    root: TopicRoot
    agents: list[Agent] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, device_id: str, speed: float = 1.0, **sections: dict[str, Any]) -> Agent:
        settings = agent_settings(self.broker, self.root, device_id, **sections)
        agent = Agent(settings, profile=profile(speed), settle_s=0.3, identity_check_s=0.3)
        self.agents.append(agent)
        self.tasks.append(asyncio.create_task(agent.run(), name=f"agent-{device_id}"))
        return agent

    def leaders(self) -> list[Agent]:
        return [agent for agent in self.running() if agent.is_leader]

    def leader(self) -> Agent:
        leaders = self.leaders()
        assert len(leaders) == 1, [agent.device_id for agent in leaders]
        return leaders[0]

    async def wait_for_plan(self, devices: int | None = None, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Until one leader leads and every running agent holds its plan."""
        wanted = len(self.running()) if devices is None else devices
        async with asyncio.timeout(timeout):
            while True:
                running = self.running()
                leaders = [agent for agent in running if agent.is_leader]
                plans = [agent.current_plan for agent in running]
                if (
                    len(leaders) == 1
                    and all(plan is not None for plan in plans)
                    and all(
                        plan is not None
                        and plan.epoch == leaders[0].election.epoch
                        and len(plan.plan.devices) == wanted
                        for plan in plans
                    )
                ):
                    return
                await asyncio.sleep(0.05)

    def running(self) -> list[Agent]:
        return [
            agent for agent, task in zip(self.agents, self.tasks, strict=True) if not task.done()
        ]

    async def stop(self, agent: Agent, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        task = self.tasks[self.agents.index(agent)]
        agent.request_stop()
        async with asyncio.timeout(timeout):
            await task

    async def stop_all(self) -> None:
        for agent in self.agents:
            agent.request_stop()
        try:
            async with asyncio.timeout(20):
                await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        failures = [task.exception() for task in self.tasks if not task.cancelled()]
        errors = [error for error in failures if error is not None]
        if errors:
            raise errors[0]


@asynccontextmanager
async def running_cluster(
    broker: BrokerHandle,
    root: TopicRoot,
    speeds: Sequence[float] = (1.0, 1.0, 1.0),
    **sections: dict[str, Any],
) -> AsyncIterator[Cluster]:
    cluster = Cluster(broker, root)
    try:
        for position, speed in enumerate(speeds):
            cluster.start(f"agent-{position + 1}", speed, **sections)
        yield cluster
    finally:
        await cluster.stop_all()


def sample_image(seed: int = 0, size: int = INPUT_SIZE) -> npt.NDArray[np.uint8]:
    from edgedi.models.data import generate_image

    return generate_image(seed % 6, seed, size, 0)


_REFERENCE_MODELS: dict[tuple[str, int], Any] = {}


def reference_probabilities(
    model_name: str, image: npt.NDArray[np.uint8], size: int = INPUT_SIZE
) -> npt.NDArray[np.float64]:
    """Single-process inference of the same model and weights (a plain forward)."""
    from edgedi.models.checkpoints import load_model
    from edgedi.models.training import normalize

    torch.set_num_threads(1)
    key = (model_name, size)
    if key not in _REFERENCE_MODELS:
        with TORCH_RNG_LOCK:  # agents of this process may be building models too
            _REFERENCE_MODELS[key] = load_model(model_name, size)[0]
    model = _REFERENCE_MODELS[key]
    with torch.inference_mode():
        logits = model(normalize(np.array(image)[None])).double()
    return torch.softmax(logits, dim=1).numpy().reshape(-1)


def elapsed_since(start: float) -> float:
    return time.perf_counter() - start
