"""DPFL: the dynamic program finds the same optimum as enumerating every segmentation.

Both call the same block cost function — edgeci's, on real (random) models and
heterogeneous clusters — so the optimum must be equal exactly, not approximately.
"""

from __future__ import annotations

import itertools
import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from test_planner_fixtures import random_cluster, random_network, random_spec

from edgedi.planner.dp import best_segmentation, brute_force_segmentation
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.strategies.edgeci import SEGMENT_TIE_BREAK_S, block_costs


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), units=st.integers(1, 12), devices=st.integers(2, 5))
def test_dp_equals_brute_force_on_edgeci_costs(seed: int, units: int, devices: int) -> None:
    rng = random.Random(seed)
    spec = random_spec(rng, units, size=rng.choice([24, 40]))
    problem = PlanningProblem(spec, random_cluster(rng, devices), random_network(rng))
    costs = block_costs(problem, clearing_rounds=2)
    index = problem.table.index

    def cost(first: int, last: int) -> float:
        return float(costs.cost[index[first, last]]) + SEGMENT_TIE_BREAK_S

    best, blocks = best_segmentation(units, cost)
    brute, _brute_blocks = brute_force_segmentation(units, cost)
    assert best == brute
    assert math.isclose(sum(cost(first, last) for first, last in blocks), best, rel_tol=1e-12)
    assert blocks[0][0] == 0 and blocks[-1][1] == units - 1
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(blocks))


@settings(max_examples=60, deadline=None)
@given(units=st.integers(0, 10), data=st.data())
def test_dp_equals_brute_force_on_arbitrary_costs(units: int, data: st.DataObject) -> None:
    values = {
        (i, j): data.draw(st.floats(0, 100, allow_nan=False), label=f"c{i}{j}")
        for j in range(units)
        for i in range(j + 1)
    }

    def cost(first: int, last: int) -> float:
        return values[first, last]

    assert best_segmentation(units, cost)[0] == brute_force_segmentation(units, cost)[0]


def test_dp_prefers_fusing_when_cheaper() -> None:
    # Fusing everything costs 5, any cut costs more.
    def cost(first: int, last: int) -> float:
        return 5.0 if (first, last) == (0, 3) else 2.0 * (last - first + 1)

    assert best_segmentation(4, cost) == (5.0, [(0, 3)])
    assert brute_force_segmentation(4, cost) == (5.0, [(0, 3)])
