"""The MQTT connection loop: one client connection, kept alive for as long as it runs.

`MqttSession.run()` connects, re-subscribes every registered subscription, sets
`connected`, calls `on_connect` (re-announce: birth, state) and then dispatches
incoming messages to handlers until the connection drops; then it reconnects with
exponential backoff and jitter, forever, until `request_stop()` or cancellation.
aiomqtt (>=2.5,<3) has no automatic reconnect, hence this loop.

Choices, and why:
- **MQTT 3.1.1 only**, clean sessions: works on any broker, the embedded amqtt
  included; messages missed while disconnected are handled by the protocol's own
  timeouts and retries, not by a broker-side queue that could grow without bound.
- **TCP_NODELAY** on the client socket: without it a small QoS 1 request/response
  waits on Nagle + delayed ACK (~90 ms instead of ~1 ms on loopback).
- **Keepalive of seconds** (default 5): a silent device is declared dead after
  ~1.5× keepalive, and its Last Will fires. Pings run on the event loop, so
  blocking work on the loop gets a device declared dead — run heavy work elsewhere.
- **Bounded incoming queue**: a flood cannot exhaust memory; when full, further
  messages are dropped, counted (`SessionStatistics.dropped_overflow`) and logged
  (rate-limited). QoS 1 work lost that way is recovered by the protocol's timeouts.
- **Handlers are awaited one at a time, in arrival order** (state updates stay
  ordered); a handler that has long work to do hands it to its own task.
- **A peer's bad message never ends the loop**: an unknown topic, a malformed or
  oversized payload, or a handler's exception is logged (rate-limited) and counted.
  Only `asyncio.CancelledError` ends it.
- **Retained state that is damaged**: an empty retained payload (a deletion) or a
  refused one on a retained topic we subscribe to is reported to
  `on_retained_damage` (its owner publishes it again), never to the handlers.
- **Topic check on receipt**: amqtt sends, on connect, retained messages matching
  *any* client's filters; a message whose topic matches none of our subscriptions
  is dropped.
- **Every wait is bounded**: connect by paho's socket timeout and the CONNACK wait,
  publish/subscribe by `operation_timeout_seconds` (`ConnectionLost` on expiry).
- **An event outlives a reconnect**: when the connection drops before the broker
  acknowledged a non-retained message (a broker restart), `publish` sends it again
  on the next connection, within its timeout. The broker may have had the first
  copy: QoS 1 is at-least-once anyway, and every receiver of ours tolerates
  duplicates. Retained messages are state, not events: their owner publishes its
  current state on reconnect (`on_connect`), and a stale copy sent late could
  overwrite a newer one, so they fail with the connection instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import aiomqtt
import paho.mqtt.client as paho
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from .errors import ConnectionLost, ProtocolError, clip
from .ids import ID_PATTERN
from .messages import WireMessage
from .ratelimit import RateLimitedLog
from .tensors import DEFAULT_LIMITS, Limits
from .topics import (
    ParsedTopic,
    Publication,
    TopicRoot,
    TopicSpec,
    decode_for_topic,
    parse_topic,
    publication,
)

__all__ = [
    "Handler",
    "MqttSession",
    "Received",
    "SessionSettings",
    "SessionStatistics",
    "Subscription",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TCP_NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# How long to wait for a cancelled task before cancelling it again (see _cancel_and_wait).
_CANCEL_RETRY_SECONDS: Final = 0.5
# A connection that lasted this long was healthy: reconnect quickly after it drops.
_STABLE_SECONDS: Final = 10.0
# paho's return codes for "this connection is gone" (the publish never left).
_CONNECTION_GONE: Final = frozenset({paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST})
# MQTT allows 64 KiB topics; a log line quotes at most this much of one.
_MAX_LOGGED_TOPIC: Final = 200
# Characters valid in MQTT topics that some brokers refuse by closing the connection
# (older nats-server releases, Debian 12's 2.9.10 among them, for '.' and ' '; ids
# may contain '.'). After this many consecutive drops while publishing to such topics, the
# session stops sending them and fails those publishes at once, with the reason, rather
# than lose its connection (and fire its Will) on every one. Every
# _FRAGILE_TOPIC_RETRY_S it tries one again: two drops in a row may also have been a
# flapping network, which must not disable those topics for good.
_FRAGILE_TOPIC_CHARS: Final = frozenset(". ")
_FRAGILE_TOPIC_DROPS: Final = 2
_FRAGILE_TOPIC_RETRY_S: Final = 300.0
_FRAGILE_TOPIC_REASON: Final = (
    "this broker closes the connection on topics with '.' or ' ' (older nats-server "
    "releases do): use device, cluster, job and prefix names without '.' on it "
    "(docs/brokers.md)"
)


class SessionSettings(BaseModel):
    """How to reach the broker and how patiently."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="127.0.0.1", description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="broker TCP port")
    client_id: str = Field(
        pattern=ID_PATTERN,
        description="MQTT client id; a second connection with the same id evicts the first",
    )
    username: str | None = Field(
        default=None, description="MQTT user name, if the broker wants one"
    )
    password: SecretStr | None = Field(default=None, description="MQTT password")
    keepalive_seconds: int = Field(
        default=5,
        ge=2,
        le=600,
        description="ping interval; the broker declares us dead after ~1.5× this",
    )
    operation_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="longest wait for CONNACK, SUBACK, PUBACK or a connection to publish on",
    )
    reconnect_initial_seconds: float = Field(
        default=0.2, gt=0, description="first reconnect delay; doubles per failed attempt"
    )
    # A broker restart is over in seconds; every second the backoff adds after the
    # broker is back, each in-flight job waits too. A refused connect costs nothing.
    reconnect_max_seconds: float = Field(
        default=2.0, gt=0, description="longest reconnect delay (before jitter)"
    )
    max_queued_incoming: int = Field(
        default=256,
        ge=1,
        description="incoming messages buffered before the oldest handler finishes; "
        "further messages are dropped (bounds memory under a flood)",
    )
    max_payload_bytes: int = Field(
        default=DEFAULT_LIMITS.max_payload_bytes, ge=1024, description="largest payload accepted"
    )
    max_tensor_elements: int = Field(
        default=DEFAULT_LIMITS.max_elements, ge=1, description="largest tensor accepted"
    )
    tcp_nodelay: bool = Field(
        default=True, description="disable Nagle on the socket (off only to measure its cost)"
    )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_payload_bytes=self.max_payload_bytes, max_elements=self.max_tensor_elements
        )


