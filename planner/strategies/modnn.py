"""`modnn`: MoDNN's Biased One-Dimensional Partition (BODP), layer by layer.

MoDNN (Mao et al., DATE 2017) runs each layer across the worker nodes and returns the
results to the group owner after every layer. BODP cuts a layer's map along its
*longer* spatial side into strips whose sizes are biased by each node's computing
capability — one number per node, measured once — rather than split equally, to cut
the non-parallel data-delivery time. (Its other scheme, MSCC for sparse fully
connected layers, has no counterpart here: the head is tiny and runs on the leader.)
Capability here is the node's convolution throughput, 1 / (seconds per 3x3 MAC).
"""

from __future__ import annotations

import numpy as np

from edgedi.planner.partition import proportional_counts, unit_blocks
from edgedi.planner.problem import PlanningProblem, SegmentChoice
from edgedi.planner.strategies.base import Decision, Strategy, register
from edgedi.planner.timing import Tile


@register
class MoDNN(Strategy):
    name = "modnn"
    summary = "MoDNN BODP: longer side ∝ conv capability, per layer"

    def decide(self, problem: PlanningProblem) -> Decision:
        order = problem.canonical_order()
        fleet = problem.fleet
        capability = fleet.capability[order] * fleet.enabled[order]
        table = problem.table
        blocks = unit_blocks(problem)
        heights, widths = table.height[blocks], table.width[blocks]
        longer = np.maximum(heights, widths)
        counts = proportional_counts(
            np.broadcast_to(capability, (len(blocks), len(order))).copy(), longer
        )
        choices = []
        for u in range(problem.units):
            tiles = []
            cursor = 0
            for device, count in zip(order, counts[u], strict=True):
                if count > 0:
                    span = (cursor, cursor + int(count))
                    if widths[u] > heights[u]:
                        tiles.append(Tile(int(device), (0, int(heights[u])), span))
                    else:
                        tiles.append(Tile(int(device), span))
                cursor += int(count)
            choices.append(SegmentChoice(u, u, tuple(tiles), problem.leader))
        return choices, problem.leader
