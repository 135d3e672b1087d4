"""A broker outage longer than systemd's watchdog does not get the agents restarted.

A real `edgedi agent` process runs as under `Type=notify` with `WatchdogSec=1s`: its
`$NOTIFY_SOCKET` is a datagram socket this test reads, standing in for systemd. The
broker then goes away (SIGKILL) for four watchdog intervals. Systemd would kill an
agent whose pings stop for one interval, and a fleet's agents all lose the broker at
the same moment; so the pings must go on at their usual pace (they say the event loop
and the compute thread are alive), and the outage must show in `STATUS=` instead.
When the broker is back, the agent reconnects by itself and says so.

That a stuck compute thread does stop the pings is tested on `watchdog_loop` itself
(tests/unit/test_systemd.py): a real agent's compute thread cannot be hung cheaply.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

from edgedi.broker.server import start_broker

WATCHDOG_S = 1.0
DOWN_S = 4 * WATCHDOG_S
START_TIMEOUT_S = 90.0
RECONNECT_TIMEOUT_S = 30.0

Notification = tuple[float, str]  # (monotonic time received, one KEY=value line)


def _receive(
    sock: socket.socket, seconds: float, until: Callable[[str], bool]
) -> list[Notification]:
    """Every notification line for `seconds`, or until a line satisfies `until`."""
    received: list[Notification] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            datagram = sock.recv(4096)
        except TimeoutError:
            break
        now = time.monotonic()
        lines = datagram.decode(errors="replace").splitlines()
        received.extend((now, line) for line in lines)
        if any(until(line) for line in lines):
            break
    return received


def test_the_agent_keeps_pinging_the_watchdog_through_a_broker_outage(tmp_path: Path) -> None:
    broker = start_broker(prefer="auto")
    log_path = tmp_path / "agent.log"
    # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
    with (
        tempfile.TemporaryDirectory(prefix="sd-") as short,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket,
    ):
        notify_path = str(Path(short) / "notify")
        notify_socket.bind(notify_path)
        environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGEDI_")}
        environment.pop("WATCHDOG_PID", None)
        environment.update(
            NOTIFY_SOCKET=notify_path, WATCHDOG_USEC=str(int(WATCHDOG_S * 1_000_000))
        )
        command = [
            sys.executable, "-m", "edgedi.agent.cli", "agent",
            "--broker", f"{broker.host}:{broker.port}",
            "--id", "dog-1",
            "--topic-root", f"edgedi-watchdog/{uuid.uuid4().hex[:10]}",
            "--cluster", "watchdog",
            "--threads", "1",
            "--profile-seconds", "0.3",
            "--models", "tiny-edgedi",
            "--input-size", "64",
            "--state-dir", str(tmp_path / "state"),
            "--log-level", "info",
        ]  # fmt: skip
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment
            )
        passed = False
        try:
            started = _receive(notify_socket, START_TIMEOUT_S, lambda line: line == "READY=1")
            assert "READY=1" in [line for _, line in started], "no READY=1"

            broker.halt(graceful=False)
            halted = time.monotonic()
            outage = _receive(notify_socket, DOWN_S, lambda line: False)
            resumed = time.monotonic()
            broker.resume()
            back = _receive(
                notify_socket, RECONNECT_TIMEOUT_S, lambda line: line.startswith("STATUS=connected")
            )

            pings = [at for at, line in outage if line == "WATCHDOG=1"]
            gaps = [later - earlier for earlier, later in pairwise([halted, *pings, resumed])]
            assert max(gaps) < WATCHDOG_S, f"systemd would have restarted it: gaps {gaps}"
            statuses = [line for _, line in outage if line.startswith("STATUS=")]
            assert any(
                "unreachable since" in status and "reconnecting" in status for status in statuses
            ), statuses
            assert any(line.startswith("STATUS=connected") for _, line in back), back
            assert process.poll() is None, "the agent exited"
            passed = True
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            broker.stop()
            if not passed:
                sys.stderr.write(log_path.read_text(errors="replace")[-5000:])
