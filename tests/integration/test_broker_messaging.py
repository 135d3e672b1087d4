"""MqttSession against real brokers (Mosquitto and amqtt): delivery, Will, reconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import pytest

from edgedi.broker.connection import MqttSession, Received, SessionSettings
from edgedi.broker.errors import ConnectionLost
from edgedi.broker.messages import (
    DeviceBirth,
    DeviceCapabilities,
    DeviceState,
    JobResult,
    TileResult,
)
from edgedi.broker.server import (
    BrokerHandle,
    BrokerKind,
    free_port,
    start_broker,
)
from edgedi.broker.tensors import Tensor
from edgedi.broker.topics import (
    DEVICE_BIRTH,
    DEVICE_STATE,
    JOB_RESULT,
    JOB_TILES,
    Publication,
    TopicRoot,
)

SessionFactory = Callable[..., Awaitable[MqttSession]]  # the `sessions` fixture
WAIT = 10.0  # seconds; generous for a loaded 2-core CI machine


class Inbox:
    """Collects received messages; `get()` waits with a timeout."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Received] = asyncio.Queue()

    async def __call__(self, received: Received) -> None:
        await self.queue.put(received)

    async def get(self, within: float = WAIT) -> Received:
        async with asyncio.timeout(within):
            return await self.queue.get()


def _tile_result(tensor: Tensor) -> TileResult:
    return TileResult(
        sender="worker-1",
        job_id="job-1",
        epoch=3,
        segment=0,
        tile=1,
        device="worker-1",
        output_rows=(10, 20),
        tensor=tensor,
        compute_seconds=0.01,
    )


async def test_tensor_round_trip(sessions: SessionFactory) -> None:
    worker = await sessions("worker-1")
    leader = await sessions("leader")
    inbox = Inbox()
    await leader.subscribe(JOB_TILES, inbox, job_id="job-1")
    array = np.random.default_rng(0).standard_normal((16, 128, 128)).astype(np.float32)  # 1 MiB
    sent = _tile_result(Tensor(array))
    await worker.publish(JOB_TILES, sent, device=sent.device, job_id="job-1")
    received = await inbox.get()
    assert received.message == sent
    assert isinstance(received.message, TileResult)
    assert np.array_equal(received.message.tensor.array, array)
    assert received.topic.parameters == {"job_id": "job-1", "device": sent.device}
    assert not received.retained


async def test_tcp_nodelay_is_set_on_the_client_socket(sessions: SessionFactory) -> None:
    assert (await sessions()).tcp_nodelay_enabled() is True
    assert (await sessions(tcp_nodelay=False)).tcp_nodelay_enabled() is False


