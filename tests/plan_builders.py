"""A one-tile plan for tests of messages and exploration (imported by name: tests/ is
on the path through its conftest, as role_templates is)."""

from __future__ import annotations

from typing import Any

from edgedi.broker.plan import Part, Plan, Segment


def one_tile_plan(**fields: Any) -> Plan:
    """Units 0-2 of a 10×10 map, all on pi-1; `fields` override the plan's own."""
    segment = Segment(
        first_unit=0,
        last_unit=2,
        out_height=10,
        out_width=10,
        sink="pi-1",
        parts=(Part(device="pi-1", rows=(0, 10)),),
    )
    defaults: dict[str, Any] = {
        "plan_id": "plan-1",
        "epoch": 1,
        "strategy": "equal",
        "model": "tiny",
        "model_digest": "abc",
        "input_shape": (1, 40, 40),
        "created_at": 1700000000.0,
        "leader": "pi-1",
        "devices": ("pi-1",),
        "mode": "rows",
        "segments": (segment,),
        "tail_device": "pi-1",
        "predicted_latency_s": 0.05,
    }
    return Plan(**{**defaults, **fields})
