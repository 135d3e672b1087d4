"""Channel plans end to end: exact results, and no job lost when a device dies mid-job.

In-process agents on the real broker fixture. `channels` asks for `auto`'s best plan
with a channel segment (`edgedi.models.channel_split`): its tiles exchange partial
sums of whole maps peer to peer, once per residual unit.
"""

from __future__ import annotations

import asyncio

import numpy as np
from runtime_support import reference_probabilities, running_cluster, sample_image

from edgedi.agent.client import connect
from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import TopicRoot


async def test_channel_plans_give_the_single_process_result(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root, speeds=(1.0, 2.0, 0.7)) as cluster:
        await cluster.wait_for_plan()
        async with connect(broker.host, broker.port, root=topic_root) as client:
            for seed in range(3):
                for model in ("tiny", "tiny-edgedi"):
                    image = sample_image(seed)
                    result = await client.infer(image, model, strategy="channels", timeout=30)
                    assert result.status == "ok", (model, result.error)
                    # The plan really split channels (e.g. channels:edgeci/3+channels3/3).
                    assert result.strategy is not None and "+channels" in result.strategy
                    expected = reference_probabilities(model, image)
                    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
        leader = cluster.leader()
        assert leader.coordinator is not None
        assert leader.coordinator.statistics.direct_fallbacks == 0
        rounds = sum(agent.worker.statistics.gate_rounds for agent in cluster.agents)
        assert rounds > 0  # the tiles exchanged their partials


async def test_a_device_killed_mid_job_loses_no_channel_job(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    # Slow devices, so the jobs are still running when a worker dies.
    async with running_cluster(
        broker, topic_root, speeds=(1.0, 1.0, 1.0), compute={"slowdown": 20.0}
    ) as cluster:
        await cluster.wait_for_plan()
        leader = cluster.leader()
        victim = next(agent for agent in cluster.agents if agent is not leader)
        images = [sample_image(seed) for seed in range(3)]
        async with connect(broker.host, broker.port, root=topic_root) as client:
            jobs = [
                asyncio.create_task(client.infer(image, "tiny", strategy="channels", timeout=60))
                for image in images
            ]
            async with asyncio.timeout(20):  # the victim holds tiles of a job
                while victim.worker.busy_tiles == 0:  # noqa: ASYNC110 - another agent's state
                    await asyncio.sleep(0.01)
            # A crash: no Will, no goodbye; the leader finds its tiles missing.
            task = cluster.tasks[cluster.agents.index(victim)]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            results = await asyncio.gather(*jobs)
        for image, result in zip(images, results, strict=True):
            assert result.status == "ok", result.error
            np.testing.assert_allclose(
                result.probabilities, reference_probabilities("tiny", image), atol=1e-5
            )
