"""Planning strategies behind one interface, registered by name.

    get_strategy("edgeci").plan(spec, devices, epoch=3, leader="pi4-a", network=...)

`edgeci` is the default; the others are the published baselines it is compared with.
"""

from edgedi.planner.strategies import (  # noqa: F401  (imported to register)
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

DEFAULT_STRATEGY = "edgeci"

__all__ = [
    "DEFAULT_STRATEGY",
    "Decision",
    "Strategy",
    "get_strategy",
    "register",
    "strategy_names",
]
