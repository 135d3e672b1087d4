"""The shipped ACL on a real Mosquitto: nobody can speak for anybody else.

The broker is configured as the Ansible role configures it: no anonymous access,
a hashed password file, and the ACL rendered from the role's own template
(`deploy/ansible/roles/mosquitto/templates/acl.j2`). Plain paho clients then try,
as each identity, to publish on the topics the issue's attacker used; a monitor
that may read everything reports what got through.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import role_templates

from edgedi.broker.server import (
    BrokerHandle,
    MosquittoBroker,
    _launch_mosquitto,
    find_mosquitto,
    free_port,
)
from edgedi.broker.topics import (
    CATALOGUE,
    DEVICE_HEARTBEAT,
    DEVICE_TASKS,
    JOB_RESULT,
    JOB_SUBMIT,
    JOB_TILES,
    PLAN_CURRENT,
    PLANNER_LEADER,
    TopicRoot,
)

jinja2 = pytest.importorskip("jinja2")

LOOPBACK = ipaddress.ip_address("127.0.0.1")
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


# --- the commands over TLS under the shipped ACL ----------------------------------------
#
# A Mosquitto started from the role's rendered files (mosquitto.conf.j2 with TLS and
# client certificates required, acl.j2, passwords.j2), throwaway certificates, and
# real processes: a leader-eligible agent, a worker-only agent, and `edgedi infer`,
# `status` and `watch` as a client account, all with the same connection flags.
# The broker logs every subscription; each one the code made is then probed for
# delivery under its account: Mosquitto grants every SUBACK and applies the ACL
# when it delivers, so only a delivered message proves a grant.

TLS_CLUSTER = "tls"
TLS_ROOT = f"{PREFIX}/{TLS_CLUSTER}"
TLS_DEVICES = [
    {"id": "lead-1", "password": "secret-lead-1", "candidate": True},
    {"id": "work-1", "password": "secret-work-1", "candidate": False},
]
TLS_CLIENT = {"username": "camera", "password": "secret-camera"}
# Test-only, appended to the rendered ACL: an account that may write every topic of
# the cluster, to publish the probes. It grants nothing to anybody else.
PROBE_WRITER = {"username": "probe-writer", "password": "secret-probe-writer"}
AGENT_START_S = 120.0


@dataclass
class TlsBroker:
    handle: BrokerHandle
    folder: Path
    log: Path
    ca: Path
    client_cert: Path
    client_key: Path

    def passwords(self, user: str) -> Path:
        return self.folder / f"{user}.password"

    def flags(self, user: str, cluster: str = TLS_CLUSTER) -> list[str]:
        """The connection flags every command takes (edgedi.agent.connection)."""
        return [
            "--broker", f"127.0.0.1:{self.handle.port}",
            "--topic-root", PREFIX,
            "--cluster", cluster,
            "--username", user,
            "--password-file", str(self.passwords(user)),
            "--tls-ca", str(self.ca),
            "--tls-cert", str(self.client_cert),
            "--tls-key", str(self.client_key),
        ]  # fmt: skip

    def paho(self, user: str) -> paho.Client:
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"{user}-probe-{uuid.uuid4().hex[:6]}"
        )
        client.username_pw_set(user, self.passwords(user).read_text())
        client.tls_set(
            ca_certs=str(self.ca), certfile=str(self.client_cert), keyfile=str(self.client_key)
        )
        return client


def _certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client one."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("edgedi test CA"))
        .issuer_name(name("edgedi test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, common, names in (
        ("server", "localhost", [x509.DNSName("localhost"), x509.IPAddress(LOOPBACK)]),
        ("client", "edgedi-client", None),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
                        if role == "server"
                        else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
                    ]
                ),
                critical=False,
            )
        )
        if names is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(ca_key, hashes.SHA256())
        paths[role] = folder / f"{role}.crt"
        paths[role].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}_key"] = folder / f"{role}.key"
        write_key(key, paths[f"{role}_key"])
    return paths


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    executable = find_mosquitto()
    if executable is None:
        pytest.skip("mosquitto is not installed")
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    folder = tmp_path_factory.mktemp("tls-broker")
    certificates = _certificates(folder)
    port = free_port()
    log = folder / "mosquitto.log"
    accounts = {
        "mosquitto_cluster": TLS_CLUSTER,
        "mosquitto_topic_root": PREFIX,
        "mosquitto_devices": TLS_DEVICES,
        "mosquitto_clients": [TLS_CLIENT],
    }
    files = {
        "mosquitto_port": port,
        "mosquitto_bind_address": "127.0.0.1",
        "mosquitto_tls": True,
        "mosquitto_tls_certfile": str(certificates["server"]),
        "mosquitto_tls_keyfile": str(certificates["server_key"]),
        "mosquitto_tls_cafile": str(certificates["ca"]),
        "mosquitto_tls_require_client_certificate": True,
        "mosquitto_local_listener_port": 0,
        "mosquitto_include_dir": "",
        "mosquitto_password_file": str(folder / "edgedi.passwd"),
        "mosquitto_acl_file": str(folder / "edgedi.acl"),
        "mosquitto_log_dest": f"file {log}",
        # `subscribe`: the broker logs every subscription, which the test reads back.
        "mosquitto_log_types": ["error", "warning", "notice", "information", "subscribe"],
    }
    acl = role_templates.render("mosquitto", "acl.j2", **accounts)
    acl += f"\nuser {PROBE_WRITER['username']}\ntopic write {TLS_ROOT}/#\n"
    (folder / "edgedi.acl").write_text(acl)
    passwords = role_templates.render(
        "mosquitto",
        "passwords.j2",
        **{**accounts, "mosquitto_clients": [TLS_CLIENT, PROBE_WRITER]},
    )
    (folder / "edgedi.passwd").write_text(passwords)
    for line in passwords.splitlines():
        user, secret = line.split(":", 1)
        (folder / f"{user}.password").write_text(secret)
    subprocess.run(
        ["mosquitto_passwd", "-U", str(folder / "edgedi.passwd")], check=True, timeout=30
    )
    config = folder / "mosquitto.conf"
    # Run as root, Mosquitto would drop to its own user, which cannot read our files.
    config.write_text(
        role_templates.render("mosquitto", "mosquitto.conf.j2", **accounts, **files)
        + f"user {getpass.getuser()}\n"
    )
    process = _launch_mosquitto(executable, config, folder / "mosquitto.out")
    handle = MosquittoBroker(
        "127.0.0.1", port, process, tempfile.TemporaryDirectory(), log, executable
    )
    try:
        _wait_for_port(port, process)
        yield TlsBroker(
            handle,
            folder,
            log,
            certificates["ca"],
            certificates["client"],
            certificates["client_key"],
        )
    finally:
        handle.stop()


def _cli(*arguments: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgedi.agent.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_environment(),
        check=False,
    )


def _environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGEDI_")}
    for name in ("NOTIFY_SOCKET", "STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"):
        environment.pop(name, None)
    return environment


def _subscriptions(log: Path) -> dict[str, set[str]]:
    """User name -> topic filters it subscribed to, from the broker's log."""
    users: dict[str, str] = {}
    found: dict[str, set[str]] = {}
    connected = re.compile(r"New client connected from \S+ as (\S+) \(.*u'([^']*)'\)")
    subscribed = re.compile(r"^(\S+) [012] (\S+)$")
    for line in log.read_text(errors="replace").splitlines():
        if match := connected.search(line):
            users[match[1]] = match[2]
        elif (match := subscribed.match(line)) and match[1] in users:
            found.setdefault(users[match[1]], set()).add(match[2])
    return found


