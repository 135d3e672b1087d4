"""Time across devices that do not agree on it.

A Raspberry Pi has no real-time clock; where NTP exists, the clock steps when it
syncs. So no decision of the agent compares two devices' clocks:

- every timer and deadline runs on the local monotonic clock;
- a deadline travels as a duration (`TileTask.deadline_in_s`, the time left when
  sent) and the receiver counts it down on its own monotonic clock;
- liveness is when messages arrive, on the receiver's clock, never a `sent_at`.

Wall-clock time stays for people (logs, `sent_at`). `OffsetEstimate` only reports
how far this device's clock is from the leader's (NTP's four timestamps over the
heartbeat round trip, keeping the sample with the shortest round trip): it makes
skew visible and changes no decision.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["OffsetEstimate", "OffsetSample", "local_deadline"]


def local_deadline(
    deadline_wall: float, deadline_in_s: float | None, *, now: float, wall_now: float
) -> float:
    """A received deadline on this device's monotonic clock (`now` is its reading).

    `deadline_in_s` (time left when sent) is what a current sender gives; a sender of
    an older version gives only its wall-clock `deadline_wall`, which is compared
    with this device's wall clock (`wall_now`) as before.
    """
    if deadline_in_s is not None:
        return now + deadline_in_s
    return now + (deadline_wall - wall_now)


@dataclass(frozen=True)
class OffsetSample:
    offset_s: float
    """This device's clock minus the leader's, seconds."""
    round_trip_s: float


class OffsetEstimate:
    """This device's clock offset to the leader from heartbeat round trips.

    t1: our heartbeat's `sent_at` (our clock); t2: when the leader heard it and
    t3: when the leader sent the heartbeat that echoes it (the leader's clock);
    t4: when that echo arrived (our clock). offset = ((t1 - t2) + (t4 - t3)) / 2
    is exact when both legs take equally long; the sample with the shortest
    round trip of the last `window` is the one least disturbed by queueing.
    """

    def __init__(self, window: int = 8) -> None:
        self._samples: deque[OffsetSample] = deque(maxlen=window)

    def add(self, t1: float, t2: float, t3: float, t4: float, round_trip_s: float) -> None:
        """One round trip; `round_trip_s` is measured on monotonic clocks (ours and
        the leader's hold time), so a step of either wall clock cannot shorten it."""
        offset = ((t1 - t2) + (t4 - t3)) / 2.0
        self._samples.append(OffsetSample(offset, max(0.0, round_trip_s)))

    def reset(self) -> None:
        """The leader changed: its clock is another one."""
        self._samples.clear()

    @property
    def best(self) -> OffsetSample | None:
        return min(self._samples, key=lambda s: s.round_trip_s, default=None)

    @property
    def offset_s(self) -> float | None:
        best = self.best
        return None if best is None else best.offset_s
