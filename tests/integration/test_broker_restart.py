"""The broker restarts under a running cluster: nothing is lost but time.

Mosquitto runs with `persistence false`, so a restart loses every retained message
(births, states, the leader record, the plan) and every session. The agents must
reconnect with backoff and announce themselves again, and the leader must publish
its record and plan again; jobs submitted before or while the broker is down must
all end with an ok result equal to single-process inference (the client re-submits
the same job id until it gets one). A graceful stop (SIGTERM) makes Mosquitto
publish every client's Will first, so the agents hear each other go `offline`; a
SIGKILL does not.

Below the cluster, the session: a publish, subscribe or unsubscribe waiting for
the broker's acknowledgement when the broker dies must neither hang until its
operation timeout nor hold up the reconnect; an unacknowledged event is sent again
on the new connection.

The recovery times are printed (`pytest -s`), not asserted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from runtime_support import Cluster, reference_probabilities, running_cluster, sample_image

from edgedi.agent.client import InferenceClient, connect
from edgedi.broker.connection import MqttSession, Received, SessionSettings
from edgedi.broker.errors import BrokerStartError, ConnectionLost
from edgedi.broker.messages import DeviceBirth, DeviceState, JobResult, WireMessage
from edgedi.broker.server import (
    BrokerHandle,
    BrokerKind,
    MosquittoBroker,
    find_mosquitto,
    probe_mqtt,
    start_broker,
    start_mosquitto,
)
from edgedi.broker.topics import (
    DEVICE_BIRTH,
    DEVICE_STATE,
    JOB_RESULT,
    PLANNER_LEADER,
    TopicRoot,
    TopicSpec,
)

MODEL = "tiny-edgedi"
DOWN_S = 2.0
JOB_TIMEOUT_S = 25.0
WAIT_S = 15.0


@pytest.fixture
def mosquitto() -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is not installed")
    handle = start_mosquitto()
    try:
        yield handle
    finally:
        handle.stop()


def _retained(broker: BrokerHandle, topic: str) -> bytes | None:
    """The retained payload on `topic`, read with plain paho (None when there is none)."""
    found: list[bytes] = []
    subscribed = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"read-{uuid.uuid4().hex[:8]}")
    client.on_message = lambda _client, _data, message: found.append(message.payload)
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert subscribed.wait(WAIT_S), "no SUBACK"
        time.sleep(0.3)  # a retained message comes right after the SUBACK
    finally:
        client.disconnect()
        client.loop_stop()
    return found[0] if found else None


def test_a_broker_restarts_on_its_port_and_forgets_what_it_retained(
    broker_kind: BrokerKind,
) -> None:
    topic = f"edgedi-test/{uuid.uuid4().hex[:8]}/retained"
    with start_broker(prefer=broker_kind) as handle:
        port = handle.port
        publisher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="retainer")
        publisher.connect(handle.host, handle.port)
        publisher.loop_start()
        try:
            publisher.publish(topic, b"state", qos=1, retain=True).wait_for_publish(WAIT_S)
        finally:
            publisher.disconnect()
            publisher.loop_stop()
        assert _retained(handle, topic) == b"state"
        handle.halt()
        assert not probe_mqtt(handle.host, port)
        handle.resume()
        assert handle.port == port and probe_mqtt(handle.host, port)
        assert _retained(handle, topic) is None  # nothing persists (the shipped configuration)
        with pytest.raises(BrokerStartError, match="still running"):
            handle.resume()
        handle.restart(down_s=0.1, graceful=False)
        assert probe_mqtt(handle.host, port)


async def _infer(client: InferenceClient, seed: int) -> tuple[int, JobResult, float]:
    result = await client.infer(
        sample_image(seed), MODEL, strategy="equal", timeout=JOB_TIMEOUT_S, retry_s=1.0
    )
    return seed, result, time.perf_counter()


async def _all_reconnected(cluster: Cluster, connects: dict[str, int]) -> float:
    """When every agent has connected again (some back off longer than others)."""

    def everyone_back() -> bool:
        return all(
            agent.session.statistics.connects > connects[agent.device_id]
            and agent.session.connected.is_set()
            for agent in cluster.agents
        )

    async with asyncio.timeout(WAIT_S):
        while not everyone_back():  # noqa: ASYNC110 - polling counters, no event for them
            await asyncio.sleep(0.02)
    return time.perf_counter()


async def _retained_devices(broker: MosquittoBroker, root: TopicRoot) -> dict[str, str]:
    """Device -> retained status, for every device with a retained birth and state."""
    births: set[str] = set()
    states: dict[str, str] = {}

    async def on_birth(received: Received) -> None:
        assert isinstance(received.message, DeviceBirth) and received.retained
        births.add(received.message.device)

    async def on_state(received: Received) -> None:
        assert isinstance(received.message, DeviceState) and received.retained
        states[received.message.device] = received.message.status

    session = MqttSession(
        SessionSettings(
            host=broker.host, port=broker.port, client_id=f"observer-{uuid.uuid4().hex[:8]}"
        ),
        root,
    )
    await session.subscribe(DEVICE_BIRTH, on_birth)
    await session.subscribe(DEVICE_STATE, on_state)
    async with asyncio.TaskGroup() as group:
        group.create_task(session.run(), name="observer")
        try:
            await session.wait_connected(WAIT_S)
            await asyncio.sleep(0.5)  # retained messages come right after the SUBACK
        finally:
            session.request_stop()
    return {device: status for device, status in states.items() if device in births}


# A SIGTERM makes Mosquitto publish every client's Will (each agent's own too) before
# it drops the connections: the agents that hear it last may both claim the next
# epoch. The winner then says its claim again over the loser's retained record, and
# the loser's CancelJob spares the winner's tasks of the same epoch.
@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
async def test_the_cluster_recovers_from_a_broker_restart(
    mosquitto: MosquittoBroker, graceful: bool
) -> None:
    root = TopicRoot(prefix=f"edgedi-test/{uuid.uuid4().hex[:12]}", cluster="test")
    async with running_cluster(mosquitto, root) as cluster:
        await cluster.wait_for_plan()
        leader = cluster.leader()
        epoch = leader.election.epoch
        connects = {agent.device_id: agent.session.statistics.connects for agent in cluster.agents}
        async with connect(mosquitto.host, mosquitto.port, root=root) as client:
            before = [asyncio.create_task(_infer(client, seed)) for seed in range(4)]
            await asyncio.sleep(0.05)  # the first jobs are in flight
            halted = time.perf_counter()
            await asyncio.to_thread(mosquitto.halt, graceful=graceful)
            during = [asyncio.create_task(_infer(client, seed)) for seed in range(4, 8)]
            await asyncio.sleep(DOWN_S)
            await asyncio.to_thread(mosquitto.resume)
            resumed = time.perf_counter()
            reconnected = await _all_reconnected(cluster, connects)
            outcomes = await asyncio.gather(*before, *during)
        for seed, result, _ in outcomes:
            assert result.status == "ok", (seed, result.error)
            expected = reference_probabilities(MODEL, sample_image(seed))
            np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
        assert len({result.job_id for _, result, _ in outcomes}) == len(outcomes)

        # Same leader, or a successor with a higher epoch; its plan names all three.
        await cluster.wait_for_plan(timeout=WAIT_S)
        new_leader = cluster.leader()
        assert new_leader is leader or new_leader.election.epoch > epoch
        # What the broker lost is retained again: a fresh client sees all of it. A
        # stale record may be written last (a device's publish queued over the
        # outage); the leader then says its own again: wait for that, bounded.
        wanted = (new_leader.device_id, new_leader.election.epoch)
        deadline = time.monotonic() + WAIT_S
        while True:
            async with connect(mosquitto.host, mosquitto.port, root=root) as observer:
                record = await observer.leader(timeout=WAIT_S)
                announcement = await observer.current_plan(timeout=WAIT_S)
            current = None if record is None else (record.device, record.epoch)
            if current == wanted or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert record is not None
        assert (record.device, record.epoch) == wanted
        assert announcement is not None and announcement.epoch == new_leader.election.epoch
        assert set(announcement.plan.devices) == {agent.device_id for agent in cluster.agents}
        assert await _retained_devices(mosquitto, root) == {
            agent.device_id: "online" for agent in cluster.agents
        }
        finished = sorted(moment for _, _, moment in outcomes)
        after = [moment - resumed for moment in finished if moment > resumed]
        print(
            f"\n[{'SIGTERM' if graceful else 'SIGKILL'}] broker down {resumed - halted:.2f} s; "
            f"all agents reconnected {reconnected - resumed:.2f} s after it was back; "
            f"first result after it {after[0] if after else float('nan'):.2f} s, "
            f"last {finished[-1] - resumed:.2f} s; "
            f"leader {leader.device_id}@{epoch} -> {new_leader.device_id}@"
            f"{new_leader.election.epoch}; "
            f"publish retries {sum(a.session.statistics.publish_retries for a in cluster.agents)}"
        )


async def test_operations_waiting_for_the_broker_survive_its_restart(
    mosquitto: MosquittoBroker,
) -> None:
    root = TopicRoot(prefix=f"edgedi-test/{uuid.uuid4().hex[:12]}", cluster="test")

    def settings(name: str) -> SessionSettings:
        return SessionSettings(
            host=mosquitto.host,
            port=mosquitto.port,
            client_id=name,
            # Far longer than the test may take: only the connection's loss may end a wait.
            operation_timeout_seconds=120,
            reconnect_initial_seconds=0.05,
            reconnect_max_seconds=0.3,
        )

    received: asyncio.Queue[JobResult] = asyncio.Queue()

    async def on_result(message: Received) -> None:
        assert isinstance(message.message, JobResult)
        await received.put(message.message)

    subscriber = MqttSession(settings("subscriber"), root)
    publisher = MqttSession(settings("publisher"), root)
    waiting: list[asyncio.Task[object]] = []
    async with asyncio.TaskGroup() as group:
        group.create_task(subscriber.run(), name="subscriber")
        group.create_task(publisher.run(), name="publisher")
        try:
            async with asyncio.timeout(WAIT_S):
                await subscriber.wait_connected(WAIT_S)
                await publisher.wait_connected(WAIT_S)
                os.kill(mosquitto.process.pid, signal.SIGSTOP)  # no acknowledgement comes now
                result = JobResult(sender="leader", job_id="late", status="error", error="x")  # type: ignore[arg-type]
                publishing = asyncio.create_task(
                    publisher.publish(JOB_RESULT, result, device=result.sender, job_id="late"),
                    name="publishing",
                )
                subscribing = asyncio.create_task(
                    subscriber.subscribe(JOB_RESULT, on_result, job_id="late"), name="subscribing"
                )
                waiting += [publishing, subscribing]
                await asyncio.sleep(0.3)
                assert not publishing.done() and not subscribing.done()
                await asyncio.to_thread(mosquitto.halt, graceful=False)  # SIGKILL ends a stop
                await asyncio.to_thread(mosquitto.resume)
                await subscribing  # returned with the connection, not after 120 s
                await publishing  # sent again on the new connection
                assert publisher.statistics.publish_retries >= 1
                # The subscription made while the broker hung is in place after reconnecting.
                await subscriber.wait_connected(WAIT_S)
                await publisher.publish(JOB_RESULT, result, device=result.sender, job_id="late")
                while (await received.get()).job_id != "late":
                    pass
        finally:
            for task in waiting:  # on failure, they may still wait
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            subscriber.request_stop()
            publisher.request_stop()


async def test_a_leader_record_that_could_not_be_published_is_said_again(
    mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first leader record of the cluster fails to publish (as when the broker
    # stops just as the claim goes out). Unsaid, no one else would know the leader:
    # the client believes results only from the leader of their epoch, and a rival
    # that claimed the same epoch would lead too. It must be said again.
    failed: list[str] = []
    publish = MqttSession.publish

    async def fail_the_first_record(
        self: MqttSession, spec: TopicSpec, message: WireMessage, **options: Any
    ) -> None:
        if spec is PLANNER_LEADER and not failed:
            failed.append(message.sender)
            raise ConnectionLost("the broker went away (injected)")
        await publish(self, spec, message, **options)

    monkeypatch.setattr(MqttSession, "publish", fail_the_first_record)
    root = TopicRoot(prefix=f"edgedi-test/{uuid.uuid4().hex[:12]}", cluster="test")
    async with running_cluster(mosquitto, root) as cluster:
        await cluster.wait_for_plan(timeout=WAIT_S)
        leader = cluster.leader()
        assert failed == [leader.device_id]
        async with connect(mosquitto.host, mosquitto.port, root=root) as client:
            record = await client.leader(timeout=WAIT_S)
            assert record is not None and record.device == leader.device_id
            _, result, _ = await _infer(client, 0)
        assert result.status == "ok", result.error
        assert all(agent.election.leader == leader.device_id for agent in cluster.agents)
