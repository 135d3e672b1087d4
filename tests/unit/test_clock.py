"""Time across devices (edgedi.agent.clock): deadlines as durations, offsets from round trips."""

from __future__ import annotations

import pytest

from edgedi.agent.clock import OffsetEstimate, local_deadline


def test_a_deadline_in_seconds_left_ignores_both_wall_clocks() -> None:
    # The worker's wall clock is an hour ahead of the leader's: the wall-clock deadline
    # has "passed", the time left has not.
    deadline = local_deadline(1000.0, 2.5, now=50.0, wall_now=1000.0 + 3600.0)
    assert deadline == 52.5


def test_an_older_leader_gives_only_its_wall_clock_deadline() -> None:
    assert local_deadline(1010.0, None, now=50.0, wall_now=1000.0) == 60.0


def test_the_offset_comes_from_the_shortest_round_trip() -> None:
    estimate = OffsetEstimate()
    assert estimate.offset_s is None
    ahead = 3600.0  # our clock is an hour ahead of the leader's
    # Symmetric 10 ms legs, the leader holds the beat 0.4 s: exact.
    t1 = 100.0 + ahead
    t2 = 100.010
    t3 = t2 + 0.4
    t4 = t3 + 0.010 + ahead
    estimate.add(t1, t2, t3, t4, round_trip_s=0.020)
    assert estimate.offset_s == pytest.approx(ahead)
    # A sample with a queued return leg (0.5 s) is off by half of it; it is not chosen.
    estimate.add(t1 + 1, t2 + 1, t3 + 1, t4 + 1 + 0.5, round_trip_s=0.520)
    assert estimate.offset_s == pytest.approx(ahead)
    estimate.reset()
    assert estimate.offset_s is None


def test_old_samples_leave_the_window() -> None:
    estimate = OffsetEstimate(window=2)
    estimate.add(0.0, 0.0, 0.0, 0.0, round_trip_s=0.001)  # in step with the leader
    for k in range(2):  # then the leader's clock steps back an hour
        estimate.add(10.0 + k, 10.0 + k - 3600, 10.0 + k - 3600, 10.0 + k, round_trip_s=0.05)
    assert estimate.offset_s == pytest.approx(3600.0)