@dataclass(frozen=True, slots=True)
class Received:
    """A validated incoming message, as a handler gets it."""

    topic: ParsedTopic
    message: WireMessage
    retained: bool


Handler = Callable[[Received], Awaitable[None]]


@dataclass(frozen=True, slots=True, eq=False)
class Subscription:
    """A registered handler for one topic filter; pass it to `unsubscribe`."""

    spec: TopicSpec
    topic_filter: str
    handler: Handler
    levels: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        levels = self.topic_filter.split("/")
        if levels[0] == "$share":  # $share/<group>/<filter>
            levels = levels[2:]
        object.__setattr__(self, "levels", tuple(levels))


def filter_matches(levels: Sequence[str], topic: Sequence[str]) -> bool:
    """Does a topic (split into levels) match a filter's levels (`+`, `#` wildcards)?

    What aiomqtt's `Topic.matches` answers, without building objects per call: it
    took 8 us per filter, some 0.1 ms per message over an agent's dozen filters,
    which a device's quota-limited event loop pays on every row message.
    """
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(topic) or (level != "+" and level != topic[index]):
            return False
    return len(topic) == len(levels)


@dataclass(slots=True)
class SessionStatistics:
    """Counters for monitoring; they only ever increase."""

    connects: int = 0
    connection_failures: int = 0
    received: int = 0
    handled: int = 0
    dropped_unrouted: int = 0
    """Messages whose topic matches no subscription (amqtt's retained extras, mostly)."""
    dropped_malformed: int = 0
    """Unknown topic, bad bytes, wrong version or kind, oversized, failed validation."""
    handler_errors: int = 0
    dropped_overflow: int = 0
    """Messages discarded because the incoming queue was full (a flood, or slow handlers)."""
    published: int = 0
    publish_failures: int = 0
    publish_retries: int = 0
    """Publishes sent again on a new connection (the previous one dropped before PUBACK)."""
    bytes_sent: int = 0
    """Payload bytes of acknowledged publishes (MQTT headers not counted)."""
    bytes_received: int = 0
    """Payload bytes of every incoming message, dropped ones included."""


