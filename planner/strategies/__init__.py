"""Planning strategies behind one interface, registered by name.

    get_strategy("edgeci").plan(spec, devices, epoch=3, leader="pi4-a", network=...)

`auto` is the default: the fastest replayed plan of the row strategies (`edgeci`, our
own auction + fusion DP, among them) on the fastest 1..N devices; the others are
the published baselines, each usable alone.
"""

from edgedi.planner.strategies import (  # noqa: F401  (imported to register)
    auto,
    deepthings,
    edgeci,
    edgedi,
    edgeld,
    equal,
    images,
    modnn,
    proportional,
    single,
)
from edgedi.planner.strategies.base import (
    Decision,
    Strategy,
    get_strategy,
    register,
    strategy_names,
)

DEFAULT_STRATEGY = "auto"

__all__ = [
    "DEFAULT_STRATEGY",
    "Decision",
    "Strategy",
    "get_strategy",
    "register",
    "strategy_names",
]
