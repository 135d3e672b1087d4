"""Suite-wide fixtures.

Every asyncio test is checked for tasks it leaves behind: an orphaned task is a
bug (it outlives its owner, swallows errors and may act after shutdown), so the
test fails at teardown with the names of the tasks that were still pending.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from edgedi.broker.server import BrokerKind, broker_unavailable

# One torch thread per process: the suite runs on 2 shared cores, where torch's default
# (a thread per core) makes small convolutions ~10x slower through contention. Set
# before anything imports torch; agent processes started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# Tasks get this long to finish after a test (some libraries cancel their helpers
# via call_soon, so they end a few loop iterations after the test's last await).
_GRACE_SECONDS = 1.0


@pytest.fixture(autouse=True)
def _fail_on_leaked_tasks(request: pytest.FixtureRequest) -> None:
    """For coroutine tests, pull in the async checker (sync tests have no loop to check)."""
    function = getattr(request.node, "function", None)
    is_async = inspect.iscoroutinefunction(function) or (
        request.node.get_closest_marker("asyncio") is not None
    )
    if is_async:
        request.getfixturevalue("_asyncio_task_leak_check")


@pytest_asyncio.fixture
async def _asyncio_task_leak_check() -> AsyncIterator[None]:
    """Fail the test if tasks it started are still pending at teardown."""
    loop = asyncio.get_running_loop()
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    deadline = loop.time() + _GRACE_SECONDS
    while True:
        leaked = [
            task
            for task in asyncio.all_tasks()
            if task is not current and task not in before and not task.done()
        ]
        if not leaked or loop.time() >= deadline:
            break
        await asyncio.sleep(0.01)
    if leaked:
        names = ", ".join(sorted(task.get_name() for task in leaked))
        for task in leaked:
            task.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail(f"the test left asyncio tasks pending: {names}")


@pytest.fixture
def png_claiming() -> Callable[[Path, int, int], Path]:
    """Writes a tiny PNG whose header claims `width`x`height` (a decompression bomb's
    header; its data is far too short): `png_claiming(path, width, height) -> path`."""

    def write(path: Path, width: int, height: int) -> Path:
        Image.new("L", (1, 1)).save(path)
        data = bytearray(path.read_bytes())
        start = data.index(b"IHDR")
        data[start + 4 : start + 12] = struct.pack(">II", width, height)
        crc = zlib.crc32(bytes(data[start : start + 17]))
        data[start + 17 : start + 21] = struct.pack(">I", crc)
        path.write_bytes(bytes(data))
        return path

    return write


# The brokers a plant may already run, next to Mosquitto: NATS (its MQTT interface, with
# JetStream) and RabbitMQ (its MQTT plugin). A representative subset of the integration
# and system tests runs on each (test_broker_fleets.py, test_system_brokers.py); the rest
# of the suite stays on Mosquitto and the embedded broker, so the suite does not triple.
FLEET_BROKERS: tuple[BrokerKind, ...] = ("nats", "rabbitmq")


@pytest.fixture(params=FLEET_BROKERS)
def fleet_broker_kind(request: pytest.FixtureRequest) -> BrokerKind:
    """A broker kind of FLEET_BROKERS; the test is skipped, with the reason, where that
    broker is not installed (RabbitMQ is not installed in CI: too heavy)."""
    kind: BrokerKind = request.param
    reason = broker_unavailable(kind)
    if reason is not None:
        pytest.skip(reason)
    return kind
