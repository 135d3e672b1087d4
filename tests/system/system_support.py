"""What the system tests share: the cluster's layout and a handle on it (see conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho

from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import PLAN_CURRENT, TopicRoot

AGENTS = ("sys-1", "sys-2", "sys-3")
MODELS = ("tiny-edgedi", "tiny", "resnet18-edgedi")
INPUT_SIZE = 64
START_TIMEOUT_S = 90.0


@dataclass
class SystemCluster:
    broker: BrokerHandle
    root: TopicRoot
    logs: dict[str, Path]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    def cli(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "edgedi.agent.cli", *arguments]

    def root_arguments(self) -> list[str]:
        return ["--topic-root", self.root.prefix, "--cluster", self.root.cluster]

    def log(self, device: str) -> str:
        return self.logs[device].read_text(errors="replace")

    def alive(self) -> dict[str, bool]:
        return {device: process.poll() is None for device, process in self.processes.items()}


def retained_plan(
    broker: BrokerHandle, root: TopicRoot, timeout: float
) -> dict[str, object] | None:
    """The retained plan announcement (as JSON), read with plain paho."""
    found: dict[str, object] = {}
    arrived = threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        if message.payload:
            found.update(json.loads(message.payload))
            arrived.set()

    client_id = f"probe-{uuid.uuid4().hex[:8]}"
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(PLAN_CURRENT.topic(root), qos=1)
    client.loop_start()
    try:
        arrived.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return found or None
