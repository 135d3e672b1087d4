"""Hostile conditions at in-process agents on a real broker.

A busy or flooded agent judges nobody gone. Silence is judged on a clock that
stands still while the agent's own loop could not read (`edgedi.agent.loop_lag`).
All agents of this test share one event loop, so
blocking it stalls every one of them at once, as a busy machine would: their
heartbeats pile up unread, and afterwards none may declare another gone.

Ghosts (devices that announce themselves, are born again and again, and never
compute) get one trial tile each per probation period, not one per job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

import pytest
from runtime_support import MODELS, profile, running_cluster, sample_image

from edgedi.agent.client import connect
from edgedi.agent.membership import SILENT_AFTER_S
from edgedi.agent.tile_tracker import SUSPECT_S as PROBATION_S
from edgedi.broker.connection import MqttSession, Received
from edgedi.broker.messages import (
    DeviceBirth,
    DeviceCapabilities,
    DeviceState,
    Heartbeat,
    LinkEstimate,
    TileTask,
)
from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import (
    DEVICE_BIRTH,
    DEVICE_HEARTBEAT,
    DEVICE_STATE,
    DEVICE_TASKS,
    TopicRoot,
)

MODEL = "tiny-edgedi"
# The `sessions` fixture of conftest (not imported: the system tests have a conftest too).
SessionFactory = Callable[..., Awaitable[MqttSession]]


async def test_a_stalled_loop_declares_no_departure(
    broker: BrokerHandle, topic_root: TopicRoot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgedi.agent.runtime")
    async with running_cluster(broker, topic_root) as cluster:
        await cluster.wait_for_plan()
        leader = cluster.leader()
        caplog.clear()
        # Longer than the silence bound, shorter than the broker's keepalive limit.
        time.sleep(SILENT_AFTER_S + 1.5)  # noqa: ASYNC251 - the stall under test
        await asyncio.sleep(2.0)
        departures = [r.getMessage() for r in caplog.records if "membership:" in r.getMessage()]
        assert not [line for line in departures if not line.endswith("left -")], departures
        assert cluster.leader() is leader
        assert all(
            len(agent.membership.alive(agent.loop_lag.judged())) == 3 for agent in cluster.agents
        )
        assert min(agent.loop_lag.worst_s for agent in cluster.agents) > SILENT_AFTER_S
        async with connect(broker.host, broker.port, root=topic_root) as client:
            result = await client.infer(sample_image(3), MODEL, timeout=20)
        assert result.status == "ok", result.error


class Ghost:
    """A device that announces itself (and is born again every `rebirth_s`, with a new
    session), heartbeats, holds the models, and never computes a tile it is given."""

    def __init__(self, session: MqttSession, device: str, rebirth_s: float) -> None:
        self.session = session
        self.device = device
        self.rebirth_s = rebirth_s
        self.jobs: set[str] = set()
        """Jobs that gave it work (a direct run gives a device all its tasks at once)."""
        self.session_counter = 1

    async def on_task(self, received: Received) -> None:
        if isinstance(received.message, TileTask):
            self.jobs.add(received.message.job_id)

    async def haunt(self) -> None:
        await self.session.subscribe(DEVICE_TASKS, self.on_task, device=self.device)
        born_at = -math.inf
        sequence = 0
        while True:
            now = time.monotonic()
            if now - born_at >= self.rebirth_s:
                born_at = now
                self.session_counter += 1
                await self.announce()
            sequence += 1
            beat = Heartbeat(
                sender=self.device,
                device=self.device,
                session=self.session_counter,
                sequence=sequence,
                load=0.0,
                busy_tiles=0,
            )
            await self.session.publish(DEVICE_HEARTBEAT, beat, device=self.device)
            await asyncio.sleep(0.5)

    async def announce(self) -> None:
        birth = DeviceBirth(
            sender=self.device,
            device=self.device,
            session=self.session_counter,
            candidate=False,
            capabilities=DeviceCapabilities(
                cores=4,
                memory_bytes=2**30,
                machine="ghost",
                software_version="0",
                models=MODELS,
            ),
            profile=profile(4.0),  # claims to be fast: the planner wants it
            link=LinkEstimate(bandwidth_bytes_per_second=1.25e8, latency_seconds=1e-4),
        )
        state = DeviceState(
            sender=self.device, device=self.device, session=self.session_counter, status="online"
        )
        await self.session.publish(DEVICE_BIRTH, birth, device=self.device)
        await self.session.publish(DEVICE_STATE, state, device=self.device)


async def test_ghosts_that_never_answer_get_one_trial_tile(
    broker: BrokerHandle, topic_root: TopicRoot, sessions: SessionFactory
) -> None:
    jobs = {"straggler_min_s": 0.3, "straggler_factor": 2.0, "deadline_s": 30.0}
    async with running_cluster(broker, topic_root, speeds=(1.0, 1.0), jobs=jobs) as cluster:
        await cluster.wait_for_plan(devices=2)
        ghosts = [
            Ghost(await sessions(f"ghost-{number}"), f"ghost-{number}", rebirth_s=1.5)
            for number in range(3)
        ]
        haunting = [asyncio.create_task(ghost.haunt()) for ghost in ghosts]
        try:
            await cluster.wait_for_plan(devices=5)
            started = time.monotonic()
            async with connect(broker.host, broker.port, root=topic_root) as client:
                number = 0
                # Long enough for every ghost to be born again a few times.
                while number < 12 or time.monotonic() - started < 4.5:
                    number += 1
                    result = await client.infer(
                        sample_image(number), MODEL, strategy="equal", timeout=30
                    )
                    assert result.status == "ok", result.error
            elapsed = time.monotonic() - started
        finally:
            for task in haunting:
                task.cancel()
            await asyncio.gather(*haunting, return_exceptions=True)
    # One trial per ghost, and one more per probation period that has passed; never
    # one per job (or one per re-birth).
    trials = 1 + math.ceil(elapsed / PROBATION_S)
    assert all(1 <= len(ghost.jobs) <= trials for ghost in ghosts), (
        [len(ghost.jobs) for ghost in ghosts],
        elapsed,
    )
