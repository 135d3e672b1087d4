"""A busy or flooded agent judges nobody gone: in-process agents on a real broker.

Silence is judged on a clock that stands still while the agent's own loop could not
read (`edgedi.agent.loop_lag`). All agents of this test share one event loop, so
blocking it stalls every one of them at once, as a busy machine would: their
heartbeats pile up unread, and afterwards none may declare another gone.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from runtime_support import running_cluster, sample_image

from edgedi.agent.client import connect
from edgedi.agent.membership import SILENT_AFTER_S
from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import TopicRoot

MODEL = "tiny-edgedi"


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