async def test_malformed_messages_are_logged_and_the_loop_goes_on(
    sessions: SessionFactory, topic_root: TopicRoot, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = await sessions()
    subscriber = await sessions()
    inbox = Inbox()
    failures = 0

    async def flaky(received: Received) -> None:
        nonlocal failures
        if isinstance(received.message, JobResult) and received.message.error == "explode":
            failures += 1
            raise RuntimeError("a handler bug")
        await inbox(received)

    await subscriber.subscribe(JOB_RESULT, flaky)
    topic = JOB_RESULT.topic(topic_root, job_id="j-1", device="leader")
    good = JobResult(sender="leader", job_id="j-1", status="error", error="fine")
    bad = JobResult(sender="leader", job_id="j-1", status="error", error="explode")
    with caplog.at_level(logging.WARNING, logger="edgedi.broker.connection"):
        for payload in (b"\x00garbage", b'{"version": 99, "kind": "job_result"}', b"[]"):
            await publisher.publish_raw(Publication(topic, payload, qos=1, retain=False))
        await publisher.publish(JOB_RESULT, bad, device=bad.sender, job_id="j-1")
        await publisher.publish(JOB_RESULT, good, device=good.sender, job_id="j-1")
        received = await inbox.get()
    assert received.message == good
    assert subscriber.statistics.dropped_malformed == 3
    assert subscriber.statistics.handler_errors == 1 and failures == 1
    assert subscriber.connected.is_set()
    assert any("malformed" in record.message for record in caplog.records)


async def test_retained_birth_is_replayed_to_late_subscribers(
    sessions: SessionFactory, topic_root: TopicRoot
) -> None:
    device = await sessions("pi-1")
    birth = DeviceBirth(
        sender="pi-1",
        device="pi-1",
        session=1,
        candidate=False,
        capabilities=DeviceCapabilities(
            cores=2, memory_bytes=2**30, machine="test", software_version="0"
        ),
    )
    await device.publish(DEVICE_BIRTH, birth, device="pi-1")
    observer = await sessions()
    inbox = Inbox()
    await observer.subscribe(DEVICE_BIRTH, inbox)
    received = await inbox.get()
    assert received.retained and received.message == birth
    await device.clear_retained(DEVICE_BIRTH, device="pi-1")


# A device in a child process: birth + online state on connect, Will = offline.
_DEVICE_SCRIPT = """
import asyncio, sys
from edgedi.broker.connection import MqttSession, SessionSettings
from edgedi.broker.messages import DeviceBirth, DeviceCapabilities, DeviceState
from edgedi.broker.topics import DEVICE_BIRTH, DEVICE_STATE, TopicRoot

host, port, prefix, cluster, device = sys.argv[1:6]
SESSION = 7

async def main() -> None:
    def state(status):
        return DeviceState(sender=device, device=device, session=SESSION, status=status)

    async def announce() -> None:
        capabilities = DeviceCapabilities(
            cores=1, memory_bytes=1, machine="t", software_version="0"
        )
        birth = DeviceBirth(sender=device, device=device, session=SESSION, candidate=True,
                            capabilities=capabilities)
        await session.publish(DEVICE_BIRTH, birth, device=device)
        await session.publish(DEVICE_STATE, state("online"), device=device)
        print("announced", flush=True)

    session = MqttSession(
        SessionSettings(host=host, port=int(port), client_id=device, keepalive_seconds=5),
        TopicRoot(prefix=prefix, cluster=cluster),
        will=lambda: session.prepare(DEVICE_STATE, state("offline"), device=device),
        on_connect=announce,
    )
    await session.run()

asyncio.run(main())
"""


@pytest.fixture
def device_process(broker: BrokerHandle, topic_root: TopicRoot) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _DEVICE_SCRIPT,
            broker.host,
            str(broker.port),
            topic_root.prefix,
            topic_root.cluster,
            "pi-9",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=WAIT)
        assert process.stdout is not None
        process.stdout.close()


async def test_last_will_fires_when_the_device_is_killed(
    sessions: SessionFactory, device_process: subprocess.Popen[str]
) -> None:
    assert device_process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(device_process.stdout.readline), timeout=30)
    assert line.strip() == "announced"
    observer = await sessions()
    births, states = Inbox(), Inbox()
    await observer.subscribe(DEVICE_BIRTH, births, device="pi-9")
    await observer.subscribe(DEVICE_STATE, states, device="pi-9")
    birth = await births.get()
    assert birth.retained and isinstance(birth.message, DeviceBirth)
    online = await states.get()
    assert isinstance(online.message, DeviceState) and online.message.status == "online"

    device_process.kill()  # SIGKILL: no DISCONNECT, so the broker publishes the Will
    offline = await states.get(within=15)
    assert isinstance(offline.message, DeviceState)
    assert offline.message.status == "offline"
    assert offline.message.session == birth.message.session == 7
    for spec in (DEVICE_BIRTH, DEVICE_STATE):
        await observer.clear_retained(spec, device="pi-9")


