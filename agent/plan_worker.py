"""The leader's planning, computed in a process of its own.

Planning is pure Python: `auto`'s candidates (every strategy's search on every
device count), their replays, the bisection that fits a message cost. That is most
of a second of CPU for ResNet-34, seconds on a small board. On a thread of the agent
it holds the GIL against the compute thread, which needs it between every torch
operator, and against the event loop: while `auto` searched for ResNet-34 on a
nice-19 thread, a one-thread ResNet-34 forward pass beside it took 2.9× as long on
average and up to 8.7× (`bench/planning_gil.py`, `bench/results/planning_gil.md`;
in a process, 1.02×). The leader computes tiles too, so every re-plan slowed the
very jobs whose times `auto` was comparing.

`PlanWorker` owns one such process (started on first use, at the lowest CPU
priority) and runs the module-level functions below in it. They take and return
plain picklable values, and do no I/O: the leader's state stays on its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Literal, TypeVar

from edgedi.agent.pacing import join_cgroup
from edgedi.broker.plan import Plan
from edgedi.models.specs import get_spec
from edgedi.planner.cost import NetworkModel
from edgedi.planner.errors import InfeasiblePlanError, PlannerError
from edgedi.planner.profiles import DeviceProfile
from edgedi.planner.replay import replay_plan, supports_replay
from edgedi.planner.strategies import get_strategy
from edgedi.planner.strategies.auto import Candidate, candidates

__all__ = [
    "CostField",
    "PlanWorker",
    "PlanWorkerError",
    "auto_candidates",
    "fit_message_cost",
    "strategy_plan",
]

T = TypeVar("T")

CostField = Literal["gate_round_s", "broker_per_message_s"]

# The fitted cost is searched in [0, this], seconds per gate round or message.
_FIT_CEILING_S = 0.05
_FIT_STEPS = 30
# How often the planning process checks that the agent that started it still runs.
_PARENT_CHECK_S = 0.5


class PlanWorker:
    """One planning process for a leader; `run` awaits a function's result from it.

    A process that dies (the OOM killer, a signal) is replaced once per call; a
    second failure is raised as `BrokenProcessPool`.
    """

    def __init__(self, cgroup_procs: Path | None = None) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self.cgroup_procs = cgroup_procs

    async def run(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(_guarded, function, *args)
        for attempt in range(2):
            pool = self._started()
            try:
                return await loop.run_in_executor(pool, call)
            except BrokenProcessPool:
                self._discard()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: the agent has threads (event loop, compute, MQTT), which a fork
            # would copy in whatever state they are in.
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_background_process,
                initargs=(self.cgroup_procs,),
            )
        return self._pool

    def _discard(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """End the process; a plan being made is abandoned."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        # A deep model's search can run for seconds: do not wait for it.
        for process in processes:
            with contextlib.suppress(OSError, ValueError):
                process.terminate()


class PlanWorkerError(RuntimeError):
    """Planning failed in the planning process for a reason other than the planner's."""


def _guarded(function: Callable[..., T], *args: object) -> T:
    """`function(*args)`, raising only exceptions that survive the trip back.

    An exception is returned pickled, and one whose constructor takes other
    arguments than its message (`UnknownStrategyError`, pydantic's errors) cannot be
    rebuilt: the pool would then count its process as dead. So each is rebuilt
    here as its nearest plain kind, message kept."""
    try:
        return function(*args)
    except InfeasiblePlanError as error:
        raise InfeasiblePlanError(str(error)) from None
    except PlannerError as error:
        raise PlannerError(str(error)) from None
    except (ValueError, KeyError) as error:
        raise ValueError(str(error)) from None
    except Exception as error:
        raise PlanWorkerError(f"{type(error).__name__}: {error}") from None


