"""`proportional`: one segment per unit, rows in proportion to speed on that unit."""

from __future__ import annotations

from edgedi.planner.partition import per_unit_choices, unit_blocks
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.strategies.base import Decision, Strategy, register


@register
class Proportional(Strategy):
    """Capacity-proportional split: a device's share of a unit's rows is its speed on
    that unit (1 / predicted compute time), transfers ignored."""

    name = "proportional"
    summary = "rows ∝ speed, one segment per unit"

    def decide(self, problem: PlanningProblem) -> Decision:
        order = problem.canonical_order()
        compute = problem.block_compute(unit_blocks(problem))[:, order]
        return per_unit_choices(problem, 1.0 / compute, order), problem.leader
