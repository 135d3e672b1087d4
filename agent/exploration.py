"""`auto`'s candidates measured side by side: job by job in turn, not one after another.

A leader measures a few candidate plans on real jobs before it settles
(`edgedi.planner.strategies.auto.to_explore`). Measured one after another, each
candidate's median came from its own minute of a shared machine whose speed drifts
by tens of percent within minutes, and the choice followed the drift: resnet18 was
once left on one device after its row plan had measured slower in a slow minute.
Handed out in turn, job by job, every candidate is measured over the same minutes,
and the comparison is between plans, not between minutes. The plan in force (the
best measured so far) takes part again whenever new candidates are measured, so a
newcomer is never compared with an old measurement.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from edgedi.broker.plan import Plan

__all__ = ["SideBySide"]

# Jobs handed out, per candidate and measurement wanted, before the round ends with
# what it has: a candidate whose jobs keep failing cannot hold the others up.
_PATIENCE = 3


@dataclass
class SideBySide:
    """Candidate plans handed to jobs in turn until each has `jobs` measurements."""

    plans: list[tuple[str, Plan]]
    """(candidate name, its plan), in the order they are handed out."""
    jobs: int
    times: dict[str, list[float]] = field(init=False)
    """Per plan id, the measured times of its jobs."""
    handed: int = 0

    def __post_init__(self) -> None:
        if len(self.plans) < 2:
            raise ValueError("a side-by-side round needs at least two candidates")
        self.times = {plan.plan_id: [] for _, plan in self.plans}

    @property
    def first(self) -> Plan:
        return self.plans[0][1]

    def next_plan(self) -> Plan:
        """The plan for the next job (the candidates in turn)."""
        plan = self.plans[self.handed % len(self.plans)][1]
        self.handed += 1
        return plan

    def holds(self, plan_id: str) -> bool:
        return plan_id in self.times

    def record(self, plan_id: str, seconds: float) -> bool:
        """A finished job of one of the candidates; True when the round is over."""
        self.times[plan_id].append(seconds)
        every_one = all(len(times) >= self.jobs for times in self.times.values())
        return every_one or self.handed >= _PATIENCE * self.jobs * len(self.plans)

    def medians(self) -> dict[str, tuple[Plan, float]]:
        """Per candidate name, its plan and median (candidates without a job left out)."""
        return {
            name: (plan, statistics.median(self.times[plan.plan_id]))
            for name, plan in self.plans
            if self.times[plan.plan_id]
        }
