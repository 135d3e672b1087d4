"""The MQTT behaviour edgedi relies on, on NATS (MQTT interface) and RabbitMQ (MQTT plugin).

Mosquitto and the embedded broker run the full set of these in test_broker_messaging.py;
here a representative subset runs on the brokers a plant may already operate (and which
cluster across machines): a 1 MiB tensor at QoS 1, retained records replayed to a late
subscriber, a Last Will on a killed device, and every edgedi topic accepted by the
broker. Each broker is skipped, with the reason, where it is not installed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import pytest
from test_broker_messaging import _DEVICE_SCRIPT, WAIT, Inbox, _tile_result

from edgedi.broker.connection import MqttSession, SessionSettings
from edgedi.broker.errors import ConnectionLost
from edgedi.broker.messages import (
    DeviceBirth,
    DeviceCapabilities,
    DeviceState,
    JobResult,
    LeaderRecord,
    TileResult,
)
from edgedi.broker.server import BrokerHandle, BrokerKind, start_broker
from edgedi.broker.tensors import Tensor
from edgedi.broker.topics import (
    CATALOGUE,
    DEVICE_BIRTH,
    DEVICE_STATE,
    JOB_RESULT,
    JOB_TILES,
    PLANNER_LEADER,
    Publication,
    TopicRoot,
)

SessionFactory = Callable[..., Awaitable[MqttSession]]  # the `fleet_sessions` fixture


async def test_a_tensor_at_qos_1_arrives_intact(fleet_sessions: SessionFactory) -> None:
    worker = await fleet_sessions("worker-1")
    leader = await fleet_sessions("leader")
    inbox = Inbox()
    await leader.subscribe(JOB_TILES, inbox, job_id="job-1")
    array = np.random.default_rng(1).standard_normal((16, 128, 128)).astype(np.float32)  # 1 MiB
    sent = _tile_result(Tensor(array))
    await worker.publish(JOB_TILES, sent, device=sent.device, job_id="job-1")
    received = await inbox.get()
    assert isinstance(received.message, TileResult)
    assert np.array_equal(received.message.tensor.array, array)
    assert not received.retained


async def test_retained_birth_and_leader_reach_a_late_subscriber(
    fleet_sessions: SessionFactory,
) -> None:
    device = await fleet_sessions("pi-1")
    birth = DeviceBirth(
        sender="pi-1",
        device="pi-1",
        session=1,
        candidate=True,
        capabilities=DeviceCapabilities(
            cores=2, memory_bytes=2**30, machine="test", software_version="0"
        ),
    )
    leader = LeaderRecord(sender="pi-1", device="pi-1", epoch=4, session=1)
    await device.publish(DEVICE_BIRTH, birth, device="pi-1")
    await device.publish(PLANNER_LEADER, leader)
    observer = await fleet_sessions()
    births, leaders = Inbox(), Inbox()
    # Exact topics: every broker replays these (RabbitMQ before 3.13 replays no retained
    # message to a wildcard filter; agents recover from that by asking for a rebirth).
    await observer.subscribe(DEVICE_BIRTH, births, device="pi-1")
    await observer.subscribe(PLANNER_LEADER, leaders)
    got_birth, got_leader = await births.get(), await leaders.get()
    assert got_birth.retained and got_birth.message == birth
    assert got_leader.retained and got_leader.message == leader
    await device.clear_retained(DEVICE_BIRTH, device="pi-1")
    await device.clear_retained(PLANNER_LEADER)


@pytest.fixture
def fleet_device(
    fleet_broker: BrokerHandle, topic_root: TopicRoot
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A device in a child process on `fleet_broker`: birth and online state, Will offline."""
    device = f"pi-{uuid.uuid4().hex[:6]}"
    process = subprocess.Popen(
        [sys.executable, "-c", _DEVICE_SCRIPT, fleet_broker.host, str(fleet_broker.port),
         topic_root.prefix, topic_root.cluster, device],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        yield device, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=WAIT)
        assert process.stdout is not None
        process.stdout.close()


async def test_last_will_fires_when_the_device_is_killed(
    fleet_sessions: SessionFactory, fleet_device: tuple[str, subprocess.Popen[str]]
) -> None:
    device, process = fleet_device
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
    assert line.strip() == "announced"
    observer = await fleet_sessions()
    states = Inbox()
    await observer.subscribe(DEVICE_STATE, states, device=device)
    online = await states.get()
    assert isinstance(online.message, DeviceState) and online.message.status == "online"
    process.kill()  # no DISCONNECT: the broker publishes the Will
    offline = await states.get(within=20)
    assert isinstance(offline.message, DeviceState)
    assert offline.message.status == "offline" and offline.message.session == 7
    for spec in (DEVICE_BIRTH, DEVICE_STATE):
        await observer.clear_retained(spec, device=device)


