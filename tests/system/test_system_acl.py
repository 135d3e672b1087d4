"""The shipped ACL on a real Mosquitto: nobody can speak for anybody else.

The broker is configured as the Ansible role configures it: no anonymous access,
a hashed password file, and the ACL rendered from the role's own template
(`deploy/ansible/roles/mosquitto/templates/acl.j2`). Plain paho clients then try,
as each identity, to publish on the topics the issue's attacker used; a monitor
that may read everything reports what got through.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edgedi.broker.server import (
    BrokerHandle,
    MosquittoBroker,
    _launch_mosquitto,
    find_mosquitto,
    free_port,
)
from edgedi.broker.topics import CATALOGUE

jinja2 = pytest.importorskip("jinja2")

TEMPLATE = Path(__file__).parents[2] / "deploy/ansible/roles/mosquitto/templates/acl.j2"
PREFIX, CLUSTER = "edgedi/v1", "acl"
ROOT = f"{PREFIX}/{CLUSTER}"
DEVICES = [
    {"id": "pi-1", "password": "secret-pi-1", "candidate": True},
    {"id": "pi-2", "password": "secret-pi-2", "candidate": True},
    {"id": "pi-3", "password": "secret-pi-3", "candidate": False},
]
CLIENTS = [
    {"username": "camera", "password": "secret-camera"},
    {"username": "operator", "password": "secret-operator", "monitor": True},
]
PASSWORDS = {d["id"]: d["password"] for d in DEVICES} | {
    c["username"]: c["password"] for c in CLIENTS
}


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    executable = find_mosquitto()
    if executable is None:
        pytest.skip("mosquitto is not installed")
    folder = tmp_path_factory.mktemp("acl-broker")
    acl = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(TEMPLATE.read_text())
    (folder / "edgedi.acl").write_text(
        acl.render(
            ansible_managed="test",
            mosquitto_cluster=CLUSTER,
            mosquitto_topic_root=PREFIX,
            mosquitto_devices=DEVICES,
            mosquitto_clients=CLIENTS,
        )
    )
    passwords = folder / "edgedi.passwd"
    passwords.write_text("".join(f"{user}:{secret}\n" for user, secret in PASSWORDS.items()))
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True, timeout=30)
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
        f"acl_file {folder / 'edgedi.acl'}\npersistence false\n"
        # Run as root, Mosquitto would drop to its own user, which cannot read our files.
        f"user {getpass.getuser()}\n"
    )
    process = _launch_mosquitto(executable, config, folder / "mosquitto.log")
    broker = MosquittoBroker(
        "127.0.0.1",
        port,
        process,
        tempfile.TemporaryDirectory(),
        folder / "mosquitto.log",
        executable,
    )
    try:
        _wait_for_port(port, process)
        yield broker
    finally:
        broker.stop()


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    """Until the listener accepts TCP (an MQTT probe would be refused: no anonymous)."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        assert process.poll() is None, "mosquitto exited while starting"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"mosquitto is not listening on {port}")


def _client(broker: BrokerHandle, user: str | None, password: str | None = None) -> paho.Client:
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}"
    )
    if user is not None:
        client.username_pw_set(user, password if password is not None else PASSWORDS[user])
    return client


def _connects(broker: BrokerHandle, user: str | None, password: str | None = None) -> bool:
    client = _client(broker, user, password)
    accepted = threading.Event()

    def on_connect(*args: object) -> None:
        reason = args[3]
        if not getattr(reason, "is_failure", True):
            accepted.set()

    client.on_connect = on_connect
    client.loop_start()
    try:
        client.connect(broker.host, broker.port)
        accepted.wait(3.0)
    finally:
        client.disconnect()
        client.loop_stop()
    return accepted.is_set()


class Monitor:
    """The operator: reads everything under the root and notes what arrived."""

    def __init__(self, broker: BrokerHandle) -> None:
        self.seen: set[tuple[str, bytes]] = set()
        self.lock = threading.Lock()
        self.client = _client(broker, "operator")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{ROOT}/#", qos=1)
        self.client.loop_start()
        time.sleep(0.5)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.seen.add((message.topic, message.payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# (who, topic below the root, allowed): what the attacker of issue 12 tried, as
# each identity; `allowed` is what the ACL must let through.
ATTEMPTS = [
    ("pi-2", "devices/pi-2/birth", True),
    ("pi-2", "devices/pi-1/birth", False),  # a device speaking for another
    ("pi-2", "devices/pi-1/heartbeat", False),
    ("pi-2", "devices/pi-1/peer/pi-3", False),
    ("pi-3", "jobs/j-1/tiles/pi-3", True),
    ("pi-3", "jobs/j-1/tiles/pi-1", False),  # another worker's tile result
    ("pi-3", "jobs/j-1/partials/pi-2", False),
    ("pi-3", "results/j-1/pi-3", False),  # a worker answering a job
    ("pi-3", "planner/leader", False),  # a worker claiming leadership
    ("pi-2", "results/j-1/pi-2", True),
    ("pi-2", "results/j-1/pi-1", False),  # a candidate answering as another
    ("camera", "jobs/submit", True),
    ("camera", "results/j-1/pi-1", False),  # a client may only submit and read
    ("camera", "devices/camera/birth", False),
    ("camera", "jobs/j-1/tiles/camera", False),
    ("camera", "planner/leader", False),
    ("camera", "plans/current", False),
    ("camera", "control/rebirth", False),
    ("camera", "devices/pi-1/tasks", False),
]


def test_the_catalogue_is_covered() -> None:
    patterns = {spec.pattern.split("/")[0] for spec in CATALOGUE}
    assert {topic.split("/")[0] for _, topic, _ in ATTEMPTS} <= patterns


def test_an_outsider_cannot_even_connect(acl_broker: BrokerHandle) -> None:
    assert not _connects(acl_broker, None)
    assert not _connects(acl_broker, "pi-1", "wrong password")
    assert not _connects(acl_broker, "mallory", "anything")
    assert _connects(acl_broker, "pi-1")


def test_nobody_can_publish_as_anybody_else(acl_broker: BrokerHandle) -> None:
    monitor = Monitor(acl_broker)
    clients: dict[str, paho.Client] = {}
    try:
        for user in {who for who, _, _ in ATTEMPTS}:
            client = _client(acl_broker, user)
            client.connect(acl_broker.host, acl_broker.port)
            client.loop_start()
            clients[user] = client
        for number, (who, topic, _) in enumerate(ATTEMPTS):
            payload = f"attempt {number}".encode()
            clients[who].publish(f"{ROOT}/{topic}", payload, qos=1).wait_for_publish(5)
        time.sleep(1.0)
        with monitor.lock:
            seen = set(monitor.seen)
    finally:
        for client in clients.values():
            client.disconnect()
            client.loop_stop()
        monitor.close()
    wrong = [
        f"{who} -> {topic}: {'blocked' if allowed else 'delivered'}"
        for number, (who, topic, allowed) in enumerate(ATTEMPTS)
        if ((f"{ROOT}/{topic}", f"attempt {number}".encode()) in seen) != allowed
    ]
    assert not wrong, wrong
