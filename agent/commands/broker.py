"""`edgedi broker`: run a private MQTT broker in the foreground until Ctrl-C or SIGTERM.

    edgedi broker [--host 127.0.0.1] [--port 1883] [--embedded]

Mosquitto (with the shipped configuration: TCP_NODELAY, no persistence, bounded
queues) when the binary is installed, else — or with `--embedded` — the pure-Python
amqtt broker (MQTT 3.1.1 only, slower for bulk data). `--port 0` picks a free port.
The first line on stdout says where it listens, e.g.
`listening on mqtt://127.0.0.1:1883 (mosquitto)`, so scripts can wait for it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from edgedi.broker.errors import BrokerStartError
from edgedi.broker.server import EmbeddedBroker, find_mosquitto, start_mosquitto

# How often the foreground loop checks that the Mosquitto child is still alive.
_CHILD_POLL_SECONDS = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=_port, default=1883, help="TCP port (default 1883; 0 = any free port)"
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="use the embedded amqtt broker even when Mosquitto is installed",
    )


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not in 0..65535")
    return value


def run(args: argparse.Namespace) -> int:
    embedded = bool(args.embedded) or find_mosquitto() is None
    try:
        return asyncio.run(_serve(args.host, args.port, embedded=embedded))
    except BrokerStartError as error:
        print(f"edgedi broker: {error}", file=sys.stderr)
        return 1


async def _serve(host: str, port: int, *, embedded: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    if embedded:
        broker = await EmbeddedBroker.start(host, port)
        _announce(broker.host, broker.port, "amqtt, embedded")
        try:
            await stop.wait()
        finally:
            await broker.stop()
        return 0
    mosquitto = await asyncio.to_thread(start_mosquitto, host, port, log_to_stderr=True)
    _announce(mosquitto.host, mosquitto.port, "mosquitto")
    try:
        while not stop.is_set():
            if mosquitto.process.poll() is not None:
                print(
                    f"edgedi broker: mosquitto exited with code {mosquitto.process.returncode}",
                    file=sys.stderr,
                )
                return 1
            try:
                async with asyncio.timeout(_CHILD_POLL_SECONDS):
                    await stop.wait()
            except TimeoutError:
                continue
    finally:
        await asyncio.to_thread(mosquitto.stop)
    return 0


def _announce(host: str, port: int, kind: str) -> None:
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on mqtt://{shown}:{port} ({kind})", flush=True)
