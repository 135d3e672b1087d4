"""The Plan: what the leader's planner decides and every agent executes.

Published retained on `plans/current`. A plan names the fusion segments (runs of
consecutive spatial units, `first_unit..last_unit` inclusive), for each segment the
output rows (and optionally columns, for grid tiles) each device computes, where the
segment's output is gathered (`sink`), and the planner's predicted time of each step.
The tail (global pooling and head) runs on `tail_device`. In `images` mode there are no
segments: whole images are dispatched to devices by `images` shares.

Wire rules: frozen, `extra="forbid"`, strict scalars (no "3" for 3), containers accept
JSON/msgpack arrays, an explicit `kind` tag and a schema `version`. A plan is checked
on construction: its segments follow each other from unit 0, its parts name its
devices, every segment but the last is gathered on the leader (which scatters the
next one) and the last on the tail device, and every output element of every segment
is computed exactly once.
This module is torch-free and imports nothing else of ours.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

SCHEMA_VERSION: Literal[1] = 1

Count = Annotated[int, Strict(), Field(ge=0)]
Seconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Interval = Annotated[tuple[Count, Count], Field(strict=False)]
DeviceId = Annotated[str, Field(min_length=1, max_length=200)]


class PlanError(ValueError):
    """A plan is inconsistent (coverage, unit order, unknown device)."""


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Part(_Wire):
    """One tile of a segment: the output block one device computes."""

    device: DeviceId
    rows: Interval = Field(description="output rows [start, stop) of the segment's last unit")
    cols: Interval | None = Field(
        default=None, description="output columns [start, stop); null: the full width"
    )
    channels: Interval | None = Field(
        default=None,
        description="channel tile: the hidden channels [start, stop) it computes from the "
        "whole input map (every tile then holds the whole output; `rows` are the ones it "
        "sends on); null: a row (or grid) tile",
    )
    compute_s: Seconds = Field(default=0.0, description="predicted compute time of this tile")
    bytes_in: Count = Field(default=0, description="predicted input bytes (halo included)")
    bytes_out: Count = Field(default=0, description="predicted output bytes")

    @model_validator(mode="after")
    def _intervals(self) -> Part:
        for name, interval in (("rows", self.rows), ("cols", self.cols)):
            if interval is not None and interval[1] < interval[0]:
                raise PlanError(f"{name} {list(interval)}: stop before start")
        return self

    @property
    def empty(self) -> bool:
        empty_cols = self.cols is not None and self.cols[1] <= self.cols[0]
        return self.rows[1] <= self.rows[0] or empty_cols


class StepTimes(_Wire):
    """Predicted critical path of a segment; the four steps add up to `total_s`.

    scatter: until the last input tile has arrived; reductions: from the last partial
    sum being ready to the last gate vector arriving, summed over rounds; gather: from
    the last tile finishing to the last output arriving at the sink; compute: the rest.
    """

    scatter_s: Seconds = 0.0
    compute_s: Seconds = 0.0
    reductions_s: Seconds = 0.0
    gather_s: Seconds = 0.0
    total_s: Seconds = 0.0


class Segment(_Wire):
    """Consecutive spatial units fused: devices exchange data only at its ends."""

    first_unit: Count
    last_unit: Count
    out_height: Annotated[int, Strict(), Field(gt=0)]
    out_width: Annotated[int, Strict(), Field(gt=0)]
    reductions: Count = Field(default=0, description="gate rounds inside the segment")
    sink: DeviceId = Field(description="device that gathers the segment's output")
    parts: Annotated[tuple[Part, ...], Field(strict=False, min_length=1)]
    predicted: StepTimes = StepTimes()

    @model_validator(mode="after")
    def _units(self) -> Segment:
        if self.last_unit < self.first_unit:
            raise PlanError(f"segment units {self.first_unit}..{self.last_unit} are reversed")
        return self

    @property
    def channel_split(self) -> bool:
        """The parts split the hidden channels (`Part.channels`), not the map."""
        return any(part.channels is not None for part in self.parts)

    def check_coverage(self) -> None:
        """Raise PlanError unless the parts cover the output exactly once."""
        parts = [p for p in self.parts if not p.empty]
        where = f"segment {self.first_unit}..{self.last_unit}"
        if self.channel_split:
            self._check_channels(where)
        for part in parts:
            if part.rows[1] > self.out_height:
                raise PlanError(f"{where}: rows {list(part.rows)} beyond {self.out_height}")
            if part.cols is not None and part.cols[1] > self.out_width:
                raise PlanError(f"{where}: cols {list(part.cols)} beyond {self.out_width}")
        if all(p.cols is None or p.cols == (0, self.out_width) for p in parts):
            cursor = 0
            for part in sorted(parts, key=lambda p: p.rows):
                if part.rows[0] != cursor:
                    problem = "overlap" if part.rows[0] < cursor else "gap"
                    raise PlanError(f"{where}: {problem} at row {min(cursor, part.rows[0])}")
                cursor = part.rows[1]
            if cursor != self.out_height:
                raise PlanError(f"{where}: rows {cursor}..{self.out_height} not covered")
            return
        # Grid tiles: between consecutive row edges, the tiles spanning that band must
        # tile the columns exactly; every band together then covers each element once.
        edges = sorted({0, self.out_height, *(e for p in parts for e in p.rows)})
        for top, bottom in itertools.pairwise(edges):
            spans = sorted(
                (p.cols or (0, self.out_width))
                for p in parts
                if p.rows[0] <= top and bottom <= p.rows[1]
            )
            cursor = 0
            for start, stop in spans:
                if start != cursor:
                    problem = "overlap" if start < cursor else "gap"
                    raise PlanError(
                        f"{where}: {problem} in rows {top}..{bottom} at column {min(cursor, start)}"
                    )
                cursor = stop
            if cursor != self.out_width:
                raise PlanError(f"{where}: rows {top}..{bottom}, columns {cursor}.. not covered")

    def _check_channels(self, where: str) -> None:
        """Channel parts: row strips with non-empty rows, channels contiguous from 0."""
        if any(p.channels is None or p.cols is not None or p.empty for p in self.parts):
            raise PlanError(
                f"{where}: a channel split needs every part to name channels and non-empty "
                "full-width rows"
            )
        cursor = 0
        for part in sorted(self.parts, key=lambda p: p.rows):
            assert part.channels is not None
            start, stop = part.channels
            if start != cursor or stop < start:
                raise PlanError(f"{where}: channel parts do not continue from {cursor}")
            cursor = stop


class ImageShare(_Wire):
    """Whole-image dispatch: the fraction of images one device takes."""

    device: DeviceId
    share: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    latency_s: Seconds = Field(default=0.0, description="predicted latency of one image")


class Plan(_Wire):
    """A complete execution plan for one model on a set of devices."""

    kind: Literal["plan"] = "plan"
    version: Literal[1] = SCHEMA_VERSION
    plan_id: Annotated[str, Field(min_length=1, max_length=100)]
    epoch: Count = Field(description="epoch of the leader that made the plan")
    strategy: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    model_digest: Annotated[str, Field(min_length=1)]
    input_shape: Annotated[tuple[Count, Count, Count], Field(strict=False)]
    created_at: Seconds = Field(description="unix time the plan was made")
    leader: DeviceId = Field(description="coordinator: scatters, combines gates, gathers")
    devices: Annotated[tuple[DeviceId, ...], Field(strict=False, min_length=1)]
    mode: Literal["rows", "images"]
    segments: Annotated[tuple[Segment, ...], Field(strict=False)] = ()
    tail_device: DeviceId
    tail_s: Seconds = 0.0
    images: Annotated[tuple[ImageShare, ...], Field(strict=False)] = ()
    predicted_latency_s: Seconds
    predicted_throughput: Seconds = Field(default=0.0, description="images per second")
    predicted_bytes: Count = 0

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        known = set(self.devices)
        if len(known) != len(self.devices):
            raise PlanError("devices are listed twice")
        named = {self.leader, self.tail_device}
        named |= {p.device for s in self.segments for p in s.parts}
        named |= {s.sink for s in self.segments}
        named |= {i.device for i in self.images}
        unknown = sorted(named - known)
        if unknown:
            raise PlanError(f"plan names devices it does not list: {', '.join(unknown)}")
        if self.mode == "rows":
            if not self.segments or self.images:
                raise PlanError("a rows plan has segments and no image shares")
            expected = 0
            for segment in self.segments:
                if segment.first_unit != expected:
                    raise PlanError(
                        f"segment starts at unit {segment.first_unit}, expected {expected}"
                    )
                expected = segment.last_unit + 1
            # The leader scatters every segment, so it gathers every one but the last,
            # which ends where the tail runs.
            for segment in self.segments[:-1]:
                if segment.sink != self.leader:
                    raise PlanError(f"segment {segment.first_unit}..: gathered off the leader")
            if self.segments[-1].sink != self.tail_device:
                raise PlanError("the last segment must be gathered on the tail device")
        else:
            if self.segments or not self.images:
                raise PlanError("an images plan has image shares and no segments")
            if abs(sum(i.share for i in self.images) - 1.0) > 1e-6:
                raise PlanError("image shares must add up to 1")
        self.check_coverage()
        return self

    def check_coverage(self) -> None:
        """Raise PlanError unless every output row of every segment is computed once."""
        for segment in self.segments:
            segment.check_coverage()

    @property
    def devices_used(self) -> tuple[str, ...]:
        used = {p.device for s in self.segments for p in s.parts if not p.empty}
        used |= {i.device for i in self.images if i.share > 0}
        used.add(self.tail_device)
        return tuple(d for d in self.devices if d in used)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        return cls.model_validate_json(text)

    def to_wire(self) -> dict[str, Any]:
        """Plain dict of str/int/float/list/None: ready for msgpack or json."""
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Plan:
        return cls.model_validate(dict(data))

    def summary(self) -> dict[str, Any]:
        """A small readable digest (logs, CLI)."""
        return {
            "plan_id": self.plan_id,
            "strategy": self.strategy,
            "model": self.model,
            "mode": self.mode,
            "segments": len(self.segments),
            "devices": list(self.devices_used),
            "latency_ms": round(self.predicted_latency_s * 1000, 3),
            "bytes": self.predicted_bytes,
        }


def dumps(plan: Plan) -> str:
    """Compact JSON text of a plan (the retained `plans/current` payload)."""
    return json.dumps(plan.to_wire(), separators=(",", ":"))
