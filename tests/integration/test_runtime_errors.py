"""Bad input never takes an agent down, and every job ends with one result or one error.

Garbage from a raw paho client (not our code) on every topic an agent listens to,
jobs that cannot run (unknown model, wrong image shape or dtype, NaN, unknown
strategy, a deadline too short), tile tasks a worker must refuse, a flood of tasks
beyond the worker's queue: each is answered where someone waits, counted, and a
following job still completes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as paho
import pytest
from runtime_support import INPUT_SIZE, reference_probabilities, running_cluster, sample_image

from edgedi.agent.client import connect
from edgedi.agent.layout import segment_layout
from edgedi.agent.runtime import Agent
from edgedi.broker.connection import MqttSession, Received
from edgedi.broker.messages import (
    SCHEMA_VERSION,
    JobResult,
    JobSubmit,
    TileFailed,
    TileResult,
    TileTask,
)
from edgedi.broker.server import BrokerHandle
from edgedi.broker.tensors import Tensor
from edgedi.broker.topics import DEVICE_TASKS, JOB_RESULT, JOB_SUBMIT, JOB_TILES, TopicRoot
from edgedi.models.specs import get_spec


def publish_raw(broker: BrokerHandle, items: list[tuple[str, bytes]]) -> None:
    """Publish with plain paho (QoS 1), waiting for every PUBACK."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in items:
            client.publish(topic, payload, qos=1).wait_for_publish(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()


def garbage(root: TopicRoot, device: str) -> list[tuple[str, bytes]]:
    base = root.base
    huge = b"\x92" + b"\x00" * (2 * 1024 * 1024)
    bad_tensor = msgpack.packb(
        {
            "version": SCHEMA_VERSION,
            "kind": "job_submit",
            "sender": "raw",
            "message_id": uuid.uuid4().hex,
            "sent_at": time.time(),
            "job_id": "bad-tensor",
            "model": "tiny",
            "image": {"dtype": "float32", "shape": [1, 48, 48], "data": b"\x00" * 12},
            "client": "raw",
            "submitted_at": time.time(),
        }
    )
    payloads = [
        b"\x00\x01\x02 not msgpack at all",
        b"{not json",
        msgpack.packb({"version": 99, "kind": "job_submit"}),
        msgpack.packb({"version": SCHEMA_VERSION, "kind": "no_such_kind"}),
        msgpack.packb([1, 2, 3]),
        huge,
    ]
    topics = [
        f"{base}/jobs/submit",
        f"{base}/devices/{device}/tasks",
        f"{base}/jobs/some-job/gates",
        f"{base}/jobs/some-job/partials/{device}",
        f"{base}/jobs/some-job/tiles/{device}",
        f"{base}/devices/{device}/birth",
        f"{base}/devices/{device}/heartbeat",
        f"{base}/planner/leader",
        f"{base}/plans/current",
    ]
    items = [(topic, payload) for topic in topics for payload in payloads]
    items.append((f"{base}/jobs/submit", bad_tensor))
    items.append((f"{base}/devices/{device}/tasks", bad_tensor))
    return items


async def test_garbage_on_every_topic_does_not_stop_the_agents(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(
        broker, topic_root, speeds=(1.0, 1.0), jobs={"max_payload_bytes": 1024 * 1024}
    ) as cluster:
        await cluster.wait_for_plan()
        for agent in cluster.agents:
            await asyncio.to_thread(publish_raw, broker, garbage(topic_root, agent.device_id))
        async with connect(broker.host, broker.port, root=topic_root) as client:
            image = sample_image(2)
            result = await client.infer(image, "tiny-edgedi", strategy="equal", timeout=20)
        assert result.status == "ok", result.error
        np.testing.assert_allclose(
            result.probabilities, reference_probabilities("tiny-edgedi", image), atol=1e-5
        )
        assert all(not task.done() for task in cluster.tasks)
        for agent in cluster.agents:
            assert agent.session.statistics.dropped_malformed > 0
        assert cluster.leader().is_leader


async def _submit_raw(session: MqttSession, message: JobSubmit) -> JobResult:
    future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()

    async def on_result(received: Received) -> None:
        if isinstance(received.message, JobResult) and not future.done():
            future.set_result(received.message)

    subscription = await session.subscribe(JOB_RESULT, on_result, job_id=message.job_id)
    try:
        await session.publish(JOB_SUBMIT, message)
        async with asyncio.timeout(15):
            return await future
    finally:
        await session.unsubscribe(subscription)


def _submit(
    job_id: str, image: np.ndarray[Any, Any], model: str = "tiny", **extra: Any
) -> JobSubmit:
    return JobSubmit(
        sender="tester",
        job_id=job_id,  # type: ignore[arg-type]
        model=model,
        image=Tensor(image),
        client="tester",
        submitted_at=time.time(),
        **extra,
    )


async def test_jobs_that_cannot_run_get_one_explicit_error_each(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root, speeds=(1.0, 1.0)) as cluster:
        await cluster.wait_for_plan()
        async with connect(broker.host, broker.port, root=topic_root) as client:
            image = sample_image(1)
            nan_image = image.astype(np.float32)
            nan_image[3, 4] = np.nan
            cases = {
                "unknown-model": (
                    _submit("unknown-model", image[None], model="nope"),
                    "unknown model",
                ),
                "bad-shape": (_submit("bad-shape", image[None, :20, :20]), "bad image: shape"),
                "bad-dtype": (_submit("bad-dtype", image[None].astype(np.int64)), "dtype int64"),
                "not-finite": (_submit("not-finite", nan_image[None]), "NaN"),
                "bad-strategy": (_submit("bad-strategy", image[None], strategy="nope"), "strategy"),
                "too-late": (_submit("too-late", image[None], deadline_seconds=1e-4), "deadline"),
            }
            for job_id, (message, expected) in cases.items():
                result = await _submit_raw(client.session, message)
                assert result.job_id == job_id
                assert result.status == "error"
                assert result.error is not None and expected in result.error, result.error
            good = await client.infer(image, "tiny", timeout=20)
        assert good.status == "ok", good.error
        coordinator = cluster.leader().coordinator
        assert coordinator is not None
        assert coordinator.statistics.errors == len(cases)


def _tile_task(
    device: str, epoch: int, job_id: str, *, shape_delta: int = 0, model: str = "tiny-edgedi"
) -> TileTask:
    """A valid whole-map task for the gated segment of tiny-edgedi (units 0..3)."""
    spec = get_spec("tiny-edgedi", INPUT_SIZE)
    height = spec.units[3].out_shape[1]
    layout = segment_layout(spec, 0, 3, [(0, height)])
    _, channels, rows, columns = layout.input_shape(0)
    tensor = np.zeros((1, channels, rows + shape_delta, columns), dtype=np.float32)
    return TileTask(
        sender="tester",
        job_id=job_id,  # type: ignore[arg-type]
        epoch=epoch,
        plan_id="test-plan",
        device=device,  # type: ignore[arg-type]
        model=model,
        model_digest=spec.digest(),
        input_size=INPUT_SIZE,
        segment=0,
        first_unit=0,
        last_unit=3,
        row_parts=((0, height),),
        tile=0,
        input_rows=(0, rows),
        output_rows=(0, height),
        tensor=Tensor(tensor),
        deadline=time.time() + 30,
    )


async def _tile_outcomes(
    session: MqttSession, worker: Agent, tasks: list[TileTask], wait: float
) -> list[TileFailed | TileResult]:
    outcomes: list[TileFailed | TileResult] = []

    async def on_tile(received: Received) -> None:
        assert isinstance(received.message, TileFailed | TileResult)
        outcomes.append(received.message)

    subscription = await session.subscribe(JOB_TILES, on_tile)
    try:
        for task in tasks:
            await session.publish(DEVICE_TASKS, task, device=worker.device_id)
        await asyncio.sleep(wait)
    finally:
        await session.unsubscribe(subscription)
    return outcomes


async def test_a_worker_refuses_bad_tasks_and_floods_with_tile_failed(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(
        broker,
        topic_root,
        speeds=(1.0, 1.0),
        compute={"max_active_tiles": 1, "max_queued_tiles": 2},
    ) as cluster:
        await cluster.wait_for_plan()
        worker = next(agent for agent in cluster.agents if not agent.is_leader)
        epoch = cluster.leader().election.epoch
        async with connect(broker.host, broker.port, root=topic_root) as client:
            bad = [
                _tile_task(worker.device_id, epoch, "wrong-shape", shape_delta=1),
                _tile_task(worker.device_id, epoch, "no-model", model="resnet18-edgedi"),
                _tile_task(worker.device_id, epoch - 1, "stale-epoch"),
            ]
            outcomes = await _tile_outcomes(client.session, worker, bad, wait=1.0)
            reasons = {o.job_id: o.reason for o in outcomes if isinstance(o, TileFailed)}
            assert "input tensor has shape" in reasons["wrong-shape"]
            assert "not held" in reasons["no-model"]
            assert "stale-epoch" not in reasons  # a deposed leader's task is ignored
            assert worker.worker.statistics.stale_epoch == 1

            # Each flood task waits at its gate forever (nobody combines the partials):
            # one runs, two wait in the queue, the rest are refused at once.
            flood = [_tile_task(worker.device_id, epoch, f"flood-{n}") for n in range(6)]
            outcomes = await _tile_outcomes(client.session, worker, flood, wait=1.0)
            refused = [o for o in outcomes if isinstance(o, TileFailed)]
            assert len(refused) == 3
            assert all("overloaded" in o.reason for o in refused)
            assert worker.worker.busy_tiles == 3

            # The worker still works: a real job completes (it uses the other slots too,
            # once the stuck tiles are cancelled by their deadline or a CancelJob).
            for task in flood[:3]:
                worker.worker.drop_job(task.job_id, "test over")
            image = sample_image(4)
            result = await client.infer(image, "tiny-edgedi", strategy="equal", timeout=20)
        assert result.status == "ok", result.error


@pytest.mark.parametrize("graceful", [True, False], ids=["stopped", "crashed"])
async def test_a_new_leader_takes_over(
    broker: BrokerHandle, topic_root: TopicRoot, graceful: bool
) -> None:
    async with running_cluster(broker, topic_root) as cluster:
        await cluster.wait_for_plan()
        first = cluster.leader()
        first_epoch = first.election.epoch
        if graceful:
            await cluster.stop(first)
        else:  # no Will (a clean disconnect) and no heartbeat: found silent after ~3 s
            task = cluster.tasks[cluster.agents.index(first)]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with connect(broker.host, broker.port, root=topic_root) as client:
            image = sample_image(5)
            # Submitted at once: nobody may lead yet; a retry with the same job id
            # reaches the new leader.
            result = await client.infer(
                image, "tiny-edgedi", strategy="equal", timeout=30, retry_s=2
            )
            assert result.status == "ok", result.error
            np.testing.assert_allclose(
                result.probabilities, reference_probabilities("tiny-edgedi", image), atol=1e-5
            )
            await cluster.wait_for_plan(devices=2)
        second = cluster.leader()
        assert second is not first
        assert second.election.epoch > first_epoch
        assert result.epoch == second.election.epoch


async def test_tiles_of_a_device_that_vanishes_are_redispatched(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root) as cluster:
        await cluster.wait_for_plan()
        victim = next(agent for agent in cluster.agents if not agent.is_leader)
        task = cluster.tasks[cluster.agents.index(victim)]
        async with connect(broker.host, broker.port, root=topic_root) as client:
            # Connected first: the job must reach the leader well before the victim's
            # silence (~3 s) does, or the plan no longer names it.
            image = sample_image(0)
            task.cancel()  # a crash without a Will: only its silence gives it away
            await asyncio.gather(task, return_exceptions=True)
            result = await client.infer(image, "tiny-edgedi", strategy="equal", timeout=30)
        assert result.status == "ok", result.error
        np.testing.assert_allclose(
            result.probabilities, reference_probabilities("tiny-edgedi", image), atol=1e-5
        )
        coordinator = cluster.leader().coordinator
        assert coordinator is not None
        # Re-sent when it is found gone, or copied before that when it turns overdue, or
        # the direct run overran and the job was relayed around it.
        statistics = coordinator.statistics
        assert statistics.redispatched + statistics.speculative + statistics.direct_fallbacks >= 1
        assert victim.device_id in result.devices  # it was sent a tile before it was missed
