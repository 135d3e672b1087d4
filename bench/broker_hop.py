"""Per-hop MQTT latency on each broker edgedi runs on, side by side, in one run.

    .venv/bin/python bench/broker_hop.py [--out bench/results/broker_hop.md] [--rounds 10]

Starts a private Mosquitto, NATS (MQTT interface, JetStream) and RabbitMQ node (MQTT
plugin), as the tests do, plus the embedded amqtt broker; a broker that is not installed
is listed as skipped. Then, in `--rounds` rounds, each broker in turn (the order rotates
per round, so load on the shared machine falls on all of them alike) is measured with
raw aiomqtt clients over loopback, MQTT 3.1.1, QoS 1, one message at a time:
- one hop: publish call -> broker -> the subscriber's receipt, 64 B and 1 MiB;
- round trip: A publishes 64 B, B answers on another topic, A receives (two hops
  each way, the pattern of a task and its result).
The load average is recorded before and after: the numbers are only comparable
between brokers of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import aiomqtt

from edgedi.broker.server import BrokerHandle, BrokerKind, broker_unavailable, start_broker

KINDS: tuple[BrokerKind, ...] = ("mosquitto", "nats", "rabbitmq", "amqtt")
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
MIB = 1024 * 1024
WARM_UP = 2


def _client(broker: BrokerHandle, name: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=name,
        protocol=aiomqtt.ProtocolVersion.V311,
        socket_options=[NODELAY],
    )


async def _hop(broker: BrokerHandle, size: int, count: int) -> list[float]:
    payload = os.urandom(size)
    samples: list[float] = []
    async with _client(broker, "hop-sub") as sub, _client(broker, "hop-pub") as pub:
        await sub.subscribe("bench/hop", qos=1)
        messages = sub.messages
        for index in range(count + WARM_UP):
            start = time.perf_counter()
            await pub.publish("bench/hop", payload, qos=1)
            async with asyncio.timeout(20):
                await anext(messages)
            if index >= WARM_UP:
                samples.append((time.perf_counter() - start) * 1000)
    return samples


async def _round_trip(broker: BrokerHandle, count: int) -> list[float]:
    payload = os.urandom(64)
    samples: list[float] = []
    async with _client(broker, "rt-a") as a, _client(broker, "rt-b") as b:
        await a.subscribe("bench/answer", qos=1)
        await b.subscribe("bench/ask", qos=1)

        async def answer() -> None:
            async for message in b.messages:
                await b.publish("bench/answer", message.payload, qos=1)

        answering = asyncio.create_task(answer(), name="bench-answer")
        try:
            answers = a.messages
            for index in range(count + WARM_UP):
                start = time.perf_counter()
                await a.publish("bench/ask", payload, qos=1)
                async with asyncio.timeout(20):
                    await anext(answers)
                if index >= WARM_UP:
                    samples.append((time.perf_counter() - start) * 1000)
        finally:
            while not answering.done():  # 3.11's wait_for may swallow one cancel
                answering.cancel()
                await asyncio.wait({answering}, timeout=0.5)
    return samples


MEASURES = ("one hop 64 B", "one hop 1 MiB", "round trip 64 B")


async def _round(broker: BrokerHandle, samples: dict[str, list[float]]) -> None:
    samples["one hop 64 B"] += await _hop(broker, 64, 20)
    samples["one hop 1 MiB"] += await _hop(broker, MIB, 5)
    samples["round trip 64 B"] += await _round_trip(broker, 10)


def _cell(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"{statistics.median(ordered):.2f} / {p90:.2f}"


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/broker_hop.md"))
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    brokers: dict[BrokerKind, BrokerHandle] = {}
    skipped: dict[BrokerKind, str] = {}
    try:
        for kind in KINDS:
            reason = broker_unavailable(kind)
            if reason is None:
                try:
                    brokers[kind] = start_broker(prefer=kind)
                except Exception as error:  # reported in the table
                    reason = f"did not start: {error}"
            if reason is not None:
                skipped[kind] = reason
        results: dict[BrokerKind, dict[str, list[float]]] = {
            kind: defaultdict(list) for kind in brokers
        }
        order = list(brokers)
        for number in range(args.rounds):
            shift = number % len(order)
            for kind in order[shift:] + order[:shift]:
                asyncio.run(_round(brokers[kind], results[kind]))
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for broker in brokers.values():
            broker.stop()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    first = next(iter(results.values()))
    lines = [
        "# Per-hop MQTT latency by broker (loopback)",
        "",
        f"Made by `{' '.join(['.venv/bin/python', *sys.argv])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}: {platform.machine()}, {os.cpu_count()} CPUs "
        f"(shared), Python {platform.python_version()}, aiomqtt {aiomqtt.__version__}. "
        f"Load average before {' '.join(load_before)}, after {' '.join(load_after)}.",
        f"Versions: {_version(['mosquitto', '-h']) if 'mosquitto' in brokers else '-'}; "
        f"{_version(['nats-server', '--version']) if 'nats' in brokers else '-'}; "
        f"RabbitMQ {_rabbitmq_version() if 'rabbitmq' in brokers else '-'}.",
        "",
        f"MQTT 3.1.1, QoS 1, one message at a time, {args.rounds} interleaved rounds; "
        "milliseconds as `median / p90` "
        f"({', '.join(f'{name}: {len(first[name])} samples' for name in MEASURES)} per broker).",
        "",
        "| broker | " + " | ".join(MEASURES) + " |",
        "|---|" + "---|" * len(MEASURES),
    ]
    for kind, samples in results.items():
        lines.append(f"| {kind} | " + " | ".join(_cell(samples[name]) for name in MEASURES) + " |")
    for kind, reason in skipped.items():
        lines.append(f"| {kind} | skipped: {reason} |" + " |" * (len(MEASURES) - 1))
    lines += [
        "",
        "One hop: the publish call until the subscriber has the message. Round trip: A",
        "publishes, B answers on another topic, A receives (four broker hops). Private",
        "brokers as the tests start them (broker/server.py): Mosquitto with the shipped",
        "config, NATS with JetStream and an `mqtt` block, a RabbitMQ node of its own with",
        "the MQTT plugin and in-memory retained store, amqtt embedded in this process.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _rabbitmq_version() -> str:
    found = list(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"))
    return found[0].name.removeprefix("rabbitmq_server-") if found else "?"


if __name__ == "__main__":
    sys.exit(main())
