"""Transport floor: MQTT latency through a private Mosquitto, with and without TCP_NODELAY.

    .venv/bin/python bench/mqtt_floor.py [--out bench/results/mqtt_floor.md] [--quick]

Measures, on loopback, with raw aiomqtt clients (no edgedi encoding on top):
- one hop: publish (QoS 1) -> broker -> subscriber, 64 B and 1 MiB payloads,
  timed from the publish call to the subscriber's receipt (same clock, same process);
- request/response: A publishes a 64 B request, B answers on another topic, A
  receives the answer (two hops each way through the broker, QoS 1) — the pattern
  where Nagle's algorithm meets delayed ACKs.
"Nagle on" runs Mosquitto with `set_tcp_nodelay false` and clients without
TCP_NODELAY; "TCP_NODELAY" sets both, as edgedi does. Messages are sent one at a
time (the next after the previous arrived), so each sample is one latency.
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
from dataclasses import dataclass
from pathlib import Path

import aiomqtt

from edgedi.broker.server import find_mosquitto, start_mosquitto

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
MIB = 1024 * 1024


@dataclass(frozen=True)
class Result:
    name: str
    samples_ms: list[float]

    def cell(self) -> str:
        ordered = sorted(self.samples_ms)
        median = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        return f"{median:.2f} / {p90:.2f}"


def _client(port: int, name: str, nodelay: bool) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1", port, identifier=name, socket_options=[NODELAY] if nodelay else ()
    )


async def _one_hop(port: int, nodelay: bool, size: int, count: int) -> list[float]:
    payload = os.urandom(size)
    samples: list[float] = []
    async with _client(port, "hop-sub", nodelay) as sub, _client(port, "hop-pub", nodelay) as pub:
        await sub.subscribe("bench/hop", qos=1)
        messages = sub.messages
        for index in range(count + 3):  # the first three warm up
            start = time.perf_counter()
            await pub.publish("bench/hop", payload, qos=1)
            async with asyncio.timeout(10):
                await anext(messages)
            if index >= 3:
                samples.append((time.perf_counter() - start) * 1000)
    return samples


async def _request_response(port: int, nodelay: bool, count: int) -> list[float]:
    payload = os.urandom(64)
    samples: list[float] = []
    async with _client(port, "rr-a", nodelay) as a, _client(port, "rr-b", nodelay) as b:
        await a.subscribe("bench/response", qos=1)
        await b.subscribe("bench/request", qos=1)

        async def responder() -> None:
            async for message in b.messages:
                await b.publish("bench/response", message.payload, qos=1)

        answering = asyncio.create_task(responder(), name="bench-responder")
        try:
            responses = a.messages
            for index in range(count + 3):
                start = time.perf_counter()
                await a.publish("bench/request", payload, qos=1)
                async with asyncio.timeout(10):
                    await anext(responses)
                if index >= 3:
                    samples.append((time.perf_counter() - start) * 1000)
        finally:
            # Python 3.11's wait_for (inside aiomqtt's publish) may swallow one cancel.
            while not answering.done():
                answering.cancel()
                await asyncio.wait({answering}, timeout=0.5)
    return samples


def _measure(nodelay: bool, quick: bool) -> list[Result]:
    scale = 4 if quick else 1
    broker = start_mosquitto(tcp_nodelay=nodelay)

    async def measure_all() -> list[Result]:
        port = broker.port
        return [
            Result("one hop 64 B", await _one_hop(port, nodelay, 64, 200 // scale)),
            Result("one hop 1 MiB", await _one_hop(port, nodelay, MIB, 50 // scale)),
            Result("request/response 64 B", await _request_response(port, nodelay, 40 // scale)),
        ]

    try:
        return asyncio.run(measure_all())
    finally:
        broker.stop()


def _mosquitto_version(binary: str) -> str:
    output = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
    return output.splitlines()[0] if output else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/mqtt_floor.md"))
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args()
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto is not installed", file=sys.stderr)
        return 1
    rows = {
        label: _measure(nodelay, args.quick)
        for label, nodelay in (("TCP_NODELAY (edgedi)", True), ("Nagle on (stock)", False))
    }
    first = next(iter(rows.values()))
    names = [result.name for result in first]
    lines = [
        "# MQTT transport floor (loopback, Mosquitto)",
        "",
        f"Made by `{' '.join(['.venv/bin/python', *sys.argv])}` on "
        f"{time.strftime('%Y-%m-%d')}: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, aiomqtt {aiomqtt.__version__}, "
        f"{_mosquitto_version(binary)}.",
        "",
        "QoS 1, one message at a time, milliseconds as `median / p90` "
        f"({', '.join(f'{r.name}: {len(r.samples_ms)} samples' for r in first)}).",
        "",
        "| setting | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, results in rows.items():
        lines.append(f"| {label} | " + " | ".join(result.cell() for result in results) + " |")
    lines += [
        "",
        "One hop: publish call to the subscriber's receipt. Request/response: A publishes,",
        "B answers on another topic, A receives (four broker hops). With Nagle on, the",
        "responder's PUBLISH waits behind its own unacknowledged PUBACK until the broker's",
        "delayed ACK fires; TCP_NODELAY on the broker and the clients removes that wait.",
        "A single hop is the same either way: Nagle only holds back a small write that",
        "follows one not yet acknowledged, which is exactly what a request/response does.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
