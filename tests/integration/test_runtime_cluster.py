"""The runtime end to end, in-process: election, plans, exact results, idempotent jobs.

Three agents (one torch thread each) run on the test's event loop against the real
broker fixture (Mosquitto and the embedded amqtt); jobs go in through the async
client, as `edgedi infer` sends them.
"""

from __future__ import annotations

import asyncio

import numpy as np
from runtime_support import (
    INPUT_SIZE,
    reference_probabilities,
    running_cluster,
    sample_image,
)

from edgedi.agent.client import connect
from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import TopicRoot
from edgedi.planner.strategies import strategy_names


async def test_one_leader_is_elected_and_publishes_a_plan(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root) as cluster:
        await cluster.wait_for_plan()
        leader = cluster.leader()
        views = {agent.leader for agent in cluster.agents}
        assert views == {(leader.device_id, leader.election.epoch)}
        assert leader.election.epoch >= 1
        async with connect(broker.host, broker.port, root=topic_root) as client:
            record = await client.leader(timeout=5)
            announcement = await client.current_plan(timeout=5)
        assert record is not None and record.device == leader.device_id
        assert announcement is not None
        assert announcement.plan.leader == leader.device_id
        assert announcement.plan.input_shape == (1, INPUT_SIZE, INPUT_SIZE)
        assert set(announcement.plan.devices) == {agent.device_id for agent in cluster.agents}


async def test_every_strategy_gives_the_single_process_result(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root, speeds=(1.0, 2.0, 0.7)) as cluster:
        await cluster.wait_for_plan()
        async with connect(broker.host, broker.port, root=topic_root) as client:
            for position, strategy in enumerate(strategy_names()):
                for model in ("tiny-edgedi", "tiny"):
                    image = sample_image(position)
                    result = await client.infer(image, model, strategy=strategy, timeout=30)
                    assert result.status == "ok", (strategy, model, result.error)
                    expected = reference_probabilities(model, image)
                    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
                    assert result.label == int(np.argmax(expected))
                    # `auto` names the candidate it chose, e.g. auto:edgeci/2.
                    assert result.strategy is not None
                    assert result.strategy.split(":")[0] == strategy
                    assert result.model == model
                    assert result.latency_ms["total"] > 0


async def test_jobs_in_flight_at_once_all_complete(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root) as cluster:
        await cluster.wait_for_plan()
        async with connect(broker.host, broker.port, root=topic_root) as client:
            images = [sample_image(seed) for seed in range(6)]
            results = await asyncio.gather(
                *(client.infer(image, "tiny-edgedi", strategy="equal") for image in images)
            )
        for image, result in zip(images, results, strict=True):
            assert result.status == "ok", result.error
            expected = reference_probabilities("tiny-edgedi", image)
            np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
        assert len({result.job_id for result in results}) == len(images)


async def test_a_resubmitted_job_is_answered_from_the_cache(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root, speeds=(1.0, 1.0)) as cluster:
        await cluster.wait_for_plan()
        async with connect(broker.host, broker.port, root=topic_root) as client:
            image = sample_image(3)
            first = await client.infer(image, "tiny", job_id="same-job")
            again = await client.infer(image, "tiny", job_id="same-job")
        assert first.status == again.status == "ok"
        assert again.probabilities == first.probabilities
        assert again.message_id == first.message_id  # the cached message, not a re-run
        statistics = cluster.leader().coordinator
        assert statistics is not None
        assert statistics.statistics.completed == 1
        assert statistics.statistics.duplicates == 1


async def test_devices_measure_their_link_and_tiles_and_plan_auto_with_them(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    """Agents time real tiles and round trips through the broker, announce both (the
    settings' bandwidth overrides the measured one; the latency is measured), and
    `auto` plans from them; its jobs equal the single-process result."""
    settings = {"compute": {"measure_tiles": True}, "planner": {"strategy": "auto"}}
    async with running_cluster(broker, topic_root, **settings) as cluster:
        await cluster.wait_for_plan()
        async with asyncio.timeout(30):
            while any(a.measured_link is None for a in cluster.agents):  # noqa: ASYNC110 - agents' state
                await asyncio.sleep(0.05)
        leader = cluster.leader()
        for agent in cluster.agents:
            assert agent.measured_link is not None
            birth = leader.births[agent.device_id]
            assert birth.link is not None
            assert birth.link.latency_seconds == agent.measured_link.latency_s
            assert birth.link.bandwidth_bytes_per_second == 1000.0 * 1e6 / 8  # announced
            assert set(birth.unit_profiles) == set(agent.store.held)
        async with connect(broker.host, broker.port, root=topic_root) as client:
            for model in ("tiny-edgedi", "tiny"):
                image = sample_image(3)
                result = await client.infer(image, model, timeout=30)
                assert result.status == "ok", result.error
                assert result.strategy is not None and result.strategy.startswith("auto:")
                assert result.latency_ms["predicted"] > 0
                expected = reference_probabilities(model, image)
                np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)


async def test_a_traced_job_carries_every_tile_timeline(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root, speeds=(1.0, 1.0, 1.0)) as cluster:
        await cluster.wait_for_plan()
        async with connect(broker.host, broker.port, root=topic_root) as client:
            image = sample_image(5)
            result = await client.infer(image, "tiny-edgedi", strategy="equal", trace=True)
            plain = await client.infer(image, "tiny-edgedi", strategy="equal")
        assert result.status == "ok", result.error
        np.testing.assert_allclose(
            result.probabilities, reference_probabilities("tiny-edgedi", image), atol=1e-5
        )
        assert plain.trace == ()  # only asked-for traces travel
        total = result.latency_ms["total"]
        # Every tile of every segment sent its timeline, and the leader added its own.
        computed = {(s.device, s.segment, s.tile) for s in result.trace if s.what == "compute"}
        leader = cluster.leader().device_id
        announcement_devices = {agent.device_id for agent in cluster.agents}
        assert {device for device, _, _ in computed} == announcement_devices
        segments = {segment for _, segment, _ in computed}
        assert segments == set(range(max(segments) + 1))
        assert {(s.device, s.what) for s in result.trace} >= {(leader, "scatter"), (leader, "tail")}
        # The plan's own prediction of the same job comes with it, from the same origin.
        predicted = {(s.device, s.what) for s in result.predicted_trace}
        assert (leader, "tail") in predicted
        assert {d for d, what in predicted if what == "compute"} == announcement_devices
        for span in result.trace:
            assert span.start_ms <= span.end_ms
            # One clock on this machine: every interval lies within the job.
            assert span.start_ms >= -1.0 and span.end_ms <= total + 1.0, span
