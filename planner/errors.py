"""The planner's exceptions, one tree so that callers can catch what they can handle.

    PlannerError                     anything the planner refuses to do
    ├── ClusterConfigError           a cluster description (YAML) is invalid; carries
    │                                `field.path: message` lines for the user
    ├── ProfileError                 a device profile cannot be built or fitted
    ├── UnknownStrategyError         no strategy is registered under that name
    └── InfeasiblePlanError          no plan exists (no usable device, a model
                                     without spatial units, a device missing)

Plans that fail validation raise `edgedi.broker.plan.PlanError` (a ValueError), because
the schema lives with the other wire schemas and must not import the planner.
"""

from __future__ import annotations

from collections.abc import Sequence


class PlannerError(Exception):
    """Base class of every error the planner raises on purpose."""


class ClusterConfigError(PlannerError):
    """A cluster description is invalid; `problems` holds one `field.path: message` per line."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{source}: invalid cluster description\n{lines}")


class ProfileError(PlannerError):
    """A device profile cannot be fitted or is inconsistent."""


class UnknownStrategyError(PlannerError, KeyError):
    """No strategy is registered under the requested name."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = tuple(known)
        super().__init__(f"unknown strategy {name!r}; known: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class InfeasiblePlanError(PlannerError):
    """No plan can be made for this model on these devices."""
