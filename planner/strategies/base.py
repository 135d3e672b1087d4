"""The strategy interface and its registry.

A strategy turns (model, devices, network, leader) into a `Plan`. Each one decides
the segments and their tiles; `PlanningProblem.build_plan` prices the decision with
the one cost model, so strategies differ only in what they decide.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

from edgedi.broker.plan import Plan
from edgedi.models.units import ModelSpec
from edgedi.planner.cost import NetworkModel
from edgedi.planner.errors import UnknownStrategyError
from edgedi.planner.problem import PlanningProblem, SegmentChoice
from edgedi.planner.profiles import DeviceProfile

Decision = tuple[list[SegmentChoice], int]


class Strategy(ABC):
    """Plans one model on a set of devices."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def plan(
        self,
        spec: ModelSpec,
        devices: Sequence[DeviceProfile],
        *,
        epoch: int = 0,
        leader: str | None = None,
        network: NetworkModel | None = None,
        plan_id: str | None = None,
        created_at: float | None = None,
        tail_on_leader: bool = False,
    ) -> Plan:
        problem = PlanningProblem(spec, devices, network, leader, tail_on_leader)
        return self.plan_problem(problem, epoch=epoch, plan_id=plan_id, created_at=created_at)

    def plan_problem(
        self,
        problem: PlanningProblem,
        *,
        epoch: int = 0,
        plan_id: str | None = None,
        created_at: float | None = None,
    ) -> Plan:
        choices, tail = self.decide(problem)
        return problem.build_plan(
            self.name, choices, tail, epoch=epoch, plan_id=plan_id, created_at=created_at
        )

    @abstractmethod
    def decide(self, problem: PlanningProblem) -> Decision:
        """The segments with their tiles, and the device that runs the tail."""


_REGISTRY: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound=type[Strategy])


def register(cls: S) -> S:
    if cls.name in _REGISTRY:
        raise ValueError(f"strategy {cls.name} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


# How tables list the strategies: baselines from the simplest, then ours.
DISPLAY_ORDER = (
    "single",
    "equal",
    "proportional",
    "modnn",
    "edgedi",
    "deepthings",
    "edgeld",
    "edgeci",
    "auto",
    "images",
)


def strategy_names() -> tuple[str, ...]:
    def rank(name: str) -> tuple[int, str]:
        return (DISPLAY_ORDER.index(name) if name in DISPLAY_ORDER else len(DISPLAY_ORDER), name)

    return tuple(sorted(_REGISTRY, key=rank))


def get_strategy(name: str, **options: Any) -> Strategy:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownStrategyError(name, tuple(_REGISTRY)) from None
    return cls(**options)
