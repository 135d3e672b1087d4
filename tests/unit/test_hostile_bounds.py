"""Bounded decoding: a hostile message is refused before anything walks all of it.

Issue 12: ten ~3 MB maps of 200,000 made-up keys stalled every agent's loop for
seconds, because the validator reported each key. Now every topic has a payload
bound checked before parsing, msgpack refuses an oversized container from its
header, an item budget stops a message of many small containers part way, and the
parsed value's nesting and sizes are checked before any schema validation. Each
case below is refused on the receive path a live agent uses, by a structural
check (never by the validator), for every topic that could carry it.
"""

from __future__ import annotations

import json

import msgpack
import pytest
from test_hostile_wire import PARAMETERS, VALID, assert_refused, case_of, document, payload_of

from edgedi.agent.loop_lag import LoopLag
from edgedi.broker.errors import DecodeError, PayloadTooLarge
from edgedi.broker.messages import decode
from edgedi.broker.tensors import DEFAULT_LIMITS, Limits, check_structure, unpack
from edgedi.broker.topics import CATALOGUE, TopicRoot, TopicSpec, publication

LIMITS = DEFAULT_LIMITS


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def _bloated(spec: TopicSpec, extra: dict[str, object]) -> bytes:
    kind = spec.kinds[0].model_fields["kind"].default
    return payload_of(spec, {**document(kind), **extra})


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda spec: spec.name)
async def test_two_hundred_thousand_extra_keys_are_refused_before_validation(
    spec: TopicSpec,
) -> None:
    payload = _bloated(spec, {f"k{number}": number for number in range(200_000)})
    error = await assert_refused(spec, payload)
    # Refused by a bound, not by the validator (whose message starts "invalid <kind>").
    assert not str(error).startswith("invalid"), error
    if spec.max_payload_bytes is not None and len(payload) > spec.max_payload_bytes:
        assert isinstance(error, PayloadTooLarge)
        assert str(spec.max_payload_bytes) in str(error)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({f"k{number}": number for number in range(LIMITS.max_map_keys + 1)}, "map"),
        ({"a": list(range(LIMITS.max_array_items + 1))}, "array"),
        ({"a": [[1, 2, 3, 4]] * (LIMITS.max_items // 4)}, "items"),
        ({"a": [{"b": 1}] * LIMITS.max_items}, "items"),
        ({"a": _nested(LIMITS.max_depth)}, "deeper"),
        ({"a": "x" * (LIMITS.max_string_bytes + 1)}, "string"),
    ],
    ids=["map", "array", "many-arrays", "many-maps", "deep", "string"],
)
@pytest.mark.parametrize("kind", ["job_submit", "tile_result", "device_birth", "job_result"])
async def test_every_structural_bound_refuses_before_validation(
    value: dict[str, object], reason: str, kind: str
) -> None:
    spec, _ = case_of(kind)
    payload = payload_of(spec, {**document(kind), **value})
    if spec.max_payload_bytes is not None and len(payload) > spec.max_payload_bytes:
        error = await assert_refused(spec, payload)
        assert isinstance(error, PayloadTooLarge)
        return
    error = await assert_refused(spec, payload)
    assert isinstance(error, DecodeError)
    assert not str(error).startswith("invalid"), error
    if reason != "string" or spec.encoding == "json":
        assert reason in str(error) or "max_" in str(error), error


def test_the_item_budget_stops_msgpack_part_way() -> None:
    limits = Limits(max_items=1000)
    payload = msgpack.packb([[0, 0]] * 16_000)
    with pytest.raises(DecodeError, match="more than 1000 items"):
        unpack(payload, limits)


def test_every_valid_message_is_within_the_bounds() -> None:
    for kind, message in VALID.items():
        spec, _ = case_of(kind)
        parameters = {name: PARAMETERS[name] for name in spec.parameters}
        item = publication(TopicRoot(), spec, message, **parameters)
        assert decode(item.payload, spec.kinds) == message, kind
        if spec.encoding == "json":
            check_structure(json.loads(item.payload))


def test_a_sender_cannot_publish_over_its_topics_bound() -> None:
    spec, _ = case_of("job_result")
    assert spec.max_payload_bytes is not None
    count = spec.max_payload_bytes // 10
    result = VALID["job_result"].model_copy(update={"probabilities": (0.123456789,) * count})
    with pytest.raises(PayloadTooLarge, match="job_result"):
        publication(TopicRoot(), spec, result, job_id="job-1", device="pi-1")


def test_loop_lag_holds_the_membership_clock_back_by_recent_stalls() -> None:
    now = [100.0]
    behind: list[float | None] = [None]
    lag = LoopLag(4.0, period_s=0.05, behind_since=lambda: behind[0], clock=lambda: now[0])
    assert lag.judged() == 100.0
    lag.record(0.01, at=100.0)  # scheduling noise
    assert lag.judged() == 100.0
    lag.record(2.5, at=101.0)
    now[0] = 102.0
    assert lag.judged() == pytest.approx(99.5)
    now[0] = 106.0  # the stall has left the window
    assert lag.judged() == 106.0
    behind[0] = 105.2  # messages wait unread since then
    assert lag.judged() == 105.2
    assert lag.worst_s == 2.5


async def test_loop_lag_counts_a_stall_it_has_not_woken_to_record() -> None:
    import asyncio
    import time

    lag = LoopLag(4.0, period_s=0.01)
    task = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # noqa: ASYNC251 - the stall under test
        # This coroutine runs before the measuring task has woken up again.
        assert time.monotonic() - lag.judged() >= 0.25
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
