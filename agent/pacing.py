"""An emulated slower device: a compute step takes `slowdown` times the CPU it used.

`compute.slowdown` (the `slowdown` and `paced` emulations of `edgedi.agent.local_cluster`)
makes this machine's core behave like a slower one. The step runs at full speed; the
compute thread then sleeps until `slowdown × its CPU time` has passed since the step
began. Measuring the thread's CPU time rather than the wall clock makes the emulated
speed independent of other processes: a step that had to wait for a core (other
devices of the same machine bursting at once) loses nothing as long as the wait fits
in the time the slow device would have taken anyway, as a device of its own would.
With several torch threads the step's CPU is spread over threads this one cannot see,
so the wall clock is used instead.

Under CPU quotas instead (the local cluster's default), the agent's threads and its
planning process join the quota groups the launcher made for them (`join_cgroup`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

__all__ = ["join_cgroup", "paced", "step_clock"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def step_clock(slowdown: float) -> Callable[[], float]:
    """The clock a step of this thread is paced (and a paced device timed) by."""
    if slowdown > 1.0 and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def paced(function: Callable[[], T], slowdown: float) -> tuple[T, float]:
    """Run `function` on this thread as a device `slowdown` times slower would: its
    result and the seconds it took, the emulated wait included."""
    clock = step_clock(slowdown)
    started = time.perf_counter()
    used_from = clock()
    result = function()
    if slowdown > 1.0:
        remaining = started + slowdown * (clock() - used_from) - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
    return result, time.perf_counter() - started


def join_cgroup(members: Path | None, member: int, who: str) -> bool:
    """Write `member` (a thread id to a v1 `tasks` file, a process id to `cgroup.procs`)
    into `members`, the emulated device's quota group; False, logged, when there is no
    group or the kernel refuses: `who` then runs where it started."""
    if members is None:
        return False
    try:
        members.write_text(str(member))
    except OSError as error:
        logger.warning("%s could not join %s: %s", who, members, error)
        return False
    return True
