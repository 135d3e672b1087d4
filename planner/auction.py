"""AWAS: an auction that assigns workload partitions to the devices that match them.

Two markets, as in the EdgeCI paper's scheme, made concrete for row partitions:

1. *Clearing the workload* (prices iterate until stable). The leader announces a price:
   a completion time T. Each device bids the number of rows it can finish by T, from
   its own bid curve `finish ≈ f + p · rows` — `p` its marginal seconds per row
   (compute plus the row's bytes over its link), `f` its fixed part (latencies, per-op
   overheads, the halo, and the wait in the leader's queue). T is the price at which
   the bids cover the map exactly (a water-filling, closed form). Devices whose fixed
   part exceeds T bid nothing: too slow or too far to help. The partition is priced
   exactly, each device's `f` is re-read from the result, and the market clears again
   until the partition stops changing; the best partition seen wins.
2. *Assigning the partitions* (partitions go to the best bids). With the row intervals
   fixed, every device bids for every partition its predicted completion time there,
   halo and transfer (and its place in the leader's send queue) included; a forward
   auction (Bertsekas: the partitions bid for devices, prices rise by the bid margin
   plus ε) finds the assignment. The rows are then re-cleared for that assignment, and
   the two steps repeat while the predicted makespan improves.

`clear` runs on many blocks at once (the DP prices every block with it); `assign` and
`polish` run on the blocks the DP finally chose.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from edgedi.planner.cost import message_parts
from edgedi.planner.partition import round_counts
from edgedi.planner.problem import PlanningProblem
from edgedi.planner.timing import FloatArray, IntArray, RowsTiming

_HUGE = 1e30


def bid_curves(
    problem: PlanningProblem, blocks: IntArray, order: IntArray
) -> tuple[FloatArray, FloatArray]:
    """A priori bid curves (f, p), (B, K), for slots in `order` (B, K) or (K,)."""
    table, fleet = problem.table, problem.fleet
    net = problem.network
    leader = fleet.leader
    if order.ndim == 1:
        order = np.broadcast_to(order, (len(blocks), len(order)))
    height = table.height[blocks].astype(np.float64)
    compute = problem.block_compute(blocks)  # (B, D)
    per_row = np.take_along_axis(compute, order, axis=1) / height[:, None]
    full_in = (table.in_stop[blocks, table.height[blocks]] - table.in_start[blocks, 0]) * (
        table.in_row_bytes[blocks]
    )
    bytes_per_row = (full_in / height + table.out_row_bytes[blocks])[:, None]
    _pre, hold, _post = message_parts(
        bytes_per_row + 0.0 * per_row,
        fleet.bandwidth[leader],
        fleet.latency[leader],
        fleet.bandwidth[order],
        fleet.latency[order],
        net,
        "sender",
    )
    remote = order != leader
    p = per_row + np.where(remote, hold, 0.0)
    one_way = fleet.latency[leader] + fleet.latency[order] + net.broker_per_message_s
    overheads = table.full_count[blocks] @ fleet.fixed.T
    gates = table.gates[blocks][:, None]
    f = np.take_along_axis(overheads, order, axis=1) + np.where(
        remote, 2 * one_way * (1 + gates), 0.0
    )
    usable = fleet.enabled[order]
    return np.where(usable, f, _HUGE), np.where(usable, p, np.inf)


def clearing_counts(f: FloatArray, p: FloatArray, height: IntArray) -> IntArray:
    """Rows per slot at the clearing price: Σ max(0, (T - f)/p) = height, then rounded."""
    usable = np.isfinite(p) & (f < _HUGE)
    inverse = np.where(usable, 1.0 / np.maximum(p, 1e-15), 0.0)
    fixed = np.where(usable, f, _HUGE)
    by_fixed = np.argsort(fixed, axis=1, kind="stable")
    fs = np.take_along_axis(fixed, by_fixed, axis=1)
    inv = np.take_along_axis(inverse, by_fixed, axis=1)
    weight = np.cumsum(inv, axis=1)
    weighted = np.cumsum(np.where(inv > 0, fs * inv, 0.0), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        price = (height[:, None] + weighted) / weight
    valid = (inv > 0) & (fs < price)
    count = valid.shape[1]
    last_valid = count - 1 - np.argmax(valid[:, ::-1], axis=1)
    last_valid = np.where(valid.any(axis=1), last_valid, 0)
    clearing = price[np.arange(len(height)), last_valid]
    with np.errstate(invalid="ignore"):
        amounts = np.where(usable, np.maximum(clearing[:, None] - fixed, 0.0) * inverse, 0.0)
    amounts = np.where(np.isfinite(amounts), amounts, 0.0)
    total = amounts.sum(axis=1, keepdims=True)
    # Numerical safety: rescale to the exact height before rounding.
    amounts = np.where(total > 0, amounts * (height[:, None] / np.where(total > 0, total, 1)), 0)
    return round_counts(amounts, height)


def clear(
    problem: PlanningProblem,
    blocks: IntArray,
    order: IntArray,
    sinks: IntArray,
    start: IntArray,
    iterations: int = 6,
) -> tuple[IntArray, FloatArray]:
    """Best counts (B, K) and makespans (B,) over `start` and the clearing rounds.

    Blocks whose partition stops changing drop out of the batch.
    """
    timing: RowsTiming = problem.evaluate_counts(blocks, order, start, sinks)
    best_counts = start.copy()
    best_span = timing.makespan.copy()
    counts = start.copy()
    done = timing.done.copy()
    f, p = bid_curves(problem, blocks, order)
    finite = np.isfinite(p)
    height = problem.table.height[blocks]
    active = np.arange(len(blocks))
    for _ in range(iterations):
        seen = (counts[active] > 0) & finite[active]
        rows_cost = np.where(finite[active], p[active], 0.0) * counts[active]
        f[active] = np.where(seen, done[active] - rows_cost, f[active])
        new_counts = clearing_counts(f[active], p[active], height[active])
        changed = np.any(new_counts != counts[active], axis=1)
        active, new_counts = active[changed], new_counts[changed]
        if len(active) == 0:
            break
        timing = problem.evaluate_counts(blocks[active], order, new_counts, sinks[active])
        counts[active] = new_counts
        done[active] = timing.done
        better = timing.makespan < best_span[active]
        best_counts[active[better]] = new_counts[better]
        best_span[active[better]] = timing.makespan[better]
    return best_counts, best_span


def auction_assign(benefit: FloatArray, epsilon: float) -> IntArray:
    """Forward auction: each row (a partition) gets a distinct column (a device).

    Maximises the total benefit within `rows × epsilon`. Partitions bid for devices: an
    unassigned partition takes the device with the best net value (benefit minus
    price) and raises its price by its margin over its second choice plus ε, evicting
    the previous holder. ε starts large and shrinks (ε-scaling), keeping the prices, so
    near-identical devices do not start a long price war. Needs rows <= columns.
    """
    rows, columns = benefit.shape
    if rows > columns:
        raise ValueError("more partitions than devices")
    real = benefit[benefit > -_HUGE / 10]
    spread = float(real.max() - real.min()) if real.size else 1.0
    step = max(spread / 4, epsilon)
    prices = np.zeros(columns)
    assigned = np.full(rows, -1, dtype=np.int64)
    while True:
        owner = np.full(columns, -1, dtype=np.int64)
        assigned[:] = -1
        waiting = deque(range(rows))
        bids = 0
        while waiting and bids < 50 * rows * columns:
            bids += 1
            row = waiting.popleft()
            values = benefit[row] - prices
            best = int(np.argmax(values))
            if columns > 1:
                best_value = values[best]
                values[best] = -np.inf
                second = float(values.max())
            else:
                best_value = second = float(values[best])
            prices[best] += float(best_value) - second + step
            if owner[best] >= 0:
                assigned[owner[best]] = -1
                waiting.append(int(owner[best]))
            owner[best] = row
            assigned[row] = best
        if step <= epsilon:
            return assigned
        step = max(step / 8, epsilon)


def slot_bids(
    problem: PlanningProblem, block: int, order: IntArray, counts: IntArray
) -> FloatArray:
    """(S, D): predicted completion of each non-empty slot's rows on each device.

    A device taking slot s waits in the leader's send queue behind the slots before s,
    receives the slot's input (halo included), computes it phase by phase (each gate
    round costs a round trip) and sends the output back.
    """
    table, fleet = problem.table, problem.fleet
    net = problem.network
    leader = fleet.leader
    overhead = float(net.message_overhead_bytes)
    stops = np.cumsum(counts)
    starts = stops - counts
    live = np.nonzero(counts > 0)[0]
    s, e = starts[live], stops[live]
    gates = int(table.gates[block])
    macs = np.zeros((len(live), len(table.classes)))
    for q in range(gates + 1):
        macs += table.stop_sum[block, q][e] - table.start_sum[block, q][s]
        macs += table.fixed[block, q][None, :]
    compute = macs @ fleet.rate.T + (table.count[block].sum(axis=0) @ fleet.fixed.T)[None, :]
    bytes_in = (table.in_stop[block, e] - table.in_start[block, s]) * table.in_row_bytes[block]
    bytes_out = (e - s) * table.out_row_bytes[block]
    d_bw, d_lat = fleet.bandwidth[None, :], fleet.latency[None, :]
    pre, hold, post = message_parts(
        bytes_in[:, None] + overhead + 0.0 * compute,
        fleet.bandwidth[leader],
        fleet.latency[leader],
        d_bw,
        d_lat,
        net,
        "sender",
    )
    holders = order[live]
    held = np.where(holders != leader, hold[np.arange(len(live)), holders], 0.0)
    queue = np.concatenate([[0.0], np.cumsum(held)[:-1]])[:, None]
    is_leader = (np.arange(fleet.size) == leader)[None, :]
    arrive = np.where(is_leader, 0.0, queue + pre + hold + post)
    back_pre, back_hold, back_post = message_parts(
        bytes_out[:, None] + overhead + 0.0 * compute,
        d_bw,
        d_lat,
        fleet.bandwidth[leader],
        fleet.latency[leader],
        net,
        "receiver",
    )
    back = np.where(is_leader, 0.0, back_pre + back_hold + back_post)
    one_way = fleet.latency[leader] + fleet.latency + net.broker_per_message_s
    rounds = np.where(is_leader, 0.0, gates * 2 * one_way[None, :]) if len(live) > 1 else 0.0
    bids = arrive + compute + back + rounds
    result: FloatArray = np.where(fleet.enabled[None, :], bids, _HUGE)
    return result


def assign(
    problem: PlanningProblem,
    block: int,
    order: IntArray,
    counts: IntArray,
    sink: int,
    rounds: int = 2,
    clearing_rounds: int = 3,
) -> tuple[IntArray, IntArray, float]:
    """Auction the partitions, re-clear the rows, repeat while the makespan improves."""
    blocks = np.array([block])
    sinks = np.array([sink])
    best_order, best_counts = order, counts
    best_span = float(problem.evaluate_counts(blocks, order, counts[None, :], sinks).makespan[0])
    for _ in range(rounds):
        live = np.nonzero(best_counts > 0)[0]
        if len(live) == 0:
            break
        bids = slot_bids(problem, block, best_order, best_counts)
        epsilon = max(best_span, 1e-9) * 1e-4 / len(live)
        winners = auction_assign(-bids, epsilon)
        if np.any(winners < 0):
            break
        taken = set(int(w) for w in winners)
        rest = [int(d) for d in best_order if int(d) not in taken]
        new_order = np.array([*(int(w) for w in winners), *rest], dtype=np.int64)
        new_counts = np.array(
            [*(int(best_counts[k]) for k in live), *([0] * len(rest))], dtype=np.int64
        )
        if np.array_equal(new_order[: len(live)], best_order[live]):
            break
        counts_b, span_b = clear(
            problem, blocks, new_order, sinks, new_counts[None, :], clearing_rounds
        )
        span = float(span_b[0])
        if span >= best_span:
            break
        best_order, best_counts, best_span = new_order, counts_b[0], span
    return best_order, best_counts, best_span


def polish(
    problem: PlanningProblem,
    block: int,
    order: IntArray,
    counts: IntArray,
    sink: int,
    steps: int = 40,
) -> tuple[IntArray, float]:
    """Steepest descent: move one row off the bottleneck slot while that helps."""
    blocks_one = np.array([block])
    sinks_one = np.array([sink])
    timing = problem.evaluate_counts(blocks_one, order, counts[None, :], sinks_one)
    best_span = float(timing.makespan[0])
    usable = problem.fleet.enabled[order]
    others = np.nonzero(usable)[0]
    for _ in range(steps):
        done = np.where(counts > 0, timing.done[0], -np.inf)
        worst = int(np.argmax(done))
        targets = others[others != worst]
        if counts[worst] == 0 or len(targets) == 0:
            break
        candidates = np.repeat(counts[None, :], len(targets), axis=0)
        candidates[:, worst] -= 1
        candidates[np.arange(len(targets)), targets] += 1
        trial = problem.evaluate_counts(
            np.full(len(targets), block), order, candidates, np.full(len(targets), sink)
        )
        pick = int(np.argmin(trial.makespan))
        span = float(trial.makespan[pick])
        if span >= best_span - 1e-12:
            break
        counts = candidates[pick]
        best_span = span
        timing = problem.evaluate_counts(blocks_one, order, counts[None, :], sinks_one)
    return counts, best_span
