"""Private brokers: start, stop, failures, the shipped configuration, `edgedi broker`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from edgedi.broker.errors import BrokerStartError
from edgedi.broker.server import (
    BrokerKind,
    EmbeddedBroker,
    find_mosquitto,
    free_port,
    mosquitto_config,
    probe_mqtt,
    start_broker,
    start_mosquitto,
    wait_until_listening,
)


def _accepts(host: str, port: int) -> bool:
    return probe_mqtt(host, port)


def test_brokers_start_on_a_free_port_and_stop(broker_kind: BrokerKind) -> None:
    with start_broker(prefer=broker_kind) as handle:
        assert handle.kind == broker_kind
        assert handle.url == f"mqtt://127.0.0.1:{handle.port}"
        assert _accepts(handle.host, handle.port)
    deadline = time.monotonic() + 5
    while _accepts(handle.host, handle.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _accepts(handle.host, handle.port)


def test_a_taken_port_is_a_start_error(broker_kind: BrokerKind) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()  # something that accepts TCP but is no MQTT broker
        port = taken.getsockname()[1]
        with pytest.raises(BrokerStartError):
            start_broker(port=port, prefer=broker_kind, startup_timeout=2)


def test_the_probe_tells_an_mqtt_broker_from_another_listener(broker_kind: BrokerKind) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        assert not probe_mqtt("127.0.0.1", other.getsockname()[1], timeout=0.2)
    with start_broker(prefer=broker_kind) as handle:
        assert probe_mqtt(handle.host, handle.port)


def test_missing_binary_is_a_start_error() -> None:
    with pytest.raises(BrokerStartError, match="cannot run"):
        start_mosquitto(binary="/nonexistent/mosquitto")


def test_waiting_for_a_dead_port_times_out() -> None:
    with pytest.raises(BrokerStartError, match="no MQTT broker"):
        wait_until_listening("127.0.0.1", free_port(), timeout=0.2)


def test_shipped_mosquitto_configuration() -> None:
    config = mosquitto_config("127.0.0.1", 1884)
    lines = {
        line.split()[0]: line.split()[1:]
        for line in config.splitlines()
        if line and not line.startswith("#")
    }
    assert lines["listener"] == ["1884", "127.0.0.1"]
    assert lines["set_tcp_nodelay"] == ["true"]
    assert lines["persistence"] == ["false"]
    for bound in (
        "max_inflight_messages",
        "max_queued_messages",
        "max_queued_bytes",
        "max_packet_size",
    ):
        assert int(lines[bound][0]) > 0, bound
    assert int(lines["max_packet_size"][0]) > 64 * 2**20  # a 64 MiB payload plus its header
    assert "set_tcp_nodelay false" in mosquitto_config("::1", 1, tcp_nodelay=False)


def test_mosquitto_accepts_its_configuration() -> None:
    if find_mosquitto() is None:
        pytest.skip("the mosquitto binary is not installed")
    with start_mosquitto() as handle:
        assert handle.process.poll() is None
        assert "Error" not in handle.log_text()


async def test_embedded_broker_runs_on_the_callers_loop() -> None:
    broker = await EmbeddedBroker.start()
    try:  # probe from a thread: the broker answers on this very loop
        assert await asyncio.to_thread(probe_mqtt, broker.host, broker.port)
    finally:
        await broker.stop()


@pytest.mark.parametrize("embedded", [False, True], ids=["default", "embedded"])
def test_cli_runs_in_the_foreground_until_sigterm(embedded: bool) -> None:
    if not embedded and find_mosquitto() is None and os.environ.get("CI") != "true":
        pytest.skip("the mosquitto binary is not installed")
    command = [sys.executable, "-m", "edgedi.agent.cli", "broker", "--port", "0"]
    if embedded:
        command.append("--embedded")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on mqtt://127.0.0.1:"), line
        assert line.strip().endswith("(amqtt, embedded)" if embedded else "(mosquitto)")
        port = int(line.split(":")[2].split()[0])
        assert _accepts("127.0.0.1", port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
