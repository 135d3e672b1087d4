"""Row partitions: splitting a block's output rows among devices in slot order.

Counts are per slot (the slots' devices given by an order); rows are contiguous in slot
order. These helpers are shared by the strategies, vectorised over blocks where the
search needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgedi.planner.cost import message_parts
from edgedi.planner.problem import PlanningProblem, SegmentChoice
from edgedi.planner.timing import FloatArray, IntArray, Tile


def round_counts(amounts: FloatArray, height: IntArray) -> IntArray:
    """Integer counts summing to `height` per row, by largest remainder.

    Slots with a zero amount stay at zero; ties go to the earlier slot (as
    `edgedi.models.units.split_rows`).
    """
    amounts = np.maximum(np.nan_to_num(amounts, nan=0.0, posinf=0.0), 0.0)
    base = np.floor(amounts).astype(np.int64)
    deficit = height - base.sum(axis=1)
    fraction = np.where(amounts > 0, amounts - base, -1.0)
    by_fraction = np.argsort(-fraction, axis=1, kind="stable")
    slots = amounts.shape[1]
    gets = np.arange(slots)[None, :] < np.minimum(deficit, (amounts > 0).sum(axis=1))[:, None]
    rows = np.nonzero(gets)[0]
    np.add.at(base, (rows, by_fraction[gets]), 1)
    leftover = height - base.sum(axis=1)
    if np.any(leftover != 0):
        rows = np.nonzero(leftover)[0]
        target = np.argmax(amounts[rows], axis=1)
        base[rows, target] += leftover[rows]
    return base


def proportional_counts(weights: FloatArray, height: IntArray) -> IntArray:
    """Counts proportional to `weights` (B, K) for blocks of `height` (B,) rows."""
    weights = np.where(np.isfinite(weights), np.maximum(weights, 0.0), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    safe = np.where(total > 0, total, 1.0)
    amounts: FloatArray = np.where(total > 0, weights / safe, 0.0) * height[:, None].astype(
        np.float64
    )
    # A row whose weights are all zero gives everything to its first slot.
    amounts[:, 0] = np.where(total[:, 0] > 0, amounts[:, 0], height)
    return round_counts(amounts, height)


def choice_from_counts(
    problem: PlanningProblem,
    first: int,
    last: int,
    order: Sequence[int] | IntArray,
    counts: Sequence[int] | IntArray,
    sink: int | None = None,
) -> SegmentChoice:
    """A segment whose slots get `counts` rows in `order` (empty slots dropped)."""
    tiles = []
    cursor = 0
    for device, count in zip(order, counts, strict=True):
        if count > 0:
            tiles.append(Tile(int(device), (cursor, cursor + int(count))))
        cursor += int(count)
    return SegmentChoice(first, last, tuple(tiles), problem.leader if sink is None else sink)


def whole_on(
    problem: PlanningProblem, first: int, last: int, device: int, sink: int | None = None
) -> SegmentChoice:
    height = int(problem.table.height[problem.table.block(first, last)])
    return SegmentChoice(
        first, last, (Tile(device, (0, height)),), problem.leader if sink is None else sink
    )


def independent_times(
    problem: PlanningProblem, block: int, order: IntArray, counts: IntArray
) -> FloatArray:
    """Per slot: compute + its own input and output transfer, ignoring the others.

    The per-device prediction EdgeDI and EdgeLD balance (no queueing on shared links,
    no synchronisation); the plan's latency is still priced with the full model.
    """
    timing = problem.evaluate_counts(np.array([block]), order, counts[None, :])
    fleet = problem.fleet
    leader = fleet.leader
    overhead = float(problem.network.message_overhead_bytes)
    compute = timing.compute[0]
    pre, hold, post = message_parts(
        timing.bytes_in[0] + overhead,
        fleet.bandwidth[leader],
        fleet.latency[leader],
        fleet.bandwidth[order],
        fleet.latency[order],
        problem.network,
        "sender",
    )
    send = pre + hold + post
    pre, hold, post = message_parts(
        timing.bytes_out[0] + overhead,
        fleet.bandwidth[order],
        fleet.latency[order],
        fleet.bandwidth[leader],
        fleet.latency[leader],
        problem.network,
        "receiver",
    )
    back = pre + hold + post
    remote = (order != leader) & (counts > 0)
    result: FloatArray = compute + np.where(remote, send + back, 0.0)
    return result


def move_rows_until(
    problem: PlanningProblem,
    block: int,
    order: IntArray,
    counts: IntArray,
    *,
    gap_target: float = 0.0,
    keep_previous_on_stall: bool = True,
    max_moves: int | None = None,
) -> IntArray:
    """Move one row at a time from the slowest predicted slot to the fastest.

    Stops when the gap (slowest minus fastest) is at most `gap_target`, when it stops
    shrinking (returning the partition before the non-improving move, as EdgeDI does),
    or when the slowest slot is down to one row.
    """
    counts = counts.copy()
    active = problem.fleet.enabled[order] & (counts > 0)
    height = int(counts.sum())
    limit = max_moves if max_moves is not None else 2 * height
    previous_gap = np.inf
    previous = counts.copy()
    for _ in range(limit):
        times = independent_times(problem, block, order, counts)
        slow = int(np.argmax(np.where(active, times, -np.inf)))
        fast = int(np.argmin(np.where(active, times, np.inf)))
        gap = float(times[slow] - times[fast])
        if gap <= gap_target or slow == fast:
            return counts
        if gap >= previous_gap or counts[slow] <= 1:
            return previous if keep_previous_on_stall else counts
        previous_gap = gap
        previous = counts.copy()
        counts[slow] -= 1
        counts[fast] += 1
    return counts


def unit_blocks(problem: PlanningProblem) -> IntArray:
    """Block numbers of the one-unit blocks `u..u`."""
    return np.array([problem.table.block(u, u) for u in range(problem.units)], dtype=np.int64)


def per_unit_choices(
    problem: PlanningProblem, weights: FloatArray, order: IntArray | None = None
) -> list[SegmentChoice]:
    """One segment per spatial unit, rows ∝ `weights` (units, slots) in slot `order`."""
    order = problem.canonical_order() if order is None else order
    blocks = unit_blocks(problem)
    usable = problem.fleet.enabled[order].astype(np.float64)
    counts = proportional_counts(weights * usable[None, :], problem.table.height[blocks])
    return [choice_from_counts(problem, u, u, order, counts[u]) for u in range(problem.units)]
