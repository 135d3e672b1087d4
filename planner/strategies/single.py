"""`single`: the fastest device does everything (the baseline every speedup is over)."""

from __future__ import annotations

import numpy as np

from edgedi.planner.partition import whole_on
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.strategies.base import Decision, Strategy, register


@register
class Single(Strategy):
    """The device with the lowest predicted latency — the image's transfer to it
    included — runs every unit and the tail, so nothing comes back."""

    name = "single"
    summary = "fastest device does all"

    def decide(self, problem: PlanningProblem) -> Decision:
        whole = np.array([problem.table.block(0, problem.units - 1)])
        costs = problem.single_costs(whole, sink_is_device=True)[0] + problem.fleet.tail
        device = int(np.argmin(costs))
        return [whole_on(problem, 0, problem.units - 1, device, sink=device)], device
