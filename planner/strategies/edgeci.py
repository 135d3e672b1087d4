"""`edgeci`: EdgeCI — AWAS partitions inside DPFL's fusion segmentation. The default.

For every block `i..j` of consecutive spatial units the candidates are priced at once
(vectorised over all blocks): rows in proportion to speed over the k fastest devices
(k = 1, 2, 4, ... while doubling still helps some block), the AWAS clearing rounds
started from the best of those (`edgedi.planner.auction.clear`, blocks grouped by how
many devices they use), and the block run whole on each single device (its input sent
there and its output sent back, or — for the last block — kept there with the tail).
One-unit blocks also try equal, speed-proportional and capability-proportional rows
over every device. A block's cost is its best candidate's makespan: scatter, halo
compute, reduction rounds, gather. DPFL (`edgedi.planner.dp`) then picks the
boundaries that minimise the sum. Finally each chosen block's partition goes through
the AWAS assignment auction and a steepest-descent polish, kept only if they help.

Because the single-device runs are candidates of every block (the whole model on the
best device is one segmentation the DP considers), and the per-unit proportional,
equal and capability partitions are candidates of every one-unit block, the plan is
never predicted slower than `single`, `proportional`, `equal` or `modnn` (on square
maps); the tests check it against every strategy on the shipped clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgedi.planner import auction
from edgedi.planner.dp import best_segmentation
from edgedi.planner.partition import choice_from_counts, proportional_counts, whole_on
from edgedi.planner.problem import PlanningProblem, SegmentChoice
from edgedi.planner.strategies.base import Decision, Strategy, register
from edgedi.planner.timing import FloatArray, IntArray

ROWS, ON_ONE, ON_ONE_WITH_TAIL = 0, 1, 2
# Added per segment to the DP's objective only: between near-equal segmentations (a
# model cut into pieces that all run on the leader costs the same as one piece) the one
# with fewer synchronisations wins. Far below any real difference.
SEGMENT_TIE_BREAK_S = 1e-6


@dataclass(frozen=True)
class BlockCosts:
    """The DP's input: each block's best predicted cost and how it was achieved."""

    cost: FloatArray  # (NB,) makespan (plus the tail for blocks ending at the last unit)
    kind: IntArray  # (NB,) ROWS, ON_ONE or ON_ONE_WITH_TAIL
    device: IntArray  # (NB,) the device for the single-device kinds
    counts: IntArray  # (NB, K) rows per slot for ROWS
    order: IntArray  # (K,) slot order


def prefix_sizes(devices: int) -> list[int]:
    """1, 2, 4, ... up to `devices` (always included)."""
    sizes, size = [], 1
    while size < devices:
        sizes.append(size)
        size *= 2
    return [*sizes, devices]


def block_costs(problem: PlanningProblem, clearing_rounds: int = 6) -> BlockCosts:
    """Price every block of the model with every candidate partition."""
    table, fleet = problem.table, problem.fleet
    leader = fleet.leader
    blocks = np.arange(len(table.first), dtype=np.int64)
    order = problem.canonical_order()
    devices = len(order)
    heights = table.height
    usable = fleet.enabled[order].astype(np.float64)
    speed = usable[None, :] / problem.block_compute(blocks)[:, order]
    sinks = np.full(len(blocks), leader, dtype=np.int64)

    # Starts: rows ∝ speed over the k fastest devices (the leader first), k = 1, 2, 4...
    # With a star through one leader link, a handful of devices is often all that helps;
    # the prefixes find that number cheaply and keep the batch narrow.
    best_counts = np.zeros((len(blocks), devices), dtype=np.int64)
    best_span = np.full(len(blocks), np.inf)
    best_size = np.ones(len(blocks), dtype=np.int64)
    for size in prefix_sizes(devices):
        if not usable[:size].any():
            continue
        counts = proportional_counts(speed[:, :size], heights)
        timing = problem.evaluate_counts(blocks, order[:size], counts, sinks)
        better = timing.makespan < best_span
        best_counts[better, :size] = counts[better]
        best_counts[better, size:] = 0
        best_span = np.where(better, timing.makespan, best_span)
        best_size = np.where(better, size, best_size)
        if size > 1 and not better.any():
            break  # twice the devices helped no block: slower ones will not either
    # The market may add devices beyond a block's best prefix, up to twice its size;
    # blocks are cleared in groups of equal width so that small ones stay cheap.
    counts = best_counts.copy()
    spans = best_span.copy()
    widths = np.minimum(devices, np.maximum(8, 2 * best_size))
    for width in np.unique(widths):
        group = np.nonzero(widths == width)[0]
        group_counts, group_spans = auction.clear(
            problem,
            blocks[group],
            order[:width],
            sinks[group],
            best_counts[group, :width],
            clearing_rounds,
        )
        better = group_spans < spans[group]
        counts[group[better], :width] = group_counts[better]
        counts[group[better], width:] = 0
        spans[group[better]] = group_spans[better]
    # One-unit blocks also try the equal, capability and speed splits over every
    # device, so that the per-unit baselines are among the DP's candidates.
    capability = usable * fleet.capability[order]
    units = np.array([table.block(u, u) for u in range(problem.units)], dtype=np.int64)
    for weights in (usable[None, :], capability[None, :], speed[units]):
        trial_counts = proportional_counts(
            np.broadcast_to(weights, (len(units), devices)).copy(), heights[units]
        )
        trial = problem.evaluate_counts(units, order, trial_counts, sinks[units])
        better = trial.makespan < spans[units]
        counts[units[better]] = trial_counts[better]
        spans[units[better]] = trial.makespan[better]

    final = table.last == problem.units - 1
    single = problem.single_costs(blocks)
    single_device = np.argmin(single, axis=1)
    single_cost = single[blocks, single_device]
    tail_here = np.where(final, fleet.tail[leader], 0.0)
    candidates = np.stack(
        [spans + tail_here, single_cost + tail_here, np.full(len(blocks), np.inf)]
    )
    chosen_device = np.stack([single_device, single_device, single_device])
    if final.any() and not problem.tail_on_leader:
        finals = blocks[final]
        own = problem.single_costs(finals, sink_is_device=True) + fleet.tail[None, :]
        own_device = np.argmin(own, axis=1)
        candidates[ON_ONE_WITH_TAIL, finals] = own[np.arange(len(finals)), own_device]
        chosen_device[ON_ONE_WITH_TAIL, finals] = own_device
    kind = np.argmin(candidates, axis=0)
    return BlockCosts(
        cost=candidates[kind, blocks],
        kind=kind,
        device=chosen_device[kind, blocks],
        counts=counts,
        order=order,
    )


@register
class EdgeCI(Strategy):
    name = "edgeci"
    summary = "EdgeCI: AWAS auction partitions inside DPFL fusion (default)"

    def __init__(
        self,
        clearing_rounds: int = 6,
        auction_rounds: int = 2,
        polish_steps: int = 40,
        auction_limit: int = 256,
    ) -> None:
        self.clearing_rounds = clearing_rounds
        self.auction_rounds = auction_rounds
        self.polish_steps = polish_steps
        self.auction_limit = auction_limit

    def decide(self, problem: PlanningProblem) -> Decision:
        table = problem.table
        leader = problem.leader
        costs = block_costs(problem, self.clearing_rounds)
        _total, segmentation = best_segmentation(
            problem.units, lambda i, j: float(costs.cost[table.index[i, j]]) + SEGMENT_TIE_BREAK_S
        )
        choices: list[SegmentChoice] = []
        tail = leader
        for first, last in segmentation:
            b = int(table.index[first, last])
            kind = int(costs.kind[b])
            if kind == ON_ONE_WITH_TAIL:
                device = int(costs.device[b])
                choices.append(whole_on(problem, first, last, device, sink=device))
                tail = device
                continue
            if kind == ON_ONE:
                choices.append(whole_on(problem, first, last, int(costs.device[b])))
                continue
            order, counts = self.refine(problem, b, costs.order, costs.counts[b])
            choices.append(choice_from_counts(problem, first, last, order, counts))
        return choices, tail

    def refine(
        self, problem: PlanningProblem, block: int, order: IntArray, counts: IntArray
    ) -> tuple[IntArray, IntArray]:
        """AWAS assignment rounds and the polish; the best of polishing the cleared
        partition and polishing the auctioned one wins (the auction only ever moves
        to a better makespan, but its local optimum may polish worse).

        Both work on the slots up to the last one with rows plus a few idle devices
        after it (the next fastest), not on the whole fleet.
        """
        leader = problem.leader
        used = int(np.nonzero(counts)[0].max()) + 1 if counts.any() else 1
        width = min(len(order), used + 4)
        starts = [(order[:width], counts[:width])]
        if width <= self.auction_limit and self.auction_rounds > 0:
            auctioned_order, auctioned, _span = auction.assign(
                problem, block, order[:width], counts[:width], leader, self.auction_rounds
            )
            if not np.array_equal(auctioned_order, order[:width]):
                starts.append((auctioned_order, auctioned))
        best: tuple[float, IntArray, IntArray] | None = None
        for start_order, start_counts in starts:
            if self.polish_steps > 0:
                polished, span = auction.polish(
                    problem, block, start_order, start_counts, leader, self.polish_steps
                )
            else:
                polished = start_counts
                span = float(
                    problem.evaluate_counts(
                        np.array([block]), start_order, polished[None, :], np.array([leader])
                    ).makespan[0]
                )
            if best is None or span < best[0]:
                best = (span, start_order, polished)
        assert best is not None
        return best[1], best[2]
