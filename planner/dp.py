"""DPFL: choosing fusion boundaries by a non-recursive, bottom-up dynamic program.

Spatial units `0..n-1` are cut into consecutive blocks; block `i..j` costs `cost(i, j)`
(its makespan: scatter, compute with halos and reductions, gather — under whatever
partition the caller priced it with). Blocks run one after another, so the latency of a
segmentation is the sum of its blocks' costs, and

    T[0] = 0,   T[j+1] = min over i <= j of  T[i] + cost(i, j)

gives the optimum in O(n²) cost lookups. `brute_force_segmentation` enumerates all
2^(n-1) boundary sets with the same cost function, for the tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

BlockCost = Callable[[int, int], float]


def best_segmentation(units: int, cost: BlockCost) -> tuple[float, list[tuple[int, int]]]:
    """Minimum total cost and its blocks `(first, last)`, in order.

    Ties go to the segmentation with the longer last block (smaller `i` wins on equal
    cost because it is tried first), which keeps plans with fewer synchronisations.
    """
    if units <= 0:
        return 0.0, []
    best = [0.0] + [math.inf] * units
    cut = [0] * (units + 1)
    for end in range(1, units + 1):
        for start in range(end):
            total = best[start] + cost(start, end - 1)
            if total < best[end]:
                best[end] = total
                cut[end] = start
    blocks: list[tuple[int, int]] = []
    end = units
    while end > 0:
        start = cut[end]
        blocks.append((start, end - 1))
        end = start
    blocks.reverse()
    return best[units], blocks


def brute_force_segmentation(units: int, cost: BlockCost) -> tuple[float, list[tuple[int, int]]]:
    """The same optimum by enumerating every set of boundaries (exponential: tests only)."""
    if units <= 0:
        return 0.0, []
    best_total = math.inf
    best_blocks: list[tuple[int, int]] = []
    for mask in itertools.product((False, True), repeat=units - 1):
        blocks = []
        start = 0
        for position, boundary in enumerate(mask):
            if boundary:
                blocks.append((start, position))
                start = position + 1
        blocks.append((start, units - 1))
        total = 0.0
        for first, last in blocks:
            total = total + cost(first, last)
        if total < best_total:
            best_total, best_blocks = total, blocks
    return best_total, best_blocks