def _background_process(cgroup_procs: Path | None = None) -> None:
    """Planning is background work: the agent's own threads come first on a busy
    core. Ctrl-C reaches the whole process group; the agent ends this process, or,
    killed itself, leaves it to notice (`_exit_with`).

    `cgroup_procs` (emulated devices only, `planner.cgroup_procs`): the group this
    process joins. Spawned by the agent, it starts in the agent's event-loop group,
    whose CPU quota it would then spend: in one demo the leader's loop was
    throttled in 840 periods during 19 s of planning, its peers' in 25-183. A board
    plans on another of its cores."""
    join_cgroup(cgroup_procs, os.getpid(), "the planning process")
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_exit_with, args=(os.getppid(),), name="parent-watch", daemon=True
    ).start()


def _exit_with(parent: int) -> None:
    """End this process once `parent` has died (SIGKILL, the OOM killer): nothing
    would end it then, and a search under way would run to its end for no one."""
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_S)
    os._exit(0)


def auto_candidates(
    model: str,
    input_size: int,
    profiles: Sequence[DeviceProfile],
    leader: str,
    epoch: int,
    network: NetworkModel,
    known: Sequence[Candidate] | None,
) -> list[Candidate]:
    """`auto`'s candidates for these devices, replayed with `network`.

    `known`: the candidates already found for the same devices, of which only the
    message costs changed; they are replayed again (cheap) rather than searched for
    (not cheap)."""
    spec = get_spec(model, input_size)
    if known is None:
        return candidates(spec, list(profiles), leader=leader, epoch=epoch, network=network)
    for candidate in known:
        candidate.predicted_s = replay_plan(candidate.plan, spec, profiles, network).latency_s
    return list(known)


def strategy_plan(
    model: str,
    input_size: int,
    strategy: str,
    profiles: Sequence[DeviceProfile],
    leader: str,
    epoch: int,
    plan_id: str,
    network: NetworkModel | None,
) -> Plan:
    """One strategy's plan; with a `network` (the direct data plane), predicting
    what the replay of the direct plane says."""
    spec = get_spec(model, input_size)
    plan = get_strategy(strategy).plan(
        spec, list(profiles), epoch=epoch, leader=leader, plan_id=plan_id
    )
    if network is not None and supports_replay(plan):
        replayed = replay_plan(plan, spec, profiles, network).latency_s
        plan = plan.model_copy(update={"predicted_latency_s": replayed})
    return plan


def fit_message_cost(
    plan: Plan,
    model: str,
    input_size: int,
    profiles: Sequence[DeviceProfile],
    base: NetworkModel,
    field: CostField,
    measured_s: float,
) -> dict[CostField, float]:
    """The costs with which the replay of `plan` predicts `measured_s`.

    `field` (per gate round, or per message between devices) is fitted by bisection
    in [0, 50 ms]. A plan with gate rounds measured faster than its replay with no
    cost per round was over-priced per message (a cost fitted to a slower plan):
    that cost is then fitted too, in [0, its value]. Returns each cost fitted."""
    spec = get_spec(model, input_size)
    other: CostField = "broker_per_message_s"

    def fitted(network: NetworkModel, name: CostField, high: float) -> float:
        def replayed(cost: float) -> float:
            return replay_plan(
                plan, spec, profiles, network.model_copy(update={name: cost})
            ).latency_s

        low = 0.0
        if replayed(low) >= measured_s:
            return low
        if replayed(high) <= measured_s:
            return high
        for _ in range(_FIT_STEPS):
            middle = (low + high) / 2
            low, high = (middle, high) if replayed(middle) < measured_s else (low, middle)
        return (low + high) / 2

    costs: dict[CostField, float] = {field: fitted(base, field, _FIT_CEILING_S)}
    at_zero = base.model_copy(update={field: 0.0})
    # Only a plan with gate rounds: one without has no cost per round to fit.
    if (
        field == "gate_round_s"
        and costs[field] == 0.0
        and getattr(base, other) > 0.0
        and replay_plan(plan, spec, profiles, at_zero).latency_s > measured_s
    ):
        costs[other] = fitted(at_zero, other, getattr(base, other))
    return costs
