"""MqttSession without a broker: dispatch rules, error containment, backoff, settings."""

from __future__ import annotations

import logging

import aiomqtt
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from edgedi.broker.connection import (
    MqttSession,
    Received,
    SessionSettings,
    Subscription,
    filter_matches,
)
from edgedi.broker.errors import ConnectionLost, PayloadTooLarge
from edgedi.broker.messages import DeviceState, GateValue, encode
from edgedi.broker.tensors import Tensor
from edgedi.broker.topics import DEVICE_BIRTH, DEVICE_STATE, JOB_GATES, TopicRoot

ROOT = TopicRoot(prefix="test", cluster="unit")


def _session(**settings: object) -> MqttSession:
    return MqttSession(SessionSettings(client_id="unit", **settings), ROOT)  # type: ignore[arg-type]


def _message(topic: str, payload: bytes, *, retain: bool = False) -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, qos=1, retain=retain, mid=1, properties=None)


def _state(device: str = "pi-1") -> DeviceState:
    return DeviceState(sender=device, device=device, session=2, status="online")


async def test_dispatch_routes_by_subscription_and_checks_the_topic() -> None:
    session = _session()
    seen: list[Received] = []

    async def on_state(received: Received) -> None:
        seen.append(received)

    await session.subscribe(DEVICE_STATE, on_state, device="pi-1")
    state = _state()
    await session._dispatch(
        _message(DEVICE_STATE.topic(ROOT, device="pi-1"), encode(state), retain=True)
    )
    # amqtt replays retained messages matching *other* clients' filters: dropped here.
    await session._dispatch(
        _message(DEVICE_STATE.topic(ROOT, device="pi-2"), encode(_state("pi-2")))
    )
    await session._dispatch(_message(DEVICE_BIRTH.topic(ROOT, device="pi-1"), b"{}"))
    # An empty retained payload is a deletion, not a message.
    await session._dispatch(_message(DEVICE_STATE.topic(ROOT, device="pi-1"), b""))
    assert [r.message for r in seen] == [state]
    assert seen[0].retained and seen[0].topic.parameters == {"device": "pi-1"}
    assert session.statistics.dropped_unrouted == 2
    assert session.statistics.handled == 1


async def test_malformed_messages_and_failing_handlers_never_escape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session = _session()
    calls = 0

    async def explode(received: Received) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("handler bug")

    await session.subscribe(DEVICE_STATE, explode)
    topic = DEVICE_STATE.topic(ROOT, device="pi-1")
    with caplog.at_level(logging.WARNING, logger="edgedi.broker.connection"):
        for payload in (b"garbage", b'{"version": 9}', encode(_state("pi-2"))):
            await session._dispatch(_message(topic, payload))
        for _ in range(3):
            await session._dispatch(_message(topic, encode(_state())))
    assert session.statistics.dropped_malformed == 3
    assert session.statistics.handler_errors == 3 and calls == 3
    # Logging is rate-limited per topic and error: one line for the repeated handler bug.
    assert sum("handler for" in record.message for record in caplog.records) == 1
    assert any("DecodeError" in record.message for record in caplog.records)
    assert any("SchemaVersionError" in record.message for record in caplog.records)


async def test_oversized_payloads_are_dropped() -> None:
    session = _session(max_payload_bytes=2048)
    got: list[Received] = []

    async def on_gate(received: Received) -> None:
        got.append(received)

    await session.subscribe(JOB_GATES, on_gate)
    gate = GateValue(
        sender="l",
        job_id="j",
        epoch=1,
        segment=0,
        gate=0,
        vector=Tensor(np.zeros(1000, dtype=np.float32)),
    )
    await session._dispatch(_message(JOB_GATES.topic(ROOT, job_id="j"), encode(gate)))
    assert not got and session.statistics.dropped_malformed == 1
    with pytest.raises(PayloadTooLarge):
        session.prepare(JOB_GATES, gate, job_id="j")


async def test_publish_without_connection_times_out() -> None:
    session = _session()
    with pytest.raises(ConnectionLost, match="timed out"):
        await session.publish(DEVICE_STATE, _state(), device="pi-1", timeout=0.05)
    with pytest.raises(ConnectionLost):
        await session.wait_connected(timeout=0.01)
    assert session.statistics.publish_failures == 1
    assert session.tcp_nodelay_enabled() is None


