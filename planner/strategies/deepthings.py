"""`deepthings`: DeepThings' fused tile partitioning (FTP) on an N×M grid.

DeepThings (Zhao et al., IEEE TCAD 2018) fuses the early layers, where maps are big
and weights small, cuts their output into an N×M grid of tiles, traces each tile's
input region back through the fused layers (overlapping halos, computed redundantly),
and lets the devices pull tiles from a gateway (work stealing). The remaining layers
run on one device. Here the fused depth and the grid (up to 5×5, DeepThings' range)
are chosen by predicted latency; work stealing is emulated by list scheduling (each
tile, in order, goes to the device predicted to finish it first, queue included); the
rest runs on the best single device, which also runs the tail. Fused blocks that hold
an attention gate use row strips only (a grid cannot share a reduction exactly).
"""

from __future__ import annotations

import numpy as np

from edgedi.models.units import split_rows
from edgedi.planner.cost import message_parts
from edgedi.planner.partition import whole_on
from edgedi.planner.problem import PlanningProblem, SegmentChoice
from edgedi.planner.strategies.base import Decision, Strategy, register
from edgedi.planner.timing import Tile, TileCosts, evaluate_tiles


@register
class DeepThings(Strategy):
    name = "deepthings"
    summary = "DeepThings FTP: N×M grid over the fused early layers, the rest on one device"

    def __init__(self, max_grid: int = 5) -> None:
        self.max_grid = max_grid

    def _schedule(
        self, problem: PlanningProblem, costs: TileCosts, cells: list[Tile], distinct: bool
    ) -> tuple[list[Tile], tuple[list[float], list[float], list[float]]]:
        fleet = problem.fleet
        leader = fleet.leader
        net = problem.network
        up_free = 0.0
        cpu_free = np.zeros(fleet.size)
        allowed = fleet.enabled.copy()
        tiles, seconds, sizes_in, sizes_out = [], [], [], []
        is_leader = np.arange(fleet.size) == leader
        for cell in cells:
            macs, size_in, size_out = costs.work(cell)
            compute = costs.seconds(macs)
            pre, hold, post = message_parts(
                size_in + net.message_overhead_bytes + 0.0 * compute,
                fleet.bandwidth[leader],
                fleet.latency[leader],
                fleet.bandwidth,
                fleet.latency,
                net,
                "sender",
            )
            sent = np.maximum(pre, up_free) + hold
            arrival = np.where(is_leader, 0.0, sent + post)
            finish = np.maximum(arrival, cpu_free) + compute
            device = int(np.argmin(np.where(allowed, finish, np.inf)))
            if device != leader:
                up_free = float(sent[device])
            cpu_free[device] = finish[device]
            if distinct:
                allowed[device] = False
            tiles.append(Tile(device, cell.rows, cell.cols))
            seconds.append(float(compute[device]))
            sizes_in.append(size_in)
            sizes_out.append(size_out)
        return tiles, (seconds, sizes_in, sizes_out)

    def decide(self, problem: PlanningProblem) -> Decision:
        table, fleet = problem.table, problem.fleet
        n = problem.units
        leader = fleet.leader
        rests = np.array([table.block(d, n - 1) for d in range(1, n)], dtype=np.int64)
        rest_costs = problem.final_single_costs(rests) if len(rests) else np.zeros((0, fleet.size))
        usable = int(fleet.enabled.sum())
        best: tuple[float, list[SegmentChoice], int] | None = None
        for depth in range(1, n + 1):
            block = table.block(0, depth - 1)
            height, width = int(table.height[block]), int(table.width[block])
            gates = int(table.gates[block])
            costs = TileCosts(table, fleet, 0, depth - 1)
            if depth < n:
                rest_device = int(np.argmin(rest_costs[depth - 1]))
                after = float(rest_costs[depth - 1, rest_device])
            else:
                rest_device, after = leader, float(fleet.tail[leader])
            for grid_rows in range(1, self.max_grid + 1):
                for grid_cols in range(1, self.max_grid + 1):
                    tiles_count = grid_rows * grid_cols
                    if tiles_count < 2 or grid_rows > height or grid_cols > width:
                        continue
                    if gates and (grid_cols > 1 or tiles_count > usable):
                        continue
                    row_parts = split_rows(height, [1.0] * grid_rows)
                    col_parts = split_rows(width, [1.0] * grid_cols)
                    cells = [
                        Tile(
                            leader, (r.start, r.stop), None if grid_cols == 1 else (c.start, c.stop)
                        )
                        for r in row_parts
                        for c in col_parts
                    ]
                    tiles, work = self._schedule(problem, costs, cells, distinct=bool(gates))
                    timing = evaluate_tiles(table, fleet, 0, depth - 1, tiles, leader, work)
                    total = timing.makespan + after
                    if best is None or total < best[0]:
                        choices = [SegmentChoice(0, depth - 1, tuple(tiles), leader)]
                        tail = problem.final_sink(rest_device)
                        if depth < n:
                            choices.append(whole_on(problem, depth, n - 1, rest_device, sink=tail))
                        best = (total, choices, tail)
        if best is None:  # a map too small for any grid: nothing to fuse
            whole = problem.final_single_costs(np.array([table.block(0, n - 1)]))[0]
            device = int(np.argmin(whole))
            sink = problem.final_sink(device)
            return [whole_on(problem, 0, n - 1, device, sink=sink)], sink
        return best[1], best[2]
