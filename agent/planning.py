"""From the membership table to a Plan: the leader's planning, cached per membership.

The leader turns the births of the alive devices that hold a model into the
planner's `DeviceProfile`s (fitted time models, memory, cores, link) and asks the
configured strategy (or a job's override) for a plan. Plans are cached per
(model, strategy) for one membership: any change of the alive set, or of a
device's session (a restart re-profiles it), makes a new generation and the
cache starts over. Planning is pure Python and takes most of a second of CPU for
deep models, so it runs in a process of its own (`agent.plan_worker`): neither on
the event loop nor on a thread, where it would hold the GIL against the compute
thread.

The plan of the default model is what the leader publishes on `plans/current`;
jobs of other models or strategies get theirs on demand.

Profiles learn from the cluster's own tiles: at the end of each job the coordinator
reports, per device, the predicted and measured compute time of its relayed tiles
(`observe_compute`), and a device's time models are scaled by the median of its
last jobs' measured / predicted (`DeviceProfile.refined`), each judged against the
factor its own plan assumed.
Once a device's factor has moved by more than `REPLAN_DRIFT` since the plans
were made (and the last such re-plan is `REPLAN_MIN_INTERVAL_S` old; factors stay
within 1/20..20), the cache starts over and `on_change` asks for a new plan, so a device
that turns out slower (throttled, loaded, a poor start-up benchmark) gets less.
A device's factor is forgotten when it restarts (a new session re-profiles it).

A job never waits for a re-plan that measurements asked for (the membership is
unchanged, so the plan in force still runs): `plan_for(..., stale_ok=True)` (the
coordinator's) returns the replaced plan, and asks (`on_change`, `take_wanted`)
for the new one to be made in the background. Planning `auto` for a deep model
takes most of a second of the leader's CPU (seconds on a small board), which
otherwise every re-plan added to a job's latency.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from edgedi.agent.exploration import SideBySide
from edgedi.agent.plan_worker import (
    PlanWorker,
    PlanWorkerError,
    auto_candidates,
    fit_message_cost,
    strategy_plan,
)
from edgedi.broker.messages import DeviceBirth
from edgedi.broker.plan import Plan
from edgedi.models.specs import get_spec
from edgedi.planner.cost import NetworkModel
from edgedi.planner.errors import InfeasiblePlanError, PlannerError
from edgedi.planner.profiles import COST_CLASSES, DeviceProfile, TimeModel, UnitTimes
from edgedi.planner.replay import Replay, replay_plan, supports_replay
from edgedi.planner.strategies.auto import (
    Candidate,
    choose,
    labelled,
    to_explore,
)

__all__ = ["Planning", "PlanningError", "profile_from_birth"]

logger = logging.getLogger(__name__)

# A device that announced no profile is assumed as slow as a Raspberry Pi 3 core
# (~0.5 GMAC/s), so the planner gives it little work until it is measured.
_FALLBACK_SECONDS_PER_MAC = 2e-9
_FALLBACK_BANDWIDTH = 12.5e6  # 100 Mbit/s
# Re-plan once a device's measured speed drifts this far (as a ratio) from the plans'.
REPLAN_DRIFT = 1.25
# A device's factor is the median of its last this many jobs' measured factors,
# taken once it has at least `_MIN_OBSERVED` of them (a device so slow that it is
# copied and then suspect for 10 s gives one per period). From the third on, one job
# stalled by another process, a swap storm or a planning run on the same core moves
# nothing, and a job of many small tiles (whose predictions err the same way) is
# always one vote, not many.
OBSERVED_JOBS = 5
_MIN_OBSERVED = 2
# One job's measured / predicted counts at most this far (a job stalled by a swap
# storm must not make a device look 100× slower for the next ten plans).
_RATIO_BOUNDS = (0.2, 5.0)
# Predictions below this are dominated by timer and scheduling noise.
_MIN_PREDICTED_S = 0.0005
# A device is never believed more than this much faster or slower than it announced.
_FACTOR_BOUNDS = (0.05, 20.0)
# Measurements re-plan at most this often: during an outage every tile is late, and
# a plan per late tile would only churn (the factors still learn in between).
REPLAN_MIN_INTERVAL_S = 2.0
# Plans whose speed factors are kept for judging their tiles (jobs run a recent one).
_REMEMBERED_PLANS = 64
# An `auto` plan is judged on the median of this many jobs ...
MEASURED_JOBS = 5
# ... and re-planned with fitted message costs when it is off its prediction by more.
PREDICTION_TOLERANCE = 0.15
# Fits per model and membership (the cost used is the median of them): a cluster that
# never settles keeps what it has then.
MAX_LATENCY_FITS = 6
# A job run with an explicit strategy (the demo's `single` baseline) makes `auto` switch
# to that plan only when its median beats the plan in force by more than this: two
# medians of five jobs on a shared machine differ by 10-30 % on noise alone, and in
# one resnet34 demo of session 11 the baseline's took a four-device plan that had
# measured faster off the demo's stream.
SWITCH_MARGIN = 0.1
# Side-by-side rounds per model and membership: each fit moves the predictions and may
# bring up a candidate not measured yet, and each round is 10-15 jobs. After these,
# `auto` keeps the fastest it measured.
MAX_ROUNDS = 3


class PlanningError(Exception):
    """No plan for this model and strategy on the alive devices (the message says why)."""


def profile_from_birth(birth: DeviceBirth) -> DeviceProfile:
    """The planner's view of a device, from what its birth announced."""
    models = {
        name: TimeModel(seconds_per_mac=a, seconds_fixed=b)
        for name, (a, b) in birth.profile.items()
        if name in COST_CLASSES and a >= 0 and b >= 0
    }
    default = None if models else TimeModel(seconds_per_mac=_FALLBACK_SECONDS_PER_MAC)
    link = birth.link
    return DeviceProfile(
        device=birth.device,
        time_models=models,
        default=default,
        memory_bytes=max(1, birth.capabilities.memory_bytes),
        bandwidth=link.bandwidth_bytes_per_second if link is not None else _FALLBACK_BANDWIDTH,
        latency_s=link.latency_seconds if link is not None else 0.0,
        cores=birth.capabilities.cores,
        unit_times={
            unit.digest: UnitTimes(
                digest=unit.digest,
                units=tuple(TimeModel(seconds_per_mac=a, seconds_fixed=b) for a, b in unit.units),
                tail_s=unit.tail_seconds,
                copy_s_per_byte=unit.copy_seconds_per_byte,
                channel_units=tuple(
                    None if m is None else TimeModel(seconds_per_mac=m[0], seconds_fixed=m[1])
                    for m in unit.channel_units or ()
                ),
            )
            for unit in birth.unit_profiles.values()
        },
    )


