"""edgedi.planner: pure planning — device profiles, the cost model, strategies, simulator.

No I/O, no asyncio, no MQTT, no torch. The public surface:

    from edgedi.planner import get_strategy, PlanningProblem, simulate
    plan = get_strategy("edgeci").plan(spec, profiles, epoch=3, leader="pi4-a",
                                       network=NetworkModel())

Modules, one idea each: `profiles` (DeviceProfile, fit), `cost` (compute and message
model), `blocks` (separable tile tables), `timing` (vectorised evaluation), `problem`
(a planning request, plan construction), `partition` (row splits), `dp` (DPFL),
`auction` (AWAS), `strategies` (one module per strategy), `simulator`, `cluster`
(YAML descriptions, synthetic fleets), `gantt` (drawing), `errors`.
"""

from edgedi.planner.cluster import Cluster, parse_cluster, synthetic_cluster
from edgedi.planner.cost import NetworkModel
from edgedi.planner.errors import (
    ClusterConfigError,
    InfeasiblePlanError,
    PlannerError,
    ProfileError,
    UnknownStrategyError,
)
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.profiles import DeviceProfile, TimeModel, build_profile, fit_profile
from edgedi.planner.simulator import Timeline, simulate
from edgedi.planner.strategies import DEFAULT_STRATEGY, Strategy, get_strategy, strategy_names

__all__ = [
    "DEFAULT_STRATEGY",
    "Cluster",
    "ClusterConfigError",
    "DeviceProfile",
    "InfeasiblePlanError",
    "NetworkModel",
    "PlannerError",
    "PlanningProblem",
    "ProfileError",
    "Strategy",
    "TimeModel",
    "Timeline",
    "UnknownStrategyError",
    "build_profile",
    "fit_profile",
    "get_strategy",
    "parse_cluster",
    "simulate",
    "strategy_names",
    "synthetic_cluster",
]