async def test_every_edgedi_topic_is_accepted(
    fleet_sessions: SessionFactory, topic_root: TopicRoot
) -> None:
    """Each topic, with ids as agents make them (device names, uuid job ids), published
    and received once: a broker that refuses a topic name (NATS closes the connection on
    one with '.' or ' ') fails this instead of an agent in the field."""
    receiver = await fleet_sessions()
    sender: MqttSession = await fleet_sessions()
    inbox = Inbox()
    values = {"device": "pi-4", "target": "pi-5", "job_id": uuid.uuid4().hex}
    topics = []
    for spec in CATALOGUE:
        parameters = {name: values[name] for name in spec.parameters}
        topics.append(spec.topic(topic_root, **parameters))
        await receiver.subscribe(spec, inbox, **parameters)
    for topic in topics:
        # A payload the receiver refuses (not the topic's kind) still proves delivery:
        # the session counts it as received, then as malformed.
        await sender.publish_raw(Publication(topic, b"{}", qos=1, retain=False))
    async with asyncio.timeout(WAIT):
        # The counters have no event to wait on; a short poll is bounded by the timeout.
        while receiver.statistics.received < len(topics):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert receiver.statistics.received == len(topics)
    assert sender.connected.is_set() and receiver.connected.is_set()


async def test_a_topic_the_broker_refuses_costs_two_connections_not_one_per_publish(
    fleet_sessions: SessionFactory,
) -> None:
    """Ids may contain '.', which older nats-server releases (2.9.10) refuse in a topic by closing
    the connection (RabbitMQ 3.10 takes it but turns the '.' into a level separator, so
    the message reaches no exact subscriber). After two such drops the session stops
    sending those topics (a clear error for each) and stays connected; plain topics work
    throughout."""
    sender = await fleet_sessions()
    receiver = await fleet_sessions()
    inbox = Inbox()
    await receiver.subscribe(JOB_RESULT, inbox, device="leader")
    dotted = JobResult(sender="leader", job_id="job.1", status="error", error="dotted")
    plain = JobResult(sender="leader", job_id="job-2", status="error", error="plain")
    try:
        await sender.publish(JOB_RESULT, dotted, device="leader", job_id="job.1")
    except ConnectionLost as error:
        assert "'.'" in str(error), error
        await sender.wait_connected(timeout=WAIT)
        connects = sender.statistics.connects
        with pytest.raises(ConnectionLost, match="not sent"):
            await sender.publish(JOB_RESULT, dotted, device="leader", job_id="job.1")
        assert sender.statistics.connects == connects
    connects = sender.statistics.connects
    await sender.publish(JOB_RESULT, plain, device="leader", job_id="job-2")
    while (received := await inbox.get()).message != plain:
        assert received.message == dotted  # a broker that takes '.' delivers it first
    assert sender.statistics.connects == connects


async def test_a_session_comes_back_after_its_broker_restarts(
    fleet_broker_kind: BrokerKind, topic_root: TopicRoot
) -> None:
    """`halt()`/`resume()` of a NATS or RabbitMQ broker (the fault tests' broker restart):
    same port, and a session reconnects and resubscribes by itself."""
    handle = await asyncio.to_thread(start_broker, prefer=fleet_broker_kind)
    sessions = [
        MqttSession(
            SessionSettings(
                host=handle.host, port=handle.port, client_id=name, reconnect_max_seconds=0.5
            ),
            topic_root,
        )
        for name in ("restart-sender", "restart-receiver")
    ]
    sender, receiver = sessions
    try:
        async with asyncio.TaskGroup() as group:
            for session in sessions:
                group.create_task(session.run(), name=f"session-{session.settings.client_id}")
            try:
                await sender.wait_connected(timeout=WAIT)
                await receiver.wait_connected(timeout=WAIT)
                inbox = Inbox()
                await receiver.subscribe(JOB_RESULT, inbox, device="leader")
                await asyncio.to_thread(handle.halt)
                await asyncio.to_thread(handle.resume)
                await receiver.wait_connected(timeout=30)
                await sender.wait_connected(timeout=30)
                sent = JobResult(sender="leader", job_id="job-3", status="error", error="again")
                await sender.publish(JOB_RESULT, sent, device="leader", job_id="job-3")
                assert (await inbox.get(within=30)).message == sent
                assert receiver.statistics.connects == 2
            finally:
                for session in sessions:
                    session.request_stop()
    finally:
        await asyncio.to_thread(handle.stop)
