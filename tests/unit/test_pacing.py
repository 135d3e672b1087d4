"""The emulated slower device: a compute step takes `slowdown` times the CPU it used."""

from __future__ import annotations

import os
import time

import pytest
import torch

from edgedi.agent import pacing
from edgedi.agent.local_cluster import Emulation, LocalCluster
from edgedi.models.calibration import time_model_tiles
from edgedi.models.zoo import build_model


class FakeClocks:
    """A wall clock and a thread CPU clock that the test moves by hand."""

    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 5.0
        self.slept: list[float] = []

    def perf_counter(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        return self.cpu

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.wall += seconds


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> FakeClocks:
    fake = FakeClocks()
    monkeypatch.setattr(pacing, "time", fake)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    return fake


def test_a_step_takes_slowdown_times_its_cpu_time(clocks: FakeClocks) -> None:
    def step() -> str:
        clocks.wall += 0.010
        clocks.cpu += 0.010
        return "done"

    result, seconds = pacing.paced(step, 4.0)
    assert result == "done"
    assert clocks.slept == [pytest.approx(0.030)]
    assert seconds == pytest.approx(0.040)


def test_time_spent_waiting_for_a_core_is_absorbed_by_the_pace(clocks: FakeClocks) -> None:
    # 10 ms of CPU took 25 ms of wall time (other devices held the cores): a device
    # 4x slower than this core would have taken 40 ms anyway, so it sleeps 15 ms.
    def step() -> None:
        clocks.wall += 0.025
        clocks.cpu += 0.010

    _, seconds = pacing.paced(step, 4.0)
    assert clocks.slept == [pytest.approx(0.015)]
    assert seconds == pytest.approx(0.040)


def test_a_step_slower_than_its_pace_is_not_slowed_further(clocks: FakeClocks) -> None:
    def step() -> None:
        clocks.wall += 0.050
        clocks.cpu += 0.010

    _, seconds = pacing.paced(step, 4.0)
    assert clocks.slept == []
    assert seconds == pytest.approx(0.050)


def test_without_a_slowdown_nothing_sleeps(clocks: FakeClocks) -> None:
    def step() -> None:
        clocks.wall += 0.010
        clocks.cpu += 0.010

    _, seconds = pacing.paced(step, 1.0)
    assert clocks.slept == [] and seconds == pytest.approx(0.010)


def test_with_several_torch_threads_the_wall_clock_paces(
    clocks: FakeClocks, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other threads' CPU is invisible to this one: pace by the step's wall time.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)

    def step() -> None:
        clocks.wall += 0.010
        clocks.cpu += 0.003

    _, seconds = pacing.paced(step, 2.0)
    assert seconds == pytest.approx(0.020)


def test_the_paced_emulation_slows_each_device_to_its_core_fraction() -> None:
    emulation = Emulation("paced", (0.4, 0.4, 0.25, 0.25), cores=2)
    assert emulation.slowdowns == pytest.approx((2.5, 2.5, 4.0, 4.0))
    assert emulation.ideal_speedup == pytest.approx(1.3 / 0.4)
    assert "compute paced to 0.4/0.4/0.25/0.25 of a core" in emulation.describe()
    assert "event loops under CPU quotas" in emulation.describe()


def test_paced_without_root_paces_the_compute_and_says_the_loops_run_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cluster = LocalCluster(4, model="tiny-edgedi", input_size=64, emulation="paced")
    emulation = cluster._choose_emulation()
    assert emulation.method == "paced"
    assert emulation.slowdowns == pytest.approx((2.5, 2.5, 4.0, 4.0))
    assert "not running as root" in emulation.note and "event loops unthrottled" in emulation.note
    assert "under CPU quotas" not in emulation.describe()


def test_a_paced_device_is_timed_by_the_clock_that_paces_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert pacing.step_clock(2.5) is time.thread_time
    assert pacing.step_clock(1.0) is time.perf_counter
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert pacing.step_clock(2.5) is time.perf_counter


def test_tile_calibration_reads_only_the_clock_it_is_given() -> None:
    # A clock that never moves: every timing is zero, so none used another clock.
    model = build_model("tiny-edgedi", 32, seed=0).eval()
    timing = time_model_tiles(model, repeats=1, window_s=0.0, clock=lambda: 0.0)
    assert timing.tiles and all(tile.seconds == 0.0 for tile in timing.tiles)
    assert timing.tail_seconds == 0.0 and timing.copy_seconds_per_byte == 0.0
