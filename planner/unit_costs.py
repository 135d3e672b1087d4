"""Per-unit compute models fitted from tiles a device really ran.

`edgedi.models.calibration` times tiles of each spatial unit alone at a few row
counts on the device itself; here each unit gets `seconds ≈ a·MACs + b` by the
same non-negative, relative-error least squares as the micro-benchmark profile
(`fit_time_model`). The MACs of a sample are the planner's own count for that
tile (`BlockTable.tile_macs`), so the planner prices a fused tile — the sum of its
ops at the rows each computes, halo included — in exactly the terms it was fitted
in. The per-tile overhead `b` is spread evenly over the unit's ops, because the
planner charges a fixed cost per op invocation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Protocol

from edgedi.models.units import ModelSpec, Unit, channel_splittable
from edgedi.planner.blocks import block_table
from edgedi.planner.errors import ProfileError
from edgedi.planner.profiles import TimeModel, UnitTimes, fit_time_model

__all__ = [
    "ChannelSampleLike",
    "UnitSampleLike",
    "centred_rows",
    "channel_tile_macs",
    "fit_channel_times",
    "fit_unit_times",
]


class UnitSampleLike(Protocol):
    """A tile of spatial unit `unit` alone, `rows` output rows high, took `seconds`."""

    @property
    def unit(self) -> int: ...

    @property
    def rows(self) -> int: ...

    @property
    def seconds(self) -> float: ...


class ChannelSampleLike(Protocol):
    """A channel tile of spatial unit `unit` alone, `channels` hidden channels, took
    `seconds` (`edgedi.models.calibration`)."""

    @property
    def unit(self) -> int: ...

    @property
    def channels(self) -> int: ...

    @property
    def seconds(self) -> float: ...


def channel_tile_macs(unit: Unit, share: float) -> float:
    """MACs of a channel tile of `unit` computing `share` of its hidden channels: that
    share of the two convolutions, and the whole shortcut."""
    main = sum(op.macs() for op in unit.main)
    return share * main + sum(op.macs() for op in unit.shortcut or ())


def fit_channel_times(
    spec: ModelSpec, samples: Iterable[ChannelSampleLike]
) -> tuple[TimeModel | None, ...]:
    """Per spatial unit, `seconds ≈ a·MACs + b` of a channel tile (one fixed cost per
    tile); None for units without samples (not split by channels)."""
    grouped: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    spatial = spec.spatial_units
    for sample in samples:
        if not 0 <= sample.unit < len(spatial) or not channel_splittable(spatial[sample.unit]):
            raise ProfileError(f"{spec.name}: unit {sample.unit} has no channel tiles")
        unit = spatial[sample.unit]
        width = unit.main[0].out_channels
        if not 0 < sample.channels <= width:
            raise ProfileError(f"unit {sample.unit}: {sample.channels} channels of {width}")
        grouped[sample.unit][0].append(channel_tile_macs(unit, sample.channels / width))
        grouped[sample.unit][1].append(float(sample.seconds))
    return tuple(
        fit_time_model(*grouped[index]) if index in grouped else None
        for index in range(len(spatial))
    )


def centred_rows(height: int, rows: int) -> tuple[int, int]:
    """The output rows of a calibration tile: `rows` rows in the middle of the map."""
    start = (height - rows) // 2
    return start, start + rows


def fit_unit_times(
    spec: ModelSpec,
    samples: Iterable[UnitSampleLike],
    tail_s: float = 0.0,
    copy_s_per_byte: float = 0.0,
) -> UnitTimes:
    """One time model per spatial unit of `spec` (every unit needs a sample)."""
    table = block_table(spec)
    grouped: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    units = table.units
    for sample in samples:
        if not 0 <= sample.unit < units:
            raise ProfileError(f"{spec.name} has no spatial unit {sample.unit}")
        block = table.block(sample.unit, sample.unit)
        height = int(table.height[block])
        if not 0 < sample.rows <= height:
            raise ProfileError(f"unit {sample.unit}: {sample.rows} rows of {height}")
        start, stop = centred_rows(height, sample.rows)
        macs = sum(table.tile_macs(block, start, stop).values())
        grouped[sample.unit][0].append(float(macs))
        grouped[sample.unit][1].append(float(sample.seconds))
    missing = [u for u in range(units) if u not in grouped]
    if missing:
        raise ProfileError(f"{spec.name}: no samples for units {missing}")
    models: list[TimeModel] = []
    for unit in range(units):
        fitted = fit_time_model(*grouped[unit])
        ops = float(table.count[table.block(unit, unit)].sum())
        models.append(
            TimeModel(
                seconds_per_mac=fitted.seconds_per_mac,
                seconds_fixed=fitted.seconds_fixed / max(ops, 1.0),
            )
        )
    return UnitTimes(
        digest=table.digest,
        units=tuple(models),
        tail_s=max(0.0, tail_s),
        copy_s_per_byte=max(0.0, copy_s_per_byte),
    )