async def test_unsubscribe_stops_delivery() -> None:
    session = _session()
    got: list[Received] = []

    async def on_state(received: Received) -> None:
        got.append(received)

    subscription = await session.subscribe(DEVICE_STATE, on_state)
    await session.unsubscribe(subscription)
    await session._dispatch(_message(DEVICE_STATE.topic(ROOT, device="pi-1"), encode(_state())))
    assert not got


_LEVELS = st.sampled_from(["a", "b", "dev-1", "", "$SYS"])


@given(
    st.lists(_LEVELS, min_size=1, max_size=5),
    st.lists(st.one_of(_LEVELS, st.just("+")), max_size=5),
    st.booleans(),
    st.booleans(),
)
def test_topic_matching_agrees_with_aiomqtt(
    topic: list[str], levels: list[str], rest: bool, shared: bool
) -> None:
    # The dispatcher's own matcher (it skips building aiomqtt objects per message).
    topic_filter = "/".join([*levels, "#"] if rest or not levels else levels)
    assume(topic_filter)  # an empty filter is not a filter
    if shared:
        topic_filter = f"$share/group/{topic_filter}"

    async def nothing(received: Received) -> None:
        return None

    subscription = Subscription(DEVICE_STATE, topic_filter, nothing)
    name = "/".join(topic)
    assume(name)  # an empty topic is not a topic
    expected = aiomqtt.Topic(name).matches(topic_filter)
    assert filter_matches(subscription.levels, name.split("/")) == expected, (name, topic_filter)


async def test_routes_follow_subscribe_and_unsubscribe() -> None:
    # Matches are remembered per topic: a new or removed subscription must show at once.
    session = _session()
    seen: list[str] = []

    async def first(received: Received) -> None:
        seen.append("first")

    async def second(received: Received) -> None:
        seen.append("second")

    topic = f"{ROOT.prefix}/{ROOT.cluster}/devices/pi-1/state"
    payload = encode(_state())
    one = await session.subscribe(DEVICE_STATE, first)
    await session._dispatch(_message(topic, payload))
    two = await session.subscribe(DEVICE_STATE, second, device="pi-1")
    await session._dispatch(_message(topic, payload))
    await session.unsubscribe(one)
    await session._dispatch(_message(topic, payload))
    await session.unsubscribe(two)
    await session._dispatch(_message(topic, payload))
    assert seen == ["first", "first", "second", "second"]


async def test_long_topics_are_routed_but_not_remembered() -> None:
    # A peer may name 64 KB topics: remembering 1024 of them would hold 64 MB.
    session = _session()
    got: list[Received] = []

    async def on_gates(received: Received) -> None:
        got.append(received)

    await session.subscribe(JOB_GATES, on_gates)
    long_topic = JOB_GATES.filter(ROOT).replace("+", "j" * 600)
    await session._dispatch(_message(long_topic, b"\x80"))
    assert not got  # not a valid job id: dropped as malformed, after matching
    assert session.statistics.dropped_malformed == 1
    assert long_topic not in session._routes and long_topic not in session._parsed
    short_topic = JOB_GATES.topic(ROOT, job_id="job-1")
    await session._dispatch(_message(short_topic, b"\x80"))
    assert short_topic in session._routes


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    session = _session(reconnect_initial_seconds=0.1, reconnect_max_seconds=2.0)
    for failures, cap in [(0, 0.1), (1, 0.2), (3, 0.8), (10, 2.0), (500, 2.0)]:
        delays = [session._backoff(failures) for _ in range(50)]
        assert all(cap / 2 <= delay <= cap for delay in delays)
        assert len(set(delays)) > 1


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError):
        SessionSettings(client_id="has space")
    with pytest.raises(ValidationError):
        SessionSettings(client_id="ok", keepalive_seconds=0)
    with pytest.raises(ValidationError):
        SessionSettings(client_id="ok", unknown=1)  # type: ignore[call-arg]
    settings = SessionSettings(client_id="ok", max_payload_bytes=4096, max_tensor_elements=10)
    assert settings.limits.max_payload_bytes == 4096
    assert settings.limits.max_elements == 10


async def test_clear_retained_only_for_retained_topics() -> None:
    session = _session()
    with pytest.raises(ValueError, match="not retained"):
        await session.clear_retained(JOB_GATES, job_id="j")
