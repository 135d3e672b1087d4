"""Fixtures for tests against a real MQTT broker.

`broker` is a private broker on a free loopback port, once per session for each
kind (Mosquitto and the embedded amqtt); every test gets its own topic root, so
tests sharing a broker never see each other's messages. A missing Mosquitto
binary skips the Mosquitto variant on a workstation and fails it in CI
(CI=true), where `.ci/run` installs it.

`fleet_broker` / `fleet_sessions` are the same on NATS and RabbitMQ (skipped, with the
reason, where one is not installed), for the subset of tests in test_broker_fleets.py.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio

from edgedi.broker.connection import MqttSession, SessionSettings
from edgedi.broker.server import BrokerHandle, BrokerKind, find_mosquitto, start_broker
from edgedi.broker.topics import TopicRoot

BROKER_KINDS: tuple[BrokerKind, ...] = ("mosquitto", "amqtt")


def require_broker_kind(kind: BrokerKind) -> None:
    """Skip (or, in CI, fail) when the broker of `kind` cannot run here."""
    if kind == "mosquitto" and find_mosquitto() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the mosquitto binary is missing in CI (.ci/run should install it)")
        pytest.skip("the mosquitto binary is not installed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", params=BROKER_KINDS)
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerHandle]:
    """A private broker shared by the session's tests (one per kind)."""
    kind: BrokerKind = request.param
    require_broker_kind(kind)
    handle = start_broker(prefer=kind)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(params=BROKER_KINDS)
def broker_kind(request: pytest.FixtureRequest) -> BrokerKind:
    """For tests that start and stop brokers of their own."""
    kind: BrokerKind = request.param
    require_broker_kind(kind)
    return kind


@pytest.fixture
def topic_root() -> TopicRoot:
    """A topic root no other test uses."""
    return TopicRoot(prefix=f"edgedi-test/{uuid.uuid4().hex[:12]}", cluster="test")


SessionFactory = Callable[..., Awaitable[MqttSession]]


@pytest.fixture(scope="session")
def _fleet_brokers() -> Iterator[dict[BrokerKind, BrokerHandle]]:
    """The session's NATS and RabbitMQ brokers, each started on first use (a RabbitMQ
    node takes seconds to boot: once per session, not per test)."""
    started: dict[BrokerKind, BrokerHandle] = {}
    try:
        yield started
    finally:
        for handle in started.values():
            handle.stop()


@pytest.fixture
def fleet_broker(
    fleet_broker_kind: BrokerKind, _fleet_brokers: dict[BrokerKind, BrokerHandle]
) -> BrokerHandle:
    """A private NATS or RabbitMQ broker (see `fleet_broker_kind`), shared by the session."""
    if fleet_broker_kind not in _fleet_brokers:
        _fleet_brokers[fleet_broker_kind] = start_broker(prefer=fleet_broker_kind)
    return _fleet_brokers[fleet_broker_kind]


@asynccontextmanager
async def _session_factory(
    broker: BrokerHandle, topic_root: TopicRoot
) -> AsyncIterator[SessionFactory]:
    running: list[tuple[MqttSession, asyncio.Task[None]]] = []

    async def start(
        name: str | None = None, *, connect: bool = True, **options: Any
    ) -> MqttSession:
        setting_names = set(SessionSettings.model_fields)
        settings = SessionSettings(
            host=broker.host,
            port=broker.port,
            client_id=name or f"client-{uuid.uuid4().hex[:8]}",
            reconnect_max_seconds=0.5,
            **{key: value for key, value in options.items() if key in setting_names},
        )
        session = MqttSession(
            settings,
            topic_root,
            **{key: value for key, value in options.items() if key not in setting_names},
        )
        task = asyncio.create_task(session.run(), name=f"session-{settings.client_id}")
        running.append((session, task))
        if connect:
            await session.wait_connected(timeout=10)
        return session

    try:
        yield start
    finally:
        for session, _task in running:
            session.request_stop()
        async with asyncio.timeout(20):
            await asyncio.gather(*(task for _session, task in running))


@pytest_asyncio.fixture
async def sessions(broker: BrokerHandle, topic_root: TopicRoot) -> AsyncIterator[SessionFactory]:
    """Start connected `MqttSession`s on `broker`; all are stopped at teardown.

    `await sessions("name", keepalive_seconds=5, will=..., on_connect=...)`: keyword
    arguments that are `SessionSettings` fields go to the settings, the rest to
    the session.
    """
    async with _session_factory(broker, topic_root) as start:
        yield start


@pytest_asyncio.fixture
async def fleet_sessions(
    fleet_broker: BrokerHandle, topic_root: TopicRoot
) -> AsyncIterator[SessionFactory]:
    """As `sessions`, on `fleet_broker` (NATS or RabbitMQ)."""
    async with _session_factory(fleet_broker, topic_root) as start:
        yield start
