"""What tiles of each unit really cost on this device: the planner's compute model.

Micro-benchmarks of single ops (`edgedi.models.profiling`) miss what the runtime adds
around them: a strip's poorer cache use, the per-op overhead that dominates small
maps, the crop and padding of each op, converting the output for the wire. So each
device also times *real tiles*, through the same `run_tile` the worker runs: for
every spatial unit, a tile of that unit alone at a few row counts (one row, a
quarter and half of the map, the whole map), and the tail (global pooling and head). The
planner fits `seconds ≈ a·MACs + b` per unit from these (`fit_unit_times`), so a
fused segment's tile is priced as the sum of its units' costs at the rows each
unit really computes (halo included).

Gates run in `local` mode here: the same arithmetic as `exact`, without waiting
for other tiles. Units that can be split by channels (`models/channel_split.py`)
are also timed as channel tiles on the whole map at a quarter and half of their
hidden channels: small convolutions over a few channels run at another efficiency
than row strips, and the planner must not price one with the other's fit.
Blocking: run it on the compute thread.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from edgedi.models.channel_split import run_channel_tile
from edgedi.models.tiling import GatePartial, run_tail, run_tile
from edgedi.models.units import Rows, Unit, channel_splittable, segment_tiles
from edgedi.models.zoo import ZooModel

__all__ = [
    "SUSTAIN_WINDOW_S",
    "ChannelTiming",
    "ModelTiming",
    "TileTiming",
    "channel_counts",
    "row_counts",
    "time_model_tiles",
]

SUSTAIN_WINDOW_S = 0.03
_COPY_ELEMENTS = 1 << 20  # 4 MiB of float32: a mid-sized feature map
"""Each timing sample runs at least this long (several 5 ms CPU-quota periods)."""


@dataclass(frozen=True)
class TileTiming:
    """A tile of unit `unit` alone with `rows` output rows took `seconds` (median)."""

    unit: int
    rows: int
    seconds: float


@dataclass(frozen=True)
class ChannelTiming:
    """A channel tile of unit `unit` alone with `channels` hidden channels took `seconds`."""

    unit: int
    channels: int
    seconds: float


@dataclass(frozen=True)
class ModelTiming:
    tiles: tuple[TileTiming, ...]
    tail_seconds: float
    """The tail (pooling and head) from the last spatial unit's output."""
    copy_seconds_per_byte: float = 0.0
    """Converting a tile's input or output (numpy ↔ torch, wire layout), per byte."""
    channel_tiles: tuple[ChannelTiming, ...] = ()
    """Channel tiles of the units that can be split by channels."""


def channel_counts(width: int) -> tuple[int, ...]:
    """The hidden-channel shares timed for a unit `width` channels wide."""
    return tuple(sorted({max(1, width // 4), max(1, width // 2)}))


def row_counts(height: int) -> tuple[int, ...]:
    """The tile heights timed for a unit whose output has `height` rows."""
    return tuple(sorted({1, max(1, math.ceil(height / 4)), max(1, height // 2), height}))


def _median_seconds(
    run: Callable[[], object],
    repeats: int,
    window_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median over `repeats` samples of the *sustained* seconds per run.

    Each sample runs back to back for at least `window_s` and divides: a device
    that bursts faster than it can sustain (a CPU quota refills every few
    milliseconds, a board throttles when hot) is priced at what it sustains,
    which is what a busy device running a job's tiles gets. `clock` is the wall clock,
    or the thread's CPU clock where the device's time is paced by it (agent.pacing).
    """
    started = clock()
    run()  # warm-up: allocations, first-call dispatch
    estimate = max(clock() - started, 1e-6)
    count = max(1, math.ceil(window_s / estimate))
    times = []
    for _ in range(repeats):
        started = clock()
        for _ in range(count):
            run()
        times.append((clock() - started) / count)
    return statistics.median(times)


def _drive(runner: object) -> torch.Tensor:
    """Run a tile generator to its end (local gates never yield, but be safe; a
    channel tile's partial comes back as if it were the sum)."""
    assert hasattr(runner, "send")
    try:
        step = next(runner)  # type: ignore[call-overload]
        while True:
            assert isinstance(step, GatePartial)
            value = step.sums if step.reduce == "sum" else step.sums / max(1, step.count)
            step = runner.send(value)
    except StopIteration as done:
        output: torch.Tensor = done.value
        return output


def _run_channel_tile(
    model: ZooModel, unit: Unit, share: Rows, whole: torch.Tensor, out: Rows
) -> torch.Tensor:
    return _drive(run_channel_tile(model, [unit], share, whole, out))


def time_model_tiles(
    model: ZooModel,
    repeats: int = 3,
    window_s: float = SUSTAIN_WINDOW_S,
    clock: Callable[[], float] = time.perf_counter,
) -> ModelTiming:
    """Time every spatial unit's tiles and the tail of `model` (blocking), by `clock`."""

    def median(run: Callable[[], object]) -> float:
        return _median_seconds(run, repeats, window_s, clock)

    spec = model.spec
    generator = torch.Generator().manual_seed(0)
    tiles = []
    last_output: torch.Tensor | None = None
    with torch.inference_mode():
        for index, unit in enumerate(spec.spatial_units):
            height = unit.out_shape[1]
            for rows in row_counts(height):
                start = (height - rows) // 2
                parts = [Rows(0, start), Rows(start, start + rows), Rows(start + rows, height)]
                geometry = segment_tiles([unit], parts)[1]
                channels, _, width = unit.in_shape
                shape = (1, channels, len(geometry.in_rows), width)
                array = torch.randn(shape, generator=generator).numpy()

                x = torch.from_numpy(array)

                def run(x: torch.Tensor = x, geometry: object = geometry) -> object:
                    # The unit's own work: a fused tile converts its input and output
                    # once, not per unit (`copy_seconds_per_byte` prices that).
                    return _drive(run_tile(model, geometry, x, gate_mode="local"))  # type: ignore[arg-type]

                tiles.append(TileTiming(index, rows, median(run)))
        channel_tiles = []
        for index, unit in enumerate(spec.spatial_units):
            if not channel_splittable(unit):
                continue
            whole = torch.randn((1, *unit.in_shape), generator=generator)
            out = Rows(0, unit.out_shape[1])
            for count in channel_counts(unit.main[0].out_channels):
                run_share = functools.partial(
                    _run_channel_tile, model, unit, Rows(0, count), whole, out
                )
                seconds = median(run_share)
                channel_tiles.append(ChannelTiming(index, count, seconds))
        last = spec.spatial_units[-1]
        last_output = torch.randn((1, *last.out_shape), generator=generator)
        first_tail = len(spec.spatial_units)
        tail = spec.tail_units
        if tail and tail[0].kind == "gap":
            pooled = last_output.double().mean(dim=(2, 3)).numpy()
            tail_s = median(lambda: run_tail(model, first_tail, pooled=pooled))
        elif tail:
            map_ = last_output
            tail_s = median(lambda: run_tail(model, first_tail, map_))
        else:
            tail_s = 0.0
        block = np.ones(_COPY_ELEMENTS, dtype=np.float32)

        def copy() -> object:
            # What the worker does with a tile's input and output: a float32 copy each.
            return np.ascontiguousarray(torch.from_numpy(block.copy()).numpy())

        copy_s = median(copy) / (2 * block.nbytes)
    return ModelTiming(tuple(tiles), tail_s, copy_s, tuple(channel_tiles))
