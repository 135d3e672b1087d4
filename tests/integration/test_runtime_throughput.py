"""Throughput mode end to end: a stream of images under the `images` strategy.

Four agents on the real broker fixture, a client keeping eight jobs in flight, as
`bench/throughput.py` does: every job comes back once, exactly as a single-process
forward pass says, and every device computed whole images of the stream.
"""

from __future__ import annotations

import asyncio

import numpy as np
from runtime_support import reference_probabilities, running_cluster, sample_image

from edgedi.agent.client import connect
from edgedi.broker.messages import JobResult
from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import TopicRoot

MODEL = "tiny-edgedi"
IMAGES = 32
IN_FLIGHT = 8


async def test_a_stream_of_whole_images_is_computed_by_every_device_exactly(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root, speeds=(1.0, 1.0, 1.0, 1.0)) as cluster:
        await cluster.wait_for_plan()
        before = {agent.device_id: agent.worker.statistics.completed for agent in cluster.agents}
        images = [sample_image(seed) for seed in range(IMAGES)]
        async with connect(broker.host, broker.port, root=topic_root) as client:
            slots = asyncio.Semaphore(IN_FLIGHT)

            async def one(image: np.ndarray) -> JobResult:
                async with slots:
                    return await client.infer(image, MODEL, strategy="images", timeout=60)

            results = await asyncio.gather(*(one(image) for image in images))
        leader = cluster.leader()
        assert leader.coordinator is not None
        statistics = leader.coordinator.statistics
        computed = {
            agent.device_id: agent.worker.statistics.completed - before[agent.device_id]
            for agent in cluster.agents
        }

    for image, result in zip(images, results, strict=True):
        assert result.status == "ok", result.error
        assert result.strategy == "images"
        expected = reference_probabilities(MODEL, image)
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
        assert result.label == int(np.argmax(expected))
    assert len({result.job_id for result in results}) == IMAGES
    assert statistics.completed == IMAGES and statistics.errors == 0
    # Every device took part in the stream; every image was computed (a speculative
    # copy of a late one may add a second computation, never remove one).
    assert all(count > 0 for count in computed.values()), computed
    assert sum(computed.values()) >= IMAGES
    # Each image ran whole on one device; the tail on the leader.
    for result in results:
        assert set(result.devices) <= {leader.device_id, *computed}
        assert 1 <= len(result.devices) <= 2