@dataclass(frozen=True)
class _Member:
    device: str
    session: int
    link: tuple[float, float] | None = None
    """The announced link: a device announces its measured link after its first birth."""


def _member(birth: DeviceBirth) -> _Member:
    link = birth.link
    return _Member(
        birth.device,
        birth.session,
        None if link is None else (link.bandwidth_bytes_per_second, link.latency_seconds),
    )


class Planning:
    """The leader's plans: one per (model, strategy), for the current membership."""

    def __init__(
        self,
        leader: str,
        input_size: int,
        default_strategy: str,
        *,
        on_change: Callable[[], None] | None = None,
        direct: bool = True,
        cgroup_procs: Path | None = None,
    ) -> None:
        self.leader = leader
        self.input_size = input_size
        self.default_strategy = default_strategy
        self.on_change = on_change
        self.epoch = 0
        self._births: dict[str, DeviceBirth] = {}
        self._members: frozenset[_Member] = frozenset()
        self._cache: dict[tuple[str, str], Plan] = {}
        # Plans replaced by a re-plan, served until their successor is made; the keys
        # served that way, for the background re-plan to make.
        self._stale: dict[tuple[str, str], Plan] = {}
        self._wanted: dict[tuple[str, str], None] = {}
        self._lock = asyncio.Lock()
        self._worker = PlanWorker(cgroup_procs)
        self.generation = 0
        # Per (device, session): the measured speed factor, and the one plans use.
        self._factors: dict[_Member, float] = {}
        self._planned: dict[_Member, float] = {}
        self._observed: dict[_Member, deque[float]] = {}
        # The factors each recent plan was made with: a tile of a job still running
        # an older plan is judged against the factor its prediction assumed, not the
        # one in force now (which would make the factor swing after every re-plan).
        self._plan_factors: OrderedDict[str, dict[_Member, float]] = OrderedDict()
        self._learnt_replan_at = -math.inf
        self.direct = direct
        # Measured client-side latencies per (model, plan); candidates' slow medians;
        # per model, the fitted cost per message between devices and the fit asked for.
        self._job_times: dict[tuple[str, str], deque[float]] = {}
        self._measured: dict[str, dict[str, float]] = {}
        self._message_cost: dict[str, float] = {}
        self._cost_fits: dict[str, deque[float]] = {}
        self._round_cost: dict[str, float] = {}
        self._round_fits: dict[str, deque[float]] = {}
        self._candidates: dict[str, tuple[int, list[Candidate]]] = {}
        # Per model, the last `auto` plan made: a re-plan that makes it again keeps its id.
        self._last_auto: dict[str, Plan] = {}
        self._pending_fit: dict[str, tuple[Plan, float]] = {}
        self._fits: dict[str, int] = {}
        # Per model: `auto`'s candidates being measured side by side (`SideBySide`),
        # and how many rounds it started.
        self._rounds: dict[str, SideBySide] = {}
        self._rounds_started: dict[str, int] = {}

    def update(self, births: Mapping[str, DeviceBirth], alive: Iterable[str], epoch: int) -> bool:
        """Take the current membership; True when it differs from the last one."""
        alive_births = {device: births[device] for device in alive if device in births}
        members = frozenset(_member(b) for b in alive_births.values())
        if members == self._members and epoch == self.epoch:
            return False
        self._births = alive_births
        self._members = members
        self.epoch = epoch
        for forgotten in set(self._factors) - members:
            del self._factors[forgotten]
        for forgotten in set(self._observed) - members:
            del self._observed[forgotten]
        self._new_generation(keep_replaced=False)
        return True

    def _new_generation(self, *, keep_replaced: bool) -> None:
        """Start planning over. `keep_replaced`: the devices are the same, only their
        measured speeds moved, so the plans in force may run until their successors
        exist; a membership change is acted on at once (a newcomer is used by the
        next job, a departed device is in no plan)."""
        if keep_replaced:
            self._retire({key: plan for key, plan in self._cache.items()})
        else:
            self._stale.clear()
            self._wanted.clear()
        self._cache.clear()
        # Another cluster: what was measured on this one says nothing about it.
        for memory in (self._job_times, self._measured, self._pending_fit, self._fits):
            memory.clear()
        self._candidates.clear()
        self._rounds.clear()
        self._rounds_started.clear()
        self._planned = dict(self._factors)
        self.generation += 1

    def speed_factor(self, device: str) -> float:
        """How much slower than its birth profile the device has measured (1.0: as announced)."""
        birth = self._births.get(device)
        if birth is None:
            return 1.0
        return self._factors.get(_member(birth), 1.0)

    def observe_compute(
        self,
        device: str,
        predicted_s: float,
        measured_s: float,
        *,
        plan_id: str | None = None,
        now: float | None = None,
    ) -> bool:
        """A device's predicted and measured compute time over one job's tiles; True
        when it caused a re-plan.

        `plan_id` names the plan that predicted it (its factors are remembered; the
        current ones are assumed otherwise). `now` (monotonic seconds) is for tests.
        """
        birth = self._births.get(device)
        if birth is None or predicted_s < _MIN_PREDICTED_S or not measured_s > 0:
            return False
        member = _member(birth)
        ratio = min(max(measured_s / predicted_s, _RATIO_BOUNDS[0]), _RATIO_BOUNDS[1])
        # `predicted_s` came from a plan made with that plan's factor.
        observed = self._factors_of(plan_id).get(member, 1.0) * ratio
        window = self._observed.setdefault(member, deque(maxlen=OBSERVED_JOBS))
        window.append(min(max(observed, _FACTOR_BOUNDS[0]), _FACTOR_BOUNDS[1]))
        if len(window) < _MIN_OBSERVED:
            return False
        factor = statistics.median(window)
        self._factors[member] = factor
        # Judged against what the plans in force now assume.
        planned = self._planned.get(member, 1.0)
        if abs(math.log(factor / planned)) < math.log(REPLAN_DRIFT):
            return False
        now = time.monotonic() if now is None else now
        if now - self._learnt_replan_at < REPLAN_MIN_INTERVAL_S:
            return False
        self._learnt_replan_at = now
        logger.info(
            "%s measures %.2f× its profile (plans assumed %.2f×): re-planning",
            device,
            factor,
            planned,
        )
        self._new_generation(keep_replaced=True)
        if self.on_change is not None:
            self.on_change()
        return True

    def observe_job(self, model: str, plan: Plan, seconds: float) -> bool:
        """A finished job's time on the leader; True when it caused a re-plan.

        Jobs are judged in groups of `MEASURED_JOBS` per plan, by their median as the
        client sees it (the leader's time plus the image's and the result's hop).

        - Every plan's median is remembered under its `auto` candidate name (an
          explicit `single` job is candidate `single/1`, an explicit `edgeci` one on
          N devices `edgeci/N`): `auto` then judges that candidate by what it
          measured rather than by what it predicted (`auto.choose`).
        - An `auto` plan off its prediction by more than `PREDICTION_TOLERANCE` makes
          the next planning run fit the cost of a gate round or a message between
          devices to it (`_fit_message_cost`: the part of the model the start-up
          probes know least, since they run while the other devices are idle).
        """
        automatic = plan.strategy.startswith("auto:")
        side_by_side = self._rounds.get(model)
        if automatic and side_by_side is not None and side_by_side.holds(plan.plan_id):
            if not side_by_side.record(plan.plan_id, seconds + self._client_hops()):
                return False
            self._round_over(model, side_by_side)
            return True
        if automatic:
            name = plan.strategy.removeprefix("auto:")
        else:
            planned_on = len(plan.devices_used) if plan.strategy == "single" else len(plan.devices)
            name = f"{plan.strategy}/{planned_on}"
        recent = self._job_times.setdefault((model, plan.plan_id), deque(maxlen=MEASURED_JOBS))
        recent.append(seconds + self._client_hops())
        if len(recent) < MEASURED_JOBS:
            return False
        median = statistics.median(recent)
        recent.clear()
        measured = self._measured.setdefault(model, {})
        before = measured.get(name)
        measured[name] = median
        ratio = median / max(plan.predicted_latency_s, 1e-6)
        # A one-device plan sends nothing between devices: nothing there to fit.
        refit = (
            automatic
            and len(plan.devices_used) > 1
            and abs(math.log(ratio)) > math.log(1 + PREDICTION_TOLERANCE)
        )
        exploring = automatic and before is None
        if refit and self._fits.get(model, 0) < MAX_LATENCY_FITS:
            self._fits[model] = self._fits.get(model, 0) + 1
            self._pending_fit[model] = (plan, median)
            why = f"{plan.strategy} measures {median * 1000:.0f} ms against its prediction"
        elif exploring:
            why = f"{plan.strategy} measures {median * 1000:.0f} ms; trying the next candidate"
        elif not automatic and self._would_change(model, name, median, before):
            why = f"{name} measures {median * 1000:.0f} ms, faster than the auto plan in force"
        else:
            return False
        logger.info("%s (%.0f ms): re-planning %s", why, plan.predicted_latency_s * 1000, model)
        self._replan_now(model)
        return True

    def _round_over(self, model: str, side_by_side: SideBySide) -> None:
        """Every candidate of a side-by-side round measured: judge them, re-plan.

        The fastest multi-device candidate off its prediction by more than
        `PREDICTION_TOLERANCE` has the message costs fitted to it (one fit a round).
        """
        measured = self._measured.setdefault(model, {})
        results = side_by_side.medians()
        # The best measured before took part again: how much its median moved is how
        # much the machine did, and the candidates not in this round are scaled by it,
        # so every median compares with the others as if measured now.
        again = [name for name in results if name in measured]
        if again:
            drift = results[again[0]][1] / max(measured[again[0]], 1e-9)
            for name in set(measured) - set(results):
                measured[name] *= drift
        off = []
        for name, (plan, median) in results.items():
            measured[name] = median
            ratio = median / max(plan.predicted_latency_s, 1e-6)
            if len(plan.devices_used) > 1 and abs(math.log(ratio)) > math.log(
                1 + PREDICTION_TOLERANCE
            ):
                off.append((median, name, plan))
        if off and self._fits.get(model, 0) < MAX_LATENCY_FITS:
            median, _, plan = min(off, key=lambda item: (item[0], item[1]))
            self._fits[model] = self._fits.get(model, 0) + 1
            self._pending_fit[model] = (plan, median)
        logger.info(
            "auto measured side by side over %d jobs: %s; re-planning %s",
            side_by_side.handed,
            ", ".join(
                f"{name} {median * 1000:.0f} ms (predicted {plan.predicted_latency_s * 1000:.0f})"
                for name, (plan, median) in sorted(results.items(), key=lambda r: r[1][1])
            ),
            model,
        )
        self._replan_now(model)

    def _replan_now(self, model: str) -> None:
        # Not kept running meanwhile: the next job is to measure the new choice (a
        # round under way ends with the plans it hands out).
        self._rounds.pop(model, None)
        for key in [key for key in self._cache if key[0] == model]:
            del self._cache[key]
        for key in [key for key in self._stale if key[0] == model]:
            del self._stale[key]
        if self.on_change is not None:
            self.on_change()

    def _would_change(self, model: str, name: str, median: float, before: float | None) -> bool:
        """Would a new measurement of candidate `name` change `auto`'s choice?"""
        plan = self._cache.get((model, "auto"))
        if plan is None or (before is not None and abs(before - median) < 0.05 * median):
            return False
        if model in self._rounds:
            return False  # the round under way settles the choice
        chosen = plan.strategy.removeprefix("auto:")
        if chosen == name:
            return False
        expected = self._measured.get(model, {}).get(chosen, plan.predicted_latency_s)
        return median < expected * (1 - SWITCH_MARGIN)

    def _client_hops(self) -> float:
        """The image's hop to the leader and the result's back, as the replay prices them."""
        birth = self._births.get(self.leader)
        if birth is None or birth.link is None:
            return 0.0
        pixels = self.input_size * self.input_size
        return 2 * birth.link.latency_seconds + pixels / birth.link.bandwidth_bytes_per_second

    def _network(self, model: str) -> NetworkModel:
        network = NetworkModel()
        update = {
            name: value
            for name, value in (
                ("broker_per_message_s", self._message_cost.get(model)),
                ("gate_round_s", self._round_cost.get(model)),
            )
            if value is not None
        }
        return network.model_copy(update=update) if update else network

    async def _fit_message_cost(self, model: str, profiles: list[DeviceProfile]) -> None:
        """Fit the cost every device-to-device message of a job adds on top of the
        probed link (its wait for a busy loop, a busy broker, a busy machine), so that
        the replay of the plan that was measured predicts what it measured.

        Bisection on `NetworkModel.gate_round_s` for plans with gate rounds, else on
        `NetworkModel.broker_per_message_s` (`plan_worker.fit_message_cost`); a plan
        that sends nothing between devices (one device) says nothing about either and
        is not fitted.
        """
        pending = self._pending_fit.pop(model, None)
        if pending is None:
            return
        plan, measured = pending
        if not supports_replay(plan) or len(plan.devices_used) < 2:
            return
        # Plans with gate rounds wait for the slowest of several messages at once,
        # many times: their error is fitted as a cost per round (and, if that is not
        # enough to predict a fast plan, per message); the others' per message.
        rounds = any(s.reductions and len({p.device for p in s.parts}) > 1 for s in plan.segments)
        costs = await self._worker.run(
            fit_message_cost,
            plan,
            model,
            self.input_size,
            profiles,
            self._network(model),
            "gate_round_s" if rounds else "broker_per_message_s",
            measured,
        )
        for field, cost in costs.items():
            # One plan's median is noisy and carries that plan's own errors: the
            # cost in use is the median of the last fits, over the plans measured.
            per_round = field == "gate_round_s"
            memory = self._round_cost if per_round else self._message_cost
            history = self._round_fits if per_round else self._cost_fits
            fits = history.setdefault(model, deque(maxlen=MAX_LATENCY_FITS))
            fits.append(cost)
            memory[model] = statistics.median(fits)
            logger.info(
                "%s: each %s costs %.2f ms beyond the probed link "
                "(%.2f ms fitted to %.0f ms measured; median of %d fits)",
                model,
                "gate round" if per_round else "message between devices",
                memory[model] * 1000,
                cost * 1000,
                measured * 1000,
                len(fits),
            )

    def _same_id_if_unchanged(self, model: str, plan: Plan) -> Plan:
        """`plan` under the id of the `auto` plan made before it for `model`, when it
        is that plan again with new predictions (a fit moved the message costs, and
        the same candidate won). Jobs then go on as one plan: judged as one group,
        and seen by clients as one plan (the demo waits for one to settle)."""
        before = self._last_auto.get(model)
        if before is not None:
            again = plan.model_copy(
                update={
                    "plan_id": before.plan_id,
                    "created_at": before.created_at,
                    "predicted_latency_s": before.predicted_latency_s,
                    "predicted_throughput": before.predicted_throughput,
                }
            )
            if again == before:
                plan = plan.model_copy(update={"plan_id": before.plan_id})
        self._last_auto[model] = plan
        return plan

    def _measured_medians(self, model: str) -> dict[str, float]:
        return dict(self._measured.get(model, {}))

    def devices_for(self, model: str) -> list[DeviceBirth]:
        """Alive devices that hold `model`, in device-id order (stable plans)."""
        return [
            birth
            for device, birth in sorted(self._births.items())
            if model in birth.capabilities.models
        ]

    def _factors_of(self, plan_id: str | None) -> Mapping[_Member, float]:
        """The speed factors the plan `plan_id` was made with (now's if unknown)."""
        known = self._plan_factors.get(plan_id) if plan_id is not None else None
        return self._planned if known is None else known

    def _remember_factors(self, plan_id: str, factors: dict[_Member, float]) -> None:
        self._plan_factors[plan_id] = factors
        while len(self._plan_factors) > _REMEMBERED_PLANS:
            self._plan_factors.popitem(last=False)

    def replay(self, model: str, plan: Plan) -> Replay | None:
        """`plan` replayed with the devices' profiles and the fitted message costs, as
        its prediction was made; None when it is not a direct-plane plan."""
        if not supports_replay(plan):
            return None
        factors = self._factors_of(plan.plan_id)
        profiles = [
            profile_from_birth(birth).scaled(factors.get(_member(birth), 1.0))
            for birth in self.devices_for(model)
        ]
        try:
            spec = get_spec(model, self.input_size)
            return replay_plan(plan, spec, profiles, self._network(model))
        except (PlannerError, ValueError, KeyError):
            return None

    def cached(self, model: str, strategy: str | None = None) -> Plan | None:
        return self._cache.get((model, strategy or self.default_strategy))

    def _retire(self, plans: Mapping[tuple[str, str], Plan]) -> None:
        """Keep replaced plans to serve (`stale_ok`) until their successors exist."""
        self._stale.update(plans)

    def take_wanted(self) -> list[tuple[str, str]]:
        """The (model, strategy) pairs served a replaced plan since the last call:
        the background re-plan makes these."""
        wanted = list(self._wanted)
        self._wanted.clear()
        return wanted

    async def plan_for(
        self,
        model: str,
        strategy: str | None = None,
        *,
        stale_ok: bool = False,
        for_job: bool = False,
    ) -> Plan:
        """The plan for `model` (cached for this membership); `PlanningError` if none.

        With `stale_ok`, a plan that a re-plan from measurements replaced (same
        devices, same leader) is returned at once while its successor is still to be
        made; the successor is then asked for through `on_change`. With `for_job`
        (the coordinator's, once per job), `auto` hands out the candidates it is
        measuring side by side in turn; otherwise the first of them.
        """
        strategy = strategy or self.default_strategy
        key = (model, strategy)
        # A round is started with its cache entry and ends with it (`_replan_now`).
        side_by_side = self._rounds.get(model) if strategy == "auto" else None
        if for_job and side_by_side is not None:
            return side_by_side.next_plan()
        if stale_ok and key not in self._cache:
            stale = self._stale.get(key)
            if stale is not None:
                if key not in self._wanted:
                    self._wanted[key] = None
                    if self.on_change is not None:
                        self.on_change()
                return stale
        async with self._lock:  # one planning run at a time; the rest reuse its plan
            plan = self._cache.get(key)
            if plan is not None:
                return plan
            generation = self.generation
            devices = self.devices_for(model)
            if not devices:
                raise PlanningError(f"no alive device holds model {model!r} (no workers)")
            if self.leader not in {birth.device for birth in devices}:
                raise PlanningError(
                    f"the leader {self.leader} does not hold model {model!r}; it runs the tail"
                )
            factors = dict(self._planned)
            profiles = [
                profile_from_birth(birth).scaled(factors.get(_member(birth), 1.0))
                for birth in devices
            ]
            made, contenders = await self._make_plan(
                model, strategy, profiles, self.epoch, generation
            )
            for _, contender in contenders:
                self._remember_factors(contender.plan_id, factors)
            self._remember_factors(made.plan_id, factors)
            if generation == self.generation:
                self._cache[key] = made
                self._stale.pop(key, None)
                if contenders:
                    self._rounds[model] = SideBySide(contenders, MEASURED_JOBS)
                    self._rounds_started[model] = self._rounds_started.get(model, 0) + 1
                    if for_job:
                        return self._rounds[model].next_plan()
            return made

    def close(self) -> None:
        """End the planning process (a plan being made is abandoned)."""
        self._worker.close()

    async def _make_plan(
        self,
        model: str,
        strategy: str,
        profiles: list[DeviceProfile],
        epoch: int,
        generation: int,
    ) -> tuple[Plan, list[tuple[str, Plan]]]:
        """Plan for the membership `generation` that `profiles` are of: the membership
        may change meanwhile, and candidates cached under the new generation would
        name devices that have left. The searches and replays run in the planning
        process (`PlanWorker`); what they read and change of the leader's state is
        read and changed here, on the event loop.

        Returns the plan and, when `auto` has candidates to measure side by side
        (`SideBySide`), every one of them by name, the plan first; else no others.
        """
        contenders: list[tuple[str, Plan]] = []
        try:
            if strategy == "auto" and self.direct:
                await self._fit_message_cost(model, profiles)
                known = self._candidates.get(model)
                # The same devices: only the message costs changed, so the plans are
                # the same; replaying them again is cheap (planning is not).
                found = await self._worker.run(
                    auto_candidates,
                    model,
                    self.input_size,
                    profiles,
                    self.leader,
                    epoch,
                    self._network(model),
                    known[1] if known is not None and known[0] == generation else None,
                )
                self._candidates[model] = (generation, found)
                measured = self._measured_medians(model)
                untried = [c for c in to_explore(found) if c.name not in measured]
                tried = [c for c in found if c.name in measured]
                if tried and self._rounds_started.get(model, 0) >= MAX_ROUNDS:
                    untried, found = [], tried  # explored enough: the fastest measured
                # Measure the few best-predicted candidates (one device among them)
                # on real jobs first, side by side with the best measured so far;
                # then keep the fastest measured.
                best = untried[0] if untried else choose(found, measured)
                plan = self._same_id_if_unchanged(model, labelled(best, uuid.uuid4().hex, profiles))
                if best.name not in measured:
                    others = untried[1:] + ([choose(tried, measured)] if tried else [])
                    if others:
                        contenders = [(best.name, plan)] + [
                            (c.name, labelled(c, uuid.uuid4().hex, profiles)) for c in others
                        ]
                logger.info(
                    "auto: %s",
                    ", ".join(
                        f"{c.name} {c.predicted_s * 1000:.0f} ms"
                        for c in sorted(found, key=lambda c: c.predicted_s)[:6]
                    ),
                )
            else:
                # With the direct plane on, the plan predicts what the client will
                # measure: the direct plane's replay, step by step.
                plan = await self._worker.run(
                    strategy_plan,
                    model,
                    self.input_size,
                    strategy,
                    profiles,
                    self.leader,
                    epoch,
                    uuid.uuid4().hex,
                    self._network(model) if self.direct else None,
                )
        except InfeasiblePlanError as error:
            raise PlanningError(f"no plan for {model} with {strategy}: {error}") from error
        except (PlannerError, ValueError, KeyError) as error:
            raise PlanningError(f"planning {model} with {strategy} failed: {error}") from error
        except (BrokenProcessPool, PlanWorkerError) as error:
            raise PlanningError(f"planning {model} with {strategy} failed: {error}") from error
        logger.info("new plan %s", plan.summary())
        if contenders:
            logger.info(
                "auto: measuring %s side by side, job by job",
                ", ".join(name for name, _ in contenders),
            )
        return plan, contenders
