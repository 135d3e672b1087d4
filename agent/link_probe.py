"""What a message really costs this device: round trips to itself through its broker.

The planner prices every hop of a job (tiles out, gate partials, rows between
segments) with each device's link figures. Announced figures are guesses; this
measures them where they matter: through the broker the device uses, with its own
encoding, event loop and link — and while its compute thread is busy, because
during a job a message is sent and received next to running tiles (a loop that
shares a slow CPU answers later than an idle one).

    latency   = median small round trip / 2      (one hop, envelope included)
    bandwidth = 2 × size / (median large − median small round trip)

`LinkProber` owns the pending probes; the agent routes `link_probe` messages to
`received` and calls `measure` once it is connected.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import LinkProbe

__all__ = ["LinkMeasurement", "LinkProber"]

logger = logging.getLogger(__name__)

SMALL_BYTES = 256
LARGE_BYTES = 256 * 1024
SMALL_PROBES = 24
LARGE_PROBES = 6
PROBE_TIMEOUT_S = 5.0
# Below this, a difference of round trips is timer noise: the link counts as this fast.
_MAX_BANDWIDTH = 10e9


@dataclass(frozen=True)
class LinkMeasurement:
    latency_s: float
    """One hop through the broker, seconds."""
    bandwidth: float
    """Bytes per second one way."""
    small_rtt_s: float
    large_rtt_s: float

    def describe(self) -> str:
        return f"{self.latency_s * 1000:.2f} ms per message, {self.bandwidth * 8 / 1e6:.0f} Mbit/s"


class LinkProber:
    """Round trips of `LinkProbe` messages from this device to itself."""

    def __init__(self, device_id: str, send: Callable[[LinkProbe], Awaitable[None]]) -> None:
        self.device_id = DeviceId(device_id)
        self._send = send
        self._pending: dict[int, asyncio.Future[float]] = {}
        self._counter = 0

    def received(self, message: LinkProbe) -> None:
        future = self._pending.pop(message.probe, None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    async def _round_trip(self, size: int) -> float:
        self._counter += 1
        probe = self._counter
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pending[probe] = future
        message = LinkProbe(
            sender=self.device_id, device=self.device_id, probe=probe, padding=bytes(size)
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self._send(message)
                arrived = await future
        finally:
            self._pending.pop(probe, None)
        return arrived - started

    async def measure(self) -> LinkMeasurement:
        """Small then large round trips, one at a time (TimeoutError if the broker is away)."""
        await self._round_trip(SMALL_BYTES)  # warm-up: first-use allocations
        small = [await self._round_trip(SMALL_BYTES) for _ in range(SMALL_PROBES)]
        large = [await self._round_trip(LARGE_BYTES) for _ in range(LARGE_PROBES)]
        small_rtt, large_rtt = statistics.median(small), statistics.median(large)
        extra = large_rtt - small_rtt
        bandwidth = (
            _MAX_BANDWIDTH
            if extra <= 0
            else min(_MAX_BANDWIDTH, 2 * (LARGE_BYTES - SMALL_BYTES) / extra)
        )
        return LinkMeasurement(small_rtt / 2, bandwidth, small_rtt, large_rtt)