async def test_session_reconnects_and_resubscribes_after_broker_restart(
    broker_kind: BrokerKind,
) -> None:
    port = free_port()
    root = TopicRoot(prefix="edgedi-test/restart", cluster="test")
    handle = start_broker(port=port, prefer=broker_kind)
    connects = 0

    async def on_connect() -> None:
        nonlocal connects
        connects += 1

    def settings(name: str) -> SessionSettings:
        return SessionSettings(
            port=port,
            client_id=name,
            reconnect_initial_seconds=0.05,
            reconnect_max_seconds=0.3,
            keepalive_seconds=2,
        )

    subscriber = MqttSession(settings("subscriber"), root, on_connect=on_connect)
    publisher = MqttSession(settings("publisher"), root)
    inbox = Inbox()
    await subscriber.subscribe(JOB_RESULT, inbox)  # before run(): made on connect
    result = JobResult(sender="leader", job_id="j-1", status="error", error="x")
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(subscriber.run(), name="subscriber")
            group.create_task(publisher.run(), name="publisher")
            try:
                await subscriber.wait_connected(WAIT)
                await publisher.publish(JOB_RESULT, result, device=result.sender, job_id="j-1")
                assert (await inbox.get()).message == result

                # Off the loop: amqtt's shutdown talks to our (then blocked) clients.
                await asyncio.to_thread(handle.stop)
                async with asyncio.timeout(WAIT):
                    while subscriber.connected.is_set():  # noqa: ASYNC110 - no event for "down"
                        await asyncio.sleep(0.02)
                handle = await asyncio.to_thread(start_broker, port=port, prefer=broker_kind)
                await subscriber.wait_connected(WAIT)
                await publisher.publish(
                    JOB_RESULT, result, device=result.sender, job_id="j-1", timeout=WAIT
                )
                assert (await inbox.get()).message == result
                assert connects == 2
                assert subscriber.statistics.connection_failures >= 1
            finally:
                subscriber.request_stop()
                publisher.request_stop()
    finally:
        await asyncio.to_thread(handle.stop)


async def test_publish_without_a_broker_fails_in_time_and_stop_still_works() -> None:
    session = MqttSession(
        SessionSettings(port=free_port(), client_id="lonely", reconnect_max_seconds=0.2),
        TopicRoot(),
    )
    async with asyncio.TaskGroup() as group:
        group.create_task(session.run(), name="lonely")
        with pytest.raises(ConnectionLost):
            await session.publish(
                JOB_RESULT,
                JobResult(sender="lonely", job_id="j", status="error", error="x"),
                job_id="j",
                device="lonely",
                timeout=0.5,
            )
        assert session.statistics.connection_failures >= 1
        session.request_stop()


async def test_results_are_readable_with_mosquitto_sub(
    sessions: SessionFactory, broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    client = shutil.which("mosquitto_sub")
    if client is None:
        pytest.skip("mosquitto_sub is not installed")
    topic = JOB_RESULT.topic(topic_root, job_id="j-7", device="leader")
    reader = await asyncio.create_subprocess_exec(
        client,
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-t",
        topic,
        "-v",  # topic, then payload: amqtt may also hand it other tests' retained messages
        "-W",
        "20",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        publisher = await sessions()
        result = JobResult(
            sender="leader",
            job_id="j-7",
            status="ok",
            label=1,
            class_name="inclusion",
            probabilities=(0.1, 0.9),
        )
        async with asyncio.timeout(WAIT):
            while True:  # mosquitto_sub subscribes asynchronously: repeat until it has one
                await publisher.publish(JOB_RESULT, result, device=result.sender, job_id="j-7")
                try:
                    async with asyncio.timeout(0.3):
                        line = await reader.stdout.readline()  # type: ignore[union-attr]
                except TimeoutError:
                    continue
                received, _, output = line.decode().partition(" ")
                if received == topic:
                    break
        document = json.loads(output)
        assert document["class_name"] == "inclusion"
        assert document["probabilities"] == [0.1, 0.9]
    finally:
        if reader.returncode is None:
            reader.kill()
        await reader.wait()
