"""The sd_notify client against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgedi.agent.systemd import notify, watchdog_interval, watchdog_loop


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path short enough for sun_path (108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sd-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(2.0)
            yield sock, path


def _drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    received = []
    try:
        while True:
            received.append(sock.recv(4096))
    except BlockingIOError:
        pass
    return received


def test_notify_sends_one_datagram_to_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert notify("READY=1\nSTATUS=connected to broker", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=connected to broker"


def test_notify_supports_the_abstract_namespace() -> None:
    name = f"edgedi-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_is_a_no_op_outside_systemd() -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


def test_notify_reports_failure_instead_of_raising(tmp_path: Path) -> None:
    assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_notify_rejects_an_empty_state() -> None:
    with pytest.raises(ValueError):
        notify("", {})


def test_notify_reads_the_environment_when_called(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("STATUS=from os.environ")
    assert sock.recv(4096) == b"STATUS=from os.environ"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected


async def test_watchdog_loop_returns_at_once_without_a_watchdog() -> None:
    with ThreadPoolExecutor(max_workers=1) as compute:
        async with asyncio.timeout(1):
            await watchdog_loop(compute, {"NOTIFY_SOCKET": "@unused"})


async def test_watchdog_loop_pings_while_the_compute_thread_answers(
    listener: tuple[socket.socket, str],
) -> None:
    """Pings stop once the compute thread is stuck for the interval, and come back after."""
    sock, path = listener
    interval = 0.4  # a ping every 0.2 s
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(int(interval * 1_000_000))}
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as compute:
        task = asyncio.create_task(watchdog_loop(compute, environ))
        try:
            await asyncio.sleep(2 * interval)
            assert len(_drain(sock)) >= 2, "no pings from a healthy agent"
            compute.submit(release.wait, 10.0)  # a tile step that never ends
            # The probe queued behind it is at most one period old now; after the
            # interval (and a margin for a busy machine) the pings must have stopped.
            await asyncio.sleep(2.5 * interval)
            _drain(sock)
            await asyncio.sleep(2 * interval)
            assert _drain(sock) == [], "pings although the compute thread is stuck"
            release.set()
            await asyncio.sleep(2 * interval)
            assert b"WATCHDOG=1" in _drain(sock), "no pings after the thread recovered"
        finally:
            release.set()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
