"""`equal`: one segment per unit, the same number of rows on every device."""

from __future__ import annotations

import numpy as np

from edgedi.planner.partition import per_unit_choices
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.strategies.base import Decision, Strategy, register


@register
class Equal(Strategy):
    """The naive split: ignores speeds and links, synchronises after every unit."""

    name = "equal"
    summary = "equal rows, one segment per unit"

    def decide(self, problem: PlanningProblem) -> Decision:
        weights = np.ones((problem.units, problem.fleet.size))
        return per_unit_choices(problem, weights), problem.leader
