"""The sd_notify client against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
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
    async with asyncio.timeout(1):
        await watchdog_loop(lambda: True, {"NOTIFY_SOCKET": "@unused"})


async def test_watchdog_loop_pings_only_while_healthy(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    # 20 ms timeout → a ping every 10 ms; healthy, unhealthy twice, healthy.
    answers = iter([True, False, False, True])
    done = asyncio.Event()

    def healthy() -> bool:
        answer = next(answers, None)
        if answer is None:
            done.set()
            return False
        return answer

    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"}
    async with asyncio.timeout(5):
        task = asyncio.create_task(watchdog_loop(healthy, environ))
        await done.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert _drain(sock) == [b"WATCHDOG=1", b"WATCHDOG=1"]
