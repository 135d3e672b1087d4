"""The Plan wire schema: round trips, strictness, and the coverage check."""

from __future__ import annotations

import json
import random
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from test_planner_fixtures import random_cluster, random_network, random_spec

from edgedi.broker.plan import Part, Plan, PlanError, Segment, dumps
from edgedi.planner.strategies import get_strategy, strategy_names


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 100_000), name=st.sampled_from(strategy_names()))
def test_plan_round_trips_through_json_and_msgpack(seed: int, name: str) -> None:
    rng = random.Random(seed)
    spec = random_spec(rng, rng.randint(1, 6))
    cluster = random_cluster(rng, rng.randint(1, 5))
    plan = get_strategy(name).plan(spec, cluster, network=random_network(rng), epoch=seed)
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(dumps(plan)) == plan
    wire = plan.to_wire()
    assert Plan.from_wire(wire) == plan
    packed = msgpack.packb(wire, use_bin_type=True)
    assert Plan.from_wire(msgpack.unpackb(packed, raw=False)) == plan


def _plan(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kind": "plan",
        "version": 1,
        "plan_id": "p1",
        "epoch": 3,
        "strategy": "edgeci",
        "model": "m",
        "model_digest": "abc",
        "input_shape": [1, 8, 8],
        "created_at": 1.0,
        "leader": "a",
        "devices": ["a", "b"],
        "mode": "rows",
        "segments": [
            {
                "first_unit": 0,
                "last_unit": 1,
                "out_height": 8,
                "out_width": 8,
                "sink": "a",
                "parts": [{"device": "a", "rows": [0, 5]}, {"device": "b", "rows": [5, 8]}],
            }
        ],
        "tail_device": "a",
        "predicted_latency_s": 0.5,
    }
    base.update(changes)
    return base


def _with_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    segment = {**_plan()["segments"][0], "parts": parts}
    return _plan(segments=[segment])


def test_a_valid_plan_and_its_summary() -> None:
    plan = Plan.model_validate(_plan())
    assert plan.devices_used == ("a", "b")
    assert plan.summary()["segments"] == 1
    assert json.loads(plan.to_json())["kind"] == "plan"


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([{"device": "a", "rows": [0, 4]}, {"device": "b", "rows": [5, 8]}], "gap"),
        ([{"device": "a", "rows": [0, 6]}, {"device": "b", "rows": [5, 8]}], "overlap"),
        ([{"device": "a", "rows": [0, 5]}], "not covered"),
        ([{"device": "a", "rows": [0, 9]}], "beyond"),
        (
            [
                {"device": "a", "rows": [0, 8], "cols": [0, 4]},
                {"device": "b", "rows": [0, 4], "cols": [4, 8]},
            ],
            "not covered",
        ),
        (
            [
                {"device": "a", "rows": [0, 8], "cols": [0, 5]},
                {"device": "b", "rows": [0, 8], "cols": [4, 8]},
            ],
            "overlap",
        ),
        ([{"device": "a", "rows": [5, 3]}], "stop before start"),
    ],
)
def test_coverage_errors(parts: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Plan.model_validate(_with_parts(parts))


def test_grid_tiles_that_cover_exactly_are_fine() -> None:
    parts = [
        {"device": "a", "rows": [0, 4], "cols": [0, 3]},
        {"device": "b", "rows": [0, 4], "cols": [3, 8]},
        {"device": "a", "rows": [4, 8], "cols": [0, 6]},
        {"device": "b", "rows": [4, 8], "cols": [6, 8]},
        {"device": "b", "rows": [4, 4]},
    ]
    plan = Plan.model_validate(_with_parts(parts))
    plan.check_coverage()
    segment = plan.segments[0]
    bad = segment.model_copy(update={"parts": (*segment.parts[:3], segment.parts[0])})
    with pytest.raises(PlanError):
        bad.check_coverage()


@pytest.mark.parametrize(
    "changes",
    [
        {"extra": 1},
        {"kind": "task"},
        {"version": 2},
        {"epoch": "3"},
        {"epoch": -1},
        {"predicted_latency_s": float("nan")},
        {"devices": ["a", "a"]},
        {"leader": "z"},
        {"mode": "images"},
        {"segments": []},
        {"input_shape": [1, 8]},
    ],
)
def test_malformed_plans_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Plan.model_validate(_plan(**changes))


def test_segments_must_follow_each_other() -> None:
    first = _plan()["segments"][0]
    second = {**first, "first_unit": 3, "last_unit": 3}
    with pytest.raises(ValidationError, match="expected 2"):
        Plan.model_validate(_plan(segments=[first, second]))


def test_sinks_are_the_leader_then_the_tail_device() -> None:
    first = _plan()["segments"][0]
    second = {**first, "first_unit": 2, "last_unit": 2, "sink": "b"}
    assert Plan.model_validate(_plan(segments=[first, second], tail_device="b"))
    with pytest.raises(ValidationError, match="tail device"):
        Plan.model_validate(_plan(segments=[first, second]))
    with pytest.raises(ValidationError, match="off the leader"):
        Plan.model_validate(_plan(segments=[{**first, "sink": "b"}, second], tail_device="b"))


def test_images_plans() -> None:
    images = [{"device": "a", "share": 0.25}, {"device": "b", "share": 0.75}]
    plan = Plan.model_validate(_plan(mode="images", segments=[], images=images))
    assert plan.devices_used == ("a", "b")
    with pytest.raises(ValidationError, match="add up"):
        Plan.model_validate(_plan(mode="images", segments=[], images=images[:1]))


def test_parts_are_frozen() -> None:
    part = Part(device="a", rows=(0, 1))
    with pytest.raises(ValidationError):
        setattr(part, "device", "b")  # noqa: B010  (frozen: must raise)
    assert Segment.model_fields["parts"].is_required()


def _channel_segment(*parts: tuple[tuple[int, int], tuple[int, int] | None]) -> Segment:
    return Segment(
        first_unit=0,
        last_unit=0,
        out_height=4,
        out_width=4,
        sink="a",
        parts=tuple(
            Part(device=d, rows=rows, channels=channels)
            for d, (rows, channels) in zip("ab", parts, strict=False)
        ),
    )


def test_channel_parts_must_continue_from_zero_on_every_part() -> None:
    good = _channel_segment(((0, 2), (0, 10)), ((2, 4), (10, 16)))
    good.check_coverage()
    assert good.channel_split
    for parts, problem in (
        ((((0, 2), (0, 10)), ((2, 4), (11, 16))), "channel parts do not continue"),
        ((((0, 2), (1, 10)), ((2, 4), (10, 16))), "channel parts do not continue"),
        ((((0, 2), (0, 10)), ((2, 4), None)), "every part to name channels"),
        ((((0, 2), (0, 10)), ((2, 2), (10, 16))), "non-empty"),
    ):
        with pytest.raises(PlanError, match=problem):
            _channel_segment(*parts).check_coverage()