_PENDING_PUBLISHES_WARNING = 1000
"""Publishes awaiting their PUBACK beyond which aiomqtt warns (a broker falling behind)."""
_ROUTES_MEMORY = 1024
"""Topics whose matching subscriptions are remembered (job topics name their job)."""
_ROUTED_TOPIC_CHARS = 512
"""Only topics this short are remembered: ours are far shorter, and a peer's
64 KB topic names must not take 1024 × 64 KB of memory."""


def _remember(memo: dict[str, T], topic: str, value: T) -> None:
    """A fact about a topic, kept while memory allows (see the two bounds above);
    a full memo starts again, as job topics come and go."""
    if len(topic) <= _ROUTED_TOPIC_CHARS:
        if len(memo) >= _ROUTES_MEMORY:
            memo.clear()
        memo[topic] = value


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it has really ended.

    Python 3.11's `asyncio.wait_for` (which aiomqtt uses for its CONNACK, SUBACK and
    DISCONNECT waits) can swallow a cancellation that arrives just as the awaited
    operation completes; the task then carries on. So cancel again until it is done.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_CANCEL_RETRY_SECONDS)


def _consume_disconnect_reason(client: aiomqtt.Client) -> None:
    """Mark the reason of an unexpected disconnect as seen.

    aiomqtt keeps it in a future that only its message iterator reads; when the
    connection drops elsewhere (while subscribing, or publishing in `on_connect`)
    nobody reads it and asyncio logs "Future exception was never retrieved" when
    the client is garbage collected. The reason was already logged by our loop.
    """
    future = getattr(client, "_disconnected", None)  # private: no public accessor
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()


async def _unless_lost(operation: Awaitable[T], lost: asyncio.Future[None] | None) -> T:
    """Await `operation` on a connection; `MqttError` as soon as that connection drops.

    aiomqtt waits for a PUBACK, SUBACK or UNSUBACK that a dead connection can never
    bring, until its own timeout (seconds) — holding up a publisher, or, for a
    (un)subscribe, the subscription lock and with it the next connection.
    """
    task = asyncio.ensure_future(operation)
    # Its outcome may come after we stopped waiting: retrieve it, so asyncio stays quiet.
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    waiting: set[asyncio.Future[Any]] = {task} if lost is None else {task, lost}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise aiomqtt.MqttError("the connection dropped before the broker acknowledged")
    return task.result()


