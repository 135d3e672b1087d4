"""Bounded memory: a stalled or flooding peer cannot make the broker or an agent hoard data.

- Mosquitto with the shipped `mosquitto.conf`: a QoS 1 subscriber that is offline
  (persistent session) or connected but not reading gets at most
  `max_queued_messages` (+ `max_inflight_messages` when connected) of a flood three
  times that size; the broker logs the drop, its memory grows by about the bound
  only, and it stays up. Plain paho clients, so no code of ours is involved.
- `MqttSession`: a handler that does not keep up lets at most `max_queued_incoming`
  messages wait; the rest are dropped, counted and logged once (rate-limited), and
  the session goes on.
- An agent's result cache stays at `jobs.result_cache` under a flood of jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from runtime_support import reference_probabilities, running_cluster, sample_image

from edgedi.agent.client import connect
from edgedi.broker.connection import MqttSession, Received
from edgedi.broker.messages import JobResult, JobSubmit
from edgedi.broker.server import (
    BrokerHandle,
    BrokerKind,
    MosquittoBroker,
    find_mosquitto,
    mosquitto_config,
    probe_mqtt,
    start_broker,
    start_mosquitto,
)
from edgedi.broker.tensors import Tensor
from edgedi.broker.topics import JOB_RESULT, JOB_SUBMIT, TopicRoot

WAIT_S = 15.0
PAYLOAD_BYTES = 32 * 1024

SessionFactory = Callable[..., Awaitable[MqttSession]]  # the `sessions` fixture


def shipped_limits() -> dict[str, int]:
    """The numeric settings of the shipped Mosquitto configuration."""
    limits = {}
    for line in mosquitto_config("127.0.0.1", 1883).splitlines():
        words = line.split()
        if len(words) == 2 and not line.startswith("#") and words[1].isdigit():
            limits[words[0]] = int(words[1])
    return limits


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture
def mosquitto() -> Iterator[MosquittoBroker]:
    """A fresh Mosquitto of our own: its memory is measured."""
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is not installed")
    handle = start_mosquitto()
    try:
        yield handle
    finally:
        handle.stop()


class Subscriber:
    """A paho QoS 1 subscriber that counts what it gets; it can stall or go offline."""

    def __init__(self, broker: BrokerHandle, topic: str, *, persistent: bool) -> None:
        self.broker = broker
        self.topic = topic
        self.client_id = f"slow-{uuid.uuid4().hex[:8]}"
        self.persistent = persistent
        self.received = 0
        self.last_arrival = time.monotonic()
        self.reading = threading.Event()
        self.reading.set()
        self.client = self._connect(subscribe=True)

    def _connect(self, *, subscribe: bool) -> paho.Client:
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=not self.persistent,
        )
        client.on_message = self._on_message
        subscribed = threading.Event()
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect(self.broker.host, self.broker.port, keepalive=60)
        client.loop_start()
        if subscribe:
            client.subscribe(self.topic, qos=1)
            assert subscribed.wait(WAIT_S), "no SUBACK"
        return client

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        self.received += 1
        self.last_arrival = time.monotonic()
        self.reading.wait(WAIT_S)  # a stalled handler: paho reads nothing meanwhile

    def stall(self) -> None:
        """Stop reading at the next message (the connection stays open)."""
        self.reading.clear()

    def go_offline(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def resume(self, *, reconnect: bool) -> None:
        if reconnect:
            self.client = self._connect(subscribe=False)  # the broker kept the session
        else:
            self.reading.set()

    def wait_until_quiet(self, quiet_s: float = 1.0) -> int:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() - self.last_arrival < quiet_s and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.received

    def close(self) -> None:
        self.reading.set()
        self.client.disconnect()
        self.client.loop_stop()


def flood(broker: BrokerHandle, topic: str, count: int) -> None:
    """Publish `count` QoS 1 messages, a batch at a time (the publisher must not hoard)."""
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=f"flood-{uuid.uuid4().hex[:8]}"
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        payload = os.urandom(PAYLOAD_BYTES)
        batch = []
        for _ in range(count):
            batch.append(client.publish(topic, payload, qos=1))
            if len(batch) == 100:
                for info in batch:
                    info.wait_for_publish(timeout=WAIT_S)
                batch.clear()
        for info in batch:
            info.wait_for_publish(timeout=WAIT_S)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "stalled"])
def test_mosquitto_bounds_what_it_holds_for_a_slow_subscriber(
    mosquitto: MosquittoBroker, offline: bool
) -> None:
    limits = shipped_limits()
    queued, inflight = limits["max_queued_messages"], limits["max_inflight_messages"]
    # A connected subscriber also has its in-flight window; an offline one has none.
    bound = queued if offline else queued + inflight
    count = 3 * queued
    assert count * PAYLOAD_BYTES < limits["max_queued_bytes"]  # the count limit is the one hit
    topic = f"edgedi-test/{uuid.uuid4().hex[:8]}/flood"
    subscriber = Subscriber(mosquitto, topic, persistent=offline)
    try:
        if offline:
            subscriber.go_offline()
        else:
            subscriber.stall()
        before = resident_bytes(mosquitto.process.pid)
        flood(mosquitto, topic, count)
        grown = resident_bytes(mosquitto.process.pid) - before
        assert mosquitto.process.poll() is None
        assert probe_mqtt(mosquitto.host, mosquitto.port)  # still serving others
        # It holds about `bound` payloads, not the flood (3x as much).
        assert grown < 1.5 * bound * PAYLOAD_BYTES, f"broker grew by {grown / 2**20:.0f} MiB"
        subscriber.resume(reconnect=offline)
        received = subscriber.wait_until_quiet()
        assert queued <= received <= bound, (received, bound)
        assert f"Outgoing messages are being dropped for client {subscriber.client_id}" in (
            mosquitto.log_text()
        )
        print(
            f"\n[{'offline' if offline else 'stalled'}] {count} x {PAYLOAD_BYTES // 1024} KiB "
            f"published, {received} delivered later; broker grew by {grown / 2**20:.1f} MiB"
        )
    finally:
        subscriber.close()


def _result(number: int) -> JobResult:
    return JobResult(sender="flooder", job_id=f"job-{number}", status="error", error="x")  # type: ignore[arg-type]


async def test_a_session_drops_counts_and_logs_what_its_queue_cannot_hold(
    sessions: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    capacity, count = 8, 50
    release = asyncio.Event()
    handled: list[str] = []

    async def slow(received: Received) -> None:
        assert isinstance(received.message, JobResult)
        handled.append(received.message.job_id)
        await release.wait()

    subscriber = await sessions("slow-reader", max_queued_incoming=capacity)
    await subscriber.subscribe(JOB_RESULT, slow)
    publisher = await sessions("flooder")
    with caplog.at_level(logging.WARNING, logger="edgedi.broker.connection"):
        for number in range(count):
            await publisher.publish(
                JOB_RESULT, _result(number), device="flooder", job_id=f"job-{number}"
            )
        # One message in the handler, `capacity` waiting: the rest cannot be held.
        dropped = count - capacity - 1
        async with asyncio.timeout(WAIT_S):
            while subscriber.statistics.dropped_overflow < dropped:  # noqa: ASYNC110 - no event
                await asyncio.sleep(0.02)
        release.set()
        async with asyncio.timeout(WAIT_S):
            while len(handled) < capacity + 1:  # noqa: ASYNC110 - polling a counter
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    assert subscriber.statistics.dropped_overflow == dropped
    assert handled == [f"job-{number}" for number in range(capacity + 1)]  # oldest kept
    warnings = [r for r in caplog.records if "incoming queue full" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited, not one line per dropped message
    # The session works on.
    await publisher.publish(JOB_RESULT, _result(count), device="flooder", job_id=f"job-{count}")
    async with asyncio.timeout(WAIT_S):
        while handled[-1] != f"job-{count}":  # noqa: ASYNC110 - polling a list
            await asyncio.sleep(0.02)


async def test_the_result_cache_stays_bounded_under_a_flood_of_jobs(
    broker_kind: BrokerKind, topic_root: TopicRoot
) -> None:
    # A broker of its own: the agents leave retained births and plans behind, which
    # amqtt would hand to every later subscriber of the shared broker.
    broker = await asyncio.to_thread(start_broker, prefer=broker_kind)
    try:
        await _flood_jobs(broker, topic_root)
    finally:
        await asyncio.to_thread(broker.stop)


async def _flood_jobs(broker: BrokerHandle, topic_root: TopicRoot) -> None:
    cache, count = 8, 200
    async with running_cluster(
        broker, topic_root, speeds=(1.0, 1.0), jobs={"result_cache": cache}
    ) as cluster:
        await cluster.wait_for_plan()
        answered: set[str] = set()

        async def on_result(received: Received) -> None:
            assert isinstance(received.message, JobResult)
            answered.add(received.message.job_id)

        async with connect(broker.host, broker.port, root=topic_root) as client:
            await client.session.subscribe(JOB_RESULT, on_result)
            image = Tensor(sample_image(1)[None])
            most_in_flight = 0
            for number in range(count):
                submit = JobSubmit(
                    sender="flooder",
                    job_id=f"flood-{number}",  # type: ignore[arg-type]
                    model="no-such-model",  # answered at once with an error
                    image=image,
                    client="flooder",
                    submitted_at=time.time(),
                )
                await client.session.publish(JOB_SUBMIT, submit)
                coordinator = cluster.leader().coordinator
                if coordinator is not None:
                    most_in_flight = max(most_in_flight, coordinator.in_flight)
            async with asyncio.timeout(WAIT_S):
                while len(answered) < count:  # noqa: ASYNC110 - polling a set
                    await asyncio.sleep(0.05)
            for agent in cluster.agents:
                # White-box: the cache is private; its size is what is bounded.
                assert len(agent._results) <= cache, (agent.device_id, len(agent._results))
            picture = sample_image(2)
            good = await client.infer(picture, "tiny-edgedi", strategy="equal", timeout=20)
        assert good.status == "ok", good.error
        assert good.probabilities == pytest.approx(
            reference_probabilities("tiny-edgedi", picture).tolist(), abs=1e-5
        )
        print(f"\nmost jobs in flight at the leader during the flood: {most_in_flight}")
