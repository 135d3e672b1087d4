"""An attacker for the system tests: a plain paho client the project does not ship."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable

import msgpack
import paho.mqtt.client as paho

from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import TopicRoot, TopicSpec


class Attacker:
    """A raw MQTT client that publishes whatever bytes it is given."""

    def __init__(self, broker: BrokerHandle, root: TopicRoot) -> None:
        self.root = root
        self.host, self.port = broker.host, broker.port
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"attacker-{uuid.uuid4().hex[:8]}"
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def topic(self, spec: TopicSpec, value: str = "victim") -> str:
        return spec.topic(self.root, **{name: value for name in spec.parameters})

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=30)

    def retained(self, spec: TopicSpec, wait_s: float = 1.0) -> dict[str, bytes]:
        """What the broker retains on `spec`'s topics now (topic → payload), read by a
        fresh subscription (retained copies come at once)."""
        found: dict[str, bytes] = {}
        lock = threading.Lock()
        reader = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"reader-{uuid.uuid4().hex[:8]}"
        )

        def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
            if message.retain:
                with lock:
                    found[message.topic] = message.payload

        reader.on_message = on_message
        reader.connect(self.host, self.port)
        reader.subscribe(spec.filter(self.root), qos=1)
        reader.loop_start()
        try:
            time.sleep(wait_s)
        finally:
            reader.disconnect()
            reader.loop_stop()
        with lock:
            return dict(found)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bloated(spec: TopicSpec, extra_keys: int = 200_000) -> bytes:
    """A message of the topic's kind with `extra_keys` made-up fields (~3 MB): every
    key used to cost the validator an error to report."""
    kind = spec.kinds[0].model_fields["kind"].default
    document: dict[str, object] = {"version": 2, "kind": kind, "sender": "attacker"}
    document.update((f"k{number}", number) for number in range(extra_keys))
    if spec.encoding == "json":
        return json.dumps(document).encode()
    packed: bytes = msgpack.packb(document)
    return packed


def flood(
    attacker: Attacker, topics: Iterable[tuple[str, bytes]], rounds: int, gap_s: float
) -> int:
    """Each (topic, payload) once per round, rounds `gap_s` apart; returns messages sent."""
    chosen = list(topics)
    sent = 0
    for _ in range(rounds):
        for topic, payload in chosen:
            attacker.publish(topic, payload)
            sent += 1
        time.sleep(gap_s)
    return sent