def _delivered(broker: TlsBroker, user: str, filters: set[str]) -> set[str]:
    """Which of `filters` deliver a message to `user` (one probe publish per filter)."""
    concrete = {
        topic_filter: "/".join(
            "probe" if level in {"+", "#"} else level for level in topic_filter.split("/")
        )
        for topic_filter in filters
    }
    arrived: set[str] = set()
    lock = threading.Lock()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with lock:
            arrived.add(message.payload.decode())

    reader, writer = broker.paho(user), broker.paho(PROBE_WRITER["username"])
    reader.on_message = on_message
    reader.connect("127.0.0.1", broker.handle.port)
    writer.connect("127.0.0.1", broker.handle.port)
    reader.loop_start()
    writer.loop_start()
    try:
        for topic_filter in sorted(filters):
            reader.subscribe(topic_filter, qos=1)
        time.sleep(0.5)  # the SUBACKs (granted whatever the ACL says: see above)
        for topic_filter in sorted(filters):
            writer.publish(concrete[topic_filter], topic_filter.encode(), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            with lock:
                if arrived >= filters:
                    break
            time.sleep(0.05)
    finally:
        for client in (reader, writer):
            client.disconnect()
            client.loop_stop()
    with lock:
        return set(arrived)


def _start_agent(
    broker: TlsBroker, device: dict[str, Any], folder: Path
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "edgedi.agent.cli", "agent",
        *broker.flags(str(device["id"])),
        "--id", str(device["id"]),
        "--candidate" if device["candidate"] else "--no-candidate",
        "--threads", "1",
        "--profile-seconds", "0.3",
        "--models", "tiny-edgedi",
        "--input-size", "64",
        "--state-dir", str(folder / f"state-{device['id']}"),
        "--log-level", "info",
    ]  # fmt: skip
    with (folder / f"{device['id']}.log").open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_environment())


