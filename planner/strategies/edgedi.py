"""`edgedi`: EdgeDI's adaptive one-dimensional partition over its fused stages.

EdgeDI (Fang et al., ACM TOIT 2023) predicts each device's time as its fitted
`a · FLOPs + b` on its strip (halo included) plus the strip's upload and download over
its own link, starts from rows in proportion to capability (Pi 3B+ = 1, Pi 4B = 1.5 in
the paper: relative whole-model speed here), then moves one row at a time from the
slowest predicted device to the fastest until the gap stops shrinking, keeping the
partition before the move that did not help. It fuses the convolutions of a stage
(up to the stage's pooling). Its predictions ignore queueing on shared links and the
gate synchronisation (its gates pool locally); the plan is still priced with ours.
"""

from __future__ import annotations

from edgedi.planner.partition import choice_from_counts, move_rows_until, proportional_counts
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.strategies.base import Decision, Strategy, register
from edgedi.planner.strategies.stages import stage_blocks


@register
class EdgeDI(Strategy):
    name = "edgedi"
    summary = "EdgeDI: stages fused, rows ∝ capability, moved until the gap stops shrinking"

    def decide(self, problem: PlanningProblem) -> Decision:
        order = problem.canonical_order()
        capability = problem.fleet.enabled[order] / problem.model_compute()[order]
        choices = []
        for first, last in stage_blocks(problem.spec.spatial_units):
            block = problem.table.block(first, last)
            height = problem.table.height[block : block + 1]
            counts = proportional_counts(capability[None, :], height)[0]
            counts = move_rows_until(problem, block, order, counts)
            choices.append(choice_from_counts(problem, first, last, order, counts))
        return choices, problem.leader
