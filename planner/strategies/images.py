"""`images`: whole-image dispatch — one image per device, for throughput, not latency."""

from __future__ import annotations

from edgedi.broker.plan import Plan
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.strategies.base import Decision, Strategy, register


@register
class Images(Strategy):
    """Each device runs whole images; shares of the image stream ∝ device speed.

    The plan's latency is one image's (mean over devices, all dispatched at once);
    its throughput is the devices' summed rates, capped by the leader's link.
    """

    name = "images"
    summary = "whole images per device (throughput)"

    def plan_problem(
        self,
        problem: PlanningProblem,
        *,
        epoch: int = 0,
        plan_id: str | None = None,
        created_at: float | None = None,
    ) -> Plan:
        return problem.build_images_plan(
            self.name, epoch=epoch, plan_id=plan_id, created_at=created_at
        )

    def decide(self, problem: PlanningProblem) -> Decision:
        raise NotImplementedError("images plans have no segments")