@pytest.mark.slow
def test_commands_work_over_tls_under_the_shipped_acl(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    agents = {str(d["id"]): _start_agent(tls_broker, d, tmp_path) for d in TLS_DEVICES}
    client = str(TLS_CLIENT["username"])
    root = TopicRoot(PREFIX, TLS_CLUSTER)
    try:
        # `edgedi status` as the client account, until the plan names both devices.
        deadline = time.monotonic() + AGENT_START_S
        while True:
            assert all(p.poll() is None for p in agents.values()), _logs(tmp_path)
            status = _cli("status", *tls_broker.flags(client), "--json")
            document = json.loads(status.stdout) if status.stdout.strip() else {}
            plan = document.get("plan") or {}
            if status.returncode == 0 and sorted(plan.get("devices", ())) == sorted(agents):
                break
            assert time.monotonic() < deadline, f"{status.stderr}\n{_logs(tmp_path)}"
            time.sleep(1.0)
        assert {d["device"]: d["status"] for d in document["devices"]} == dict.fromkeys(
            agents, "online"
        )
        assert document["leader"]["device"] == "lead-1"

        infer = _cli("infer", *tls_broker.flags(client), "--synthetic", "1", "--timeout", "60")
        assert infer.returncode == 0, infer.stdout + infer.stderr
        assert "on " in infer.stdout and "error" not in infer.stdout, infer.stdout

        watch = _cli("watch", *tls_broker.flags(client), "--duration", "3")
        assert watch.returncode == 0, watch.stderr
        for expected in ("birth   lead-1", "birth   work-1", "leader  lead-1", "plan    "):
            assert expected in watch.stdout, watch.stdout
        assert "not authorised" not in watch.stderr, watch.stderr

        # A cluster the account may not read: the commands say so, and fail.
        refused = _cli("status", *tls_broker.flags(client, cluster="other"), "--wait", "1")
        assert refused.returncode == 1
        lines = refused.stderr.strip().splitlines()
        assert f"no retained record on {PLAN_CURRENT.filter(TopicRoot(PREFIX, 'other'))}" in (
            refused.stderr
        )
        assert lines and all("not authorised to read it" in line for line in lines), lines
        blind = _cli("infer", *tls_broker.flags(client, cluster="other"), "--synthetic", "1")
        assert blind.returncode == 1
        assert "not authorised to read it" in blind.stderr, blind.stderr
    finally:
        for process in agents.values():
            process.send_signal(signal.SIGTERM)
        for process in agents.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    # Every subscription the code made (as the broker logged it) is granted under its
    # account. The leader's and the worker's characteristic ones must be among them,
    # so the check cannot pass on a log that caught nothing.
    made = {
        user: {f for f in filters if f.startswith(f"{TLS_ROOT}/")}
        for user, filters in _subscriptions(tls_broker.log).items()
    }
    assert DEVICE_HEARTBEAT.filter(root) in made.get("work-1", set()), made
    assert DEVICE_TASKS.filter(root, device="work-1") in made["work-1"], made
    assert JOB_TILES.filter(root) in made.get("lead-1", set()), made
    assert JOB_SUBMIT.filter(root) in made["lead-1"], made
    assert {PLAN_CURRENT.filter(root), PLANNER_LEADER.filter(root)} <= made.get(client, set())
    assert any(JOB_RESULT.pattern.split("/")[0] in f for f in made[client]), made
    for user in ("lead-1", "work-1", client):
        missing = made[user] - _delivered(tls_broker, user, made[user])
        assert not missing, f"{user} subscribes to {sorted(missing)}, which the ACL withholds"
    # And the probe itself can fail: a filter the client may not read is not delivered.
    assert not _delivered(tls_broker, client, {JOB_TILES.filter(root)})


def _logs(folder: Path) -> str:
    return "\n".join(
        f"--- {path.name}:\n{path.read_text(errors='replace')[-4000:]}"
        for path in sorted(folder.glob("*.log"))
    )