def _counting_queue(
    on_overflow: Callable[[aiomqtt.Message], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """A queue class for aiomqtt's incoming messages that reports what does not fit.

    aiomqtt logs each message it cannot queue and counts nothing; this queue hands
    the message to `on_overflow` instead (and aiomqtt never sees `QueueFull`).
    """

    class CountingQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            if self.full():
                on_overflow(item)
                return
            super().put_nowait(item)

    return CountingQueue


class MqttSession:
    """One MQTT client connection with reconnects, subscriptions and typed publishing.

    Typical use inside a service's task group::

        session = MqttSession(settings, root, will=..., on_connect=announce)
        await session.subscribe(DEVICE_TASKS, on_task, device=device_id)
        group.create_task(session.run(), name="mqtt")
        await session.wait_connected(timeout=10)
        await session.publish(DEVICE_BIRTH, birth, device=device_id)
        ...
        session.request_stop()   # run() disconnects cleanly and returns

    `will` (a `Publication`, or a function building one per connection so that its
    timestamp is fresh) is the MQTT Last Will. `on_connect` runs after every
    (re)connect, once subscriptions are in place.
    """

    def __init__(
        self,
        settings: SessionSettings,
        root: TopicRoot,
        *,
        will: Publication | Callable[[], Publication | None] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        tls_context: ssl.SSLContext | None = None,
        on_retained_damage: Callable[[ParsedTopic], None] | None = None,
    ) -> None:
        self.settings = settings
        self.root = root
        self.statistics = SessionStatistics()
        self._limits = settings.limits
        self._will = will
        self._on_connect = on_connect
        self.on_retained_damage = on_retained_damage
        """Called (no awaiting) with the topic of a retained message on a subscribed
        retained topic that was deleted (empty) or refused as malformed."""
        self._tls_context = tls_context
        self._subscriptions: list[Subscription] = []
        # Topic -> the subscriptions it matches; cleared whenever those change.
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self._parsed: dict[str, ParsedTopic] = {}  # (the catalogue never changes)
        self._refused: dict[str, int] = {}
        self._subscription_lock = asyncio.Lock()
        self._client: aiomqtt.Client | None = None
        # Completed when the current connection ends (publishes waiting on it give up).
        self._connection_lost: asyncio.Future[None] | None = None
        self._connection_task: asyncio.Task[None] | None = None
        self._queue_type = _counting_queue(self._on_overflow)
        self._connected = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._running = False
        self._caught_up_at = time.monotonic()
        self._random = random.Random()
        self._log = RateLimitedLog(logger)
        self._fragile_topic_drops = 0
        self._fragile_topics_refused_at = -math.inf
        names = (root.prefix, root.cluster, settings.client_id)
        if any(not _FRAGILE_TOPIC_CHARS.isdisjoint(name) for name in names):
            # Ours are the ids in our topics (the client id is the device id of agents).
            logger.warning(
                "topic prefix %r, cluster %r or id %r contains '.': fine on Mosquitto, but "
                "older nats-server releases close the connection on such topics and RabbitMQ's "
                "MQTT plugin turns '.' into a topic level (docs/brokers.md)",
                *names,
            )

    # --- state -----------------------------------------------------------------------

    @property
    def connected(self) -> asyncio.Event:
        """Set while connected and subscribed; cleared as soon as the connection drops."""
        return self._connected

    async def wait_connected(self, timeout: float) -> None:  # noqa: ASYNC109 - raises ConnectionLost
        """Wait until connected; `ConnectionLost` after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise ConnectionLost(
                f"not connected to {self.settings.host}:{self.settings.port} after {timeout} s"
            ) from None

    def behind_since(self) -> float | None:
        """While received messages wait to be handled: the monotonic time the queue
        was last empty (nothing newer than that has been read); None when none wait.

        Silence should not be judged past this point: a heartbeat may be queued."""
        client = self._client
        if client is None or len(client.messages) == 0:
            return None
        return self._caught_up_at

    def tcp_nodelay_enabled(self) -> bool | None:
        """Whether Nagle is off on the live socket; None when not connected."""
        client = self._client
        if client is None:
            return None
        # aiomqtt exposes no socket accessor; paho's client (its private `_client`) does.
        sock = client._client.socket()
        if not isinstance(sock, socket.socket):
            return None
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until `request_stop()` or cancellation; then disconnect cleanly.

        A clean disconnect sends DISCONNECT, so the broker does *not* publish the
        Will: publish a `stopped` state before stopping. A crash (or kill -9) leaves
        the Will to the broker.
        """
        if self._running:
            raise RuntimeError("MqttSession.run() is already running")
        self._running = True
        connection = asyncio.create_task(
            self._connection_loop(), name=f"mqtt-connection-{self.settings.client_id}"
        )
        self._connection_task = connection
        stop = asyncio.create_task(
            self._stop_requested.wait(), name=f"mqtt-stop-{self.settings.client_id}"
        )
        try:
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():  # the loop only ends on its own through a bug: surface it
                connection.result()
        finally:
            stop.cancel()
            await _cancel_and_wait(connection)
            await asyncio.gather(stop, return_exceptions=True)
            self._connected.clear()
            self._stop_requested.clear()  # the session may run again later
            self._running = False

    def request_stop(self) -> None:
        """Make `run()` disconnect and return (safe to call at any time, also twice)."""
        self._stop_requested.set()

    async def _connection_loop(self) -> None:
        failures = 0
        while True:
            delay = self._backoff(0)
            connected_at: float | None = None
            client = self._new_client()
            try:
                async with client:
                    connected_at = time.monotonic()
                    await self._start_session(client)
                    await self._receive(client)
            except (aiomqtt.MqttError, ConnectionLost) as error:
                self.statistics.connection_failures += 1
                # Only a connection that held for a while resets the backoff: two
                # processes sharing a client id evict each other at once, and must
                # not do so in a tight loop.
                if connected_at is not None and time.monotonic() - connected_at > _STABLE_SECONDS:
                    failures = 0
                delay = self._backoff(failures)
                failures += 1
                if connected_at is not None and not self._connected.is_set():
                    self._explain_refused_subscription()
                self._log.log(
                    logging.WARNING,
                    "connection",
                    "MQTT connection to %s:%d failed or lost (%s); retrying in %.2f s",
                    self.settings.host,
                    self.settings.port,
                    error,
                    delay,
                )
            finally:
                self._connected.clear()
                self._client = None
                lost = self._connection_lost
                if lost is not None and not lost.done():
                    lost.set_result(None)
                _consume_disconnect_reason(client)
            await asyncio.sleep(delay)

    def _explain_refused_subscription(self) -> None:
        """The connection dropped while subscribing: where a filter has a character some
        brokers refuse, say so (the reconnect loop would otherwise only repeat itself)."""
        fragile = [name for name, _ in self._filters() if not _FRAGILE_TOPIC_CHARS.isdisjoint(name)]
        if fragile:
            self._log.log(
                logging.ERROR,
                "fragile-subscription",
                "the broker closed the connection while we subscribed to %s; %s",
                fragile[0][:_MAX_LOGGED_TOPIC],
                _FRAGILE_TOPIC_REASON,
            )

    def _new_client(self) -> aiomqtt.Client:
        will = self._will() if callable(self._will) else self._will
        password = self.settings.password
        client = aiomqtt.Client(
            self.settings.host,
            self.settings.port,
            identifier=self.settings.client_id,
            username=self.settings.username,
            password=password.get_secret_value() if password is not None else None,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            keepalive=self.settings.keepalive_seconds,
            timeout=self.settings.operation_timeout_seconds,
            will=(
                aiomqtt.Will(will.topic, will.payload, qos=will.qos, retain=will.retain)
                if will is not None
                else None
            ),
            max_queued_incoming_messages=self.settings.max_queued_incoming,
            queue_type=self._queue_type,
            socket_options=[_TCP_NODELAY] if self.settings.tcp_nodelay else (),
            tls_context=self._tls_context,
            logger=logging.getLogger(f"{__name__}.aiomqtt"),
        )
        # aiomqtt warns once per publish while more than 10 await their PUBACK; a
        # leader scattering a job's tasks has dozens out by design, and on a board a
        # log line per publish costs more than the publish.
        client.pending_calls_threshold = _PENDING_PUBLISHES_WARNING
        return client

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random.

        Jitter spreads the reconnects of a whole fleet after a broker restart.
        """
        cap = min(
            self.settings.reconnect_max_seconds,
            self.settings.reconnect_initial_seconds * 2.0 ** min(failures, 30),
        )
        return cap / 2 + self._random.uniform(0, cap / 2)

    async def _start_session(self, client: aiomqtt.Client) -> None:
        async with self._subscription_lock:
            self._client = client
            self._connection_lost = asyncio.get_running_loop().create_future()
            filters = dict(self._filters())
            if filters:
                codes = await client.subscribe(list(filters.items()))
                self._note_granted(list(filters), codes)
        self.statistics.connects += 1
        self._connected.set()
        logger.info(
            "connected to MQTT broker %s:%d as %s",
            self.settings.host,
            self.settings.port,
            self.settings.client_id,
        )
        if self._on_connect is not None:
            await self._on_connect()

    def _filters(self) -> Iterator[tuple[str, int]]:
        for subscription in self._subscriptions:
            yield subscription.topic_filter, subscription.spec.qos

    @property
    def refused_subscriptions(self) -> dict[str, int]:
        """Topic filters whose latest SUBACK was a failure (code >= 0x80), with the code.

        MQTT 3.1.1 has one failure code (0x80); a broker may also grant a filter and
        then withhold what the account may not read (Mosquitto does): that shows
        only as silence, which the callers that expect retained records report."""
        return dict(self._refused)

    def _note_granted(self, filters: list[str], codes: object) -> None:
        if not isinstance(codes, list | tuple):
            return
        for topic_filter, code in zip(filters, codes, strict=False):
            value = getattr(code, "value", code)
            if isinstance(value, int) and value >= 0x80:
                self._refused[topic_filter] = value
                logger.error("broker refused subscription to %s (code %#x)", topic_filter, value)
            else:
                self._refused.pop(topic_filter, None)

    # --- receiving -------------------------------------------------------------------

    def _on_overflow(self, message: aiomqtt.Message) -> None:
        self.statistics.dropped_overflow += 1
        topic = message.topic.value
        self._log.log(
            logging.WARNING,
            "overflow",
            "incoming queue full (%d messages): dropped a message on %s",
            self.settings.max_queued_incoming,
            topic if len(topic) <= _MAX_LOGGED_TOPIC else clip(topic),
        )

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if len(client.messages) == 0:  # nothing was waiting behind this one
                self._caught_up_at = time.monotonic()
            await self._dispatch(message)
            if len(client.messages) == 0:
                self._caught_up_at = time.monotonic()

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        self.statistics.received += 1
        topic = message.topic.value
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        self.statistics.bytes_received += len(payload)
        matching = self._routes.get(topic)
        if matching is None:
            levels = topic.split("/")
            matching = tuple(s for s in self._subscriptions if filter_matches(s.levels, levels))
            _remember(self._routes, topic, matching)
        if not payload:
            # An empty retained payload deletes a retained message; nothing to handle,
            # but the message's owner may want to say it again.
            if matching:
                self._retained_damage(topic)
            return
        if not matching:
            self.statistics.dropped_unrouted += 1
            logger.debug("dropped message on %s: no subscription matches", topic)
            return
        try:
            parsed = self._parsed.get(topic)
            if parsed is None:
                parsed = parse_topic(self.root, topic)
                _remember(self._parsed, topic, parsed)
            decoded = decode_for_topic(parsed, bytes(payload), self._limits)
        except ProtocolError as error:
            # A live delivery says nothing of what the broker retained (the flag is
            # only set for old copies): on a retained topic, assume the worst.
            self._retained_damage(topic)
            self.statistics.dropped_malformed += 1
            # Keyed by catalogue topic, not by the topic string: its levels are the
            # sender's choice and would grow the rate limiter's table without bound.
            self._log.log(
                logging.WARNING,
                f"malformed:{matching[0].spec.name}:{type(error).__name__}",
                "dropped malformed message on %s: %s: %s",
                topic if len(topic) <= _MAX_LOGGED_TOPIC else clip(topic),
                type(error).__name__,
                error,
            )
            return
        received = Received(topic=parsed, message=decoded, retained=bool(message.retain))
        for subscription in matching:
            try:
                await subscription.handler(received)
            except Exception:
                self.statistics.handler_errors += 1
                self._log.log(
                    logging.ERROR,
                    f"handler:{subscription.topic_filter}",
                    "handler for %s failed on %s from %s",
                    subscription.topic_filter,
                    decoded.kind,
                    decoded.sender,
                    exc_info=True,
                )
            else:
                self.statistics.handled += 1

    def _retained_damage(self, topic: str) -> None:
        callback = self.on_retained_damage
        if callback is None:
            return
        try:
            parsed = parse_topic(self.root, topic)
        except ProtocolError:
            return
        if parsed.spec.retain:
            callback(parsed)

    # --- subscribing -----------------------------------------------------------------

    async def subscribe(self, spec: TopicSpec, handler: Handler, **parameters: str) -> Subscription:
        """Register `handler` for `spec` (parameters not given match any value).

        When connected, this waits for the broker's SUBACK, so messages published
        afterwards are delivered; otherwise the subscription is made on connect.
        The subscription is renewed after every reconnect.
        """
        subscription = Subscription(spec, spec.filter(self.root, **parameters), handler)
        async with self._subscription_lock:
            known = any(s.topic_filter == subscription.topic_filter for s in self._subscriptions)
            self._subscriptions.append(subscription)
            self._routes.clear()
            client = self._client
            if client is not None and not known:
                try:
                    codes = await _unless_lost(
                        client.subscribe(subscription.topic_filter, qos=spec.qos),
                        self._connection_lost,
                    )
                except aiomqtt.MqttError as error:
                    # The connection is failing; the next connect subscribes again.
                    logger.debug("subscribe to %s deferred: %s", subscription.topic_filter, error)
                else:
                    self._note_granted([subscription.topic_filter], codes)
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Remove a subscription; the broker is told when no other handler shares its filter."""
        async with self._subscription_lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)
            self._routes.clear()
            shared = any(s.topic_filter == subscription.topic_filter for s in self._subscriptions)
            if not shared:
                self._refused.pop(subscription.topic_filter, None)
            client = self._client
            if client is not None and not shared:
                try:
                    await _unless_lost(
                        client.unsubscribe(subscription.topic_filter), self._connection_lost
                    )
                except aiomqtt.MqttError as error:
                    logger.debug("unsubscribe from %s failed: %s", subscription.topic_filter, error)

    # --- publishing ------------------------------------------------------------------

    def prepare(self, spec: TopicSpec, message: WireMessage, **parameters: str) -> Publication:
        """Encode `message` for `spec` under this session's root (e.g. to build a Will)."""
        return publication(self.root, spec, message, limits=self._limits, **parameters)

    async def publish(
        self,
        spec: TopicSpec,
        message: WireMessage,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a default bound that callers may tighten
        **parameters: str,
    ) -> None:
        """Encode and publish `message` on `spec`'s topic with its QoS and retain flag.

        Waits for a connection and, at QoS 1, for the broker's PUBACK; raises
        `ConnectionLost` when that takes longer than `timeout` (default: the
        settings' operation timeout). Protocol errors (`PayloadTooLarge`,
        `UnexpectedKind`, `UnknownTopic`) are raised before anything is sent.
        """
        await self.publish_raw(self.prepare(spec, message, **parameters), timeout=timeout)

    async def publish_raw(
        self,
        item: Publication,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a default bound that callers may tighten
    ) -> None:
        """Publish an already encoded `Publication` (see `publish`)."""
        limit = self.settings.operation_timeout_seconds if timeout is None else timeout
        # Only events are sent again (see the module docstring). `on_connect` runs
        # inside the connection loop and cannot wait for the next connection.
        may_retry = not item.retain and asyncio.current_task() is not self._connection_task
        fragile = not _FRAGILE_TOPIC_CHARS.isdisjoint(item.topic)
        if fragile and self._fragile_topic_drops >= _FRAGILE_TOPIC_DROPS:
            if time.monotonic() - self._fragile_topics_refused_at < _FRAGILE_TOPIC_RETRY_S:
                self.statistics.publish_failures += 1
                raise ConnectionLost(f"publish to {item.topic} not sent: {_FRAGILE_TOPIC_REASON}")
            self._fragile_topic_drops = _FRAGILE_TOPIC_DROPS - 1  # one more try
        try:
            async with asyncio.timeout(limit):
                while True:
                    await self._connected.wait()
                    client, lost = self._client, self._connection_lost
                    if client is None or lost is None:  # pragma: no cover - set together
                        raise ConnectionLost("connection dropped while publishing")
                    try:
                        await _unless_lost(
                            client.publish(
                                item.topic,
                                item.payload,
                                qos=item.qos,
                                retain=item.retain,
                                timeout=math.inf,
                            ),
                            lost,
                        )
                        break
                    except aiomqtt.MqttError as error:
                        gone = lost.done() or (
                            isinstance(error, aiomqtt.MqttCodeError)
                            and error.rc in _CONNECTION_GONE
                        )
                        if fragile and gone:
                            self._fragile_topic_dropped(item.topic)
                        if not (may_retry and gone) or (
                            fragile and self._fragile_topic_drops >= _FRAGILE_TOPIC_DROPS
                        ):
                            raise
                        logger.debug("publish to %s: %s; sending it again", item.topic, error)
                    await lost  # the connection loop notices the drop soon
                    self.statistics.publish_retries += 1
        except TimeoutError:
            self.statistics.publish_failures += 1
            raise ConnectionLost(f"publish to {item.topic} timed out after {limit} s") from None
        except aiomqtt.MqttError as error:
            self.statistics.publish_failures += 1
            if fragile and self._fragile_topic_drops >= _FRAGILE_TOPIC_DROPS:
                raise ConnectionLost(
                    f"publish to {item.topic} failed: {_FRAGILE_TOPIC_REASON}"
                ) from error
            raise ConnectionLost(f"publish to {item.topic} failed: {error}") from error
        self.statistics.published += 1
        self.statistics.bytes_sent += len(item.payload)
        if fragile:
            self._fragile_topic_drops = 0  # this broker takes them

    def _fragile_topic_dropped(self, topic: str) -> None:
        self._fragile_topic_drops += 1
        if self._fragile_topic_drops == _FRAGILE_TOPIC_DROPS:
            self._fragile_topics_refused_at = time.monotonic()
            logger.error(
                "the broker closed the connection on %d publishes in a row to topics with "
                "'.' or ' ' (the last: %s); such publishes now fail without being sent for "
                "%.0f s. %s",
                self._fragile_topic_drops,
                topic[:_MAX_LOGGED_TOPIC],
                _FRAGILE_TOPIC_RETRY_S,
                _FRAGILE_TOPIC_REASON,
            )

    async def clear_retained(
        self,
        spec: TopicSpec,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a default bound that callers may tighten
        **parameters: str,
    ) -> None:
        """Delete the retained message of a retained topic (an empty retained publish)."""
        if not spec.retain:
            raise ValueError(f"topic {spec.name} is not retained")
        item = Publication(spec.topic(self.root, **parameters), b"", qos=spec.qos, retain=True)
        await self.publish_raw(item, timeout=timeout)
