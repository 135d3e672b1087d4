"""`single`: the fastest device does everything (the baseline every speedup is over)."""

from __future__ import annotations

import numpy as np

from edgedi.planner.partition import whole_on
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.strategies.base import Decision, Strategy, register


@register
class Single(Strategy):
    """The device with the lowest predicted latency — the image's transfer to it
    included — runs every unit and the tail, so nothing comes back (unless the
    problem insists on the tail running on the leader)."""

    name = "single"
    summary = "fastest device does all"

    def decide(self, problem: PlanningProblem) -> Decision:
        whole = np.array([problem.table.block(0, problem.units - 1)])
        device = int(np.argmin(problem.final_single_costs(whole)[0]))
        sink = problem.final_sink(device)
        return [whole_on(problem, 0, problem.units - 1, device, sink=sink)], sink
