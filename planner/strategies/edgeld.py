"""`edgeld`: EdgeLD's profiled partition with the layers between two pools fused.

EdgeLD distributes only the convolutions: each run of convolution units between two
pooling layers is one fused segment split into strips by capability and rebalanced a
row (EdgeLD: a column) at a time from the slowest to the fastest device until the
predicted gap is under 20 ms; pools and the classifier run on the leader.
"""

from __future__ import annotations

from edgedi.planner.partition import (
    choice_from_counts,
    move_rows_until,
    proportional_counts,
    whole_on,
)
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.strategies.base import Decision, Strategy, register
from edgedi.planner.strategies.stages import between_pools

GAP_TARGET_S = 0.020  # EdgeLD's stopping rule


@register
class EdgeLD(Strategy):
    name = "edgeld"
    summary = "EdgeLD: convs between pools fused, strips rebalanced to a 20 ms gap"

    def __init__(self, gap_target_s: float = GAP_TARGET_S) -> None:
        self.gap_target_s = gap_target_s

    def decide(self, problem: PlanningProblem) -> Decision:
        order = problem.canonical_order()
        capability = problem.fleet.enabled[order] / problem.model_compute()[order]
        choices = []
        for first, last, is_pool in between_pools(problem.spec.spatial_units):
            if is_pool:
                choices.append(whole_on(problem, first, last, problem.leader))
                continue
            block = problem.table.block(first, last)
            height = problem.table.height[block : block + 1]
            counts = proportional_counts(capability[None, :], height)[0]
            counts = move_rows_until(problem, block, order, counts, gap_target=self.gap_target_s)
            choices.append(choice_from_counts(problem, first, last, order, counts))
        return choices, problem.leader
