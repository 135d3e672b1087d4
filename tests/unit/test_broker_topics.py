"""The topic catalogue: formatting, parsing, consistency rules, and the reference page."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgedi.broker.errors import DecodeError, UnexpectedKind, UnknownTopic
from edgedi.broker.ids import ID_PATTERN
from edgedi.broker.messages import (
    DeviceState,
    JobResult,
    RebirthRequest,
    WireMessage,
    encode,
    message_kinds,
)
from edgedi.broker.tensors import Tensor
from edgedi.broker.topics import (
    CATALOGUE,
    DEVICE_BIRTH,
    DEVICE_STATE,
    DEVICE_TASKS,
    JOB_RESULT,
    PLANNER_LEADER,
    TopicRoot,
    decode_for_topic,
    parse_topic,
    publication,
    render_markdown,
)

ROOT = Path(__file__).resolve().parents[2]
topic_levels = st.from_regex(ID_PATTERN, fullmatch=True)


@settings(max_examples=40, deadline=None)
@given(
    prefix=st.lists(topic_levels, min_size=1, max_size=3),
    cluster=topic_levels,
    values=st.lists(topic_levels, min_size=2, max_size=2),
    index=st.integers(0, len(CATALOGUE) - 1),
)
def test_format_then_parse_round_trips(
    prefix: list[str], cluster: str, values: list[str], index: int
) -> None:
    root = TopicRoot(prefix="/".join(prefix), cluster=cluster)
    spec = CATALOGUE[index]
    parameters = dict(zip(spec.parameters, values, strict=False))
    topic = spec.topic(root, **parameters)
    parsed = parse_topic(root, topic)
    assert parsed.spec is spec
    assert dict(parsed.parameters) == parameters
    assert parsed.topic == topic


def test_topics_and_filters_look_as_documented() -> None:
    root = TopicRoot()
    assert DEVICE_BIRTH.topic(root, device="pi-1") == "edgedi/v1/default/devices/pi-1/birth"
    assert DEVICE_BIRTH.filter(root) == "edgedi/v1/default/devices/+/birth"
    assert DEVICE_TASKS.filter(root, device="pi-2") == "edgedi/v1/default/devices/pi-2/tasks"
    assert JOB_RESULT.topic(TopicRoot("plant/a", "line-3"), job_id="j1", device="pi-1") == (
        "plant/a/line-3/results/j1/pi-1"
    )
    assert JOB_RESULT.filter(TopicRoot(), job_id="j1") == "edgedi/v1/default/results/j1/+"
    assert PLANNER_LEADER.topic(root) == "edgedi/v1/default/planner/leader"


@pytest.mark.parametrize("value", ["", "a/b", "+", "#", "$SYS", "a b", "é", "x" * 200])
def test_unsafe_parameters_are_refused(value: str) -> None:
    with pytest.raises(UnknownTopic):
        DEVICE_BIRTH.topic(TopicRoot(), device=value)


def test_missing_or_unknown_parameters_are_refused() -> None:
    with pytest.raises(UnknownTopic):
        DEVICE_BIRTH.topic(TopicRoot())
    with pytest.raises(UnknownTopic):
        DEVICE_BIRTH.topic(TopicRoot(), device="a", job_id="b")


@pytest.mark.parametrize(
    ("prefix", "cluster"), [("", "c"), ("a//b", "c"), ("a/+", "c"), ("$SYS", "c"), ("a", "c/d")]
)
def test_bad_roots_are_refused(prefix: str, cluster: str) -> None:
    with pytest.raises(UnknownTopic):
        TopicRoot(prefix=prefix, cluster=cluster)


@pytest.mark.parametrize(
    "topic",
    [
        "edgedi/v1/other/devices/pi-1/birth",  # another cluster
        "edgedi/v1/default/devices/pi-1/unknown",
        "edgedi/v1/default/devices/pi-1/birth/extra",
        "edgedi/v1/default/devices/pi 1/birth",
        "edgedi/v1/default",
        "$SYS/broker/uptime",
    ],
)
def test_foreign_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(UnknownTopic):
        parse_topic(TopicRoot(), topic)


def test_catalogue_rules() -> None:
    names = [spec.name for spec in CATALOGUE]
    patterns = [spec.pattern for spec in CATALOGUE]
    assert len(set(names)) == len(names)
    assert len(set(patterns)) == len(patterns)
    carried = [kind for spec in CATALOGUE for kind in spec.kinds]
    # Every kind travels on exactly one topic, but for gate partials: to the leader on
    # the relayed path, from their device to every device on the direct one; and job
    # results, whose last one is also kept on a fixed topic for dashboards.
    travelling = [kind.model_fields["kind"].default for kind in carried]
    travelling.remove("reduction_partial")
    travelling.remove("job_result")
    assert sorted(travelling) == sorted(message_kinds())
    for spec in CATALOGUE:
        tensor_fields = [
            name
            for kind in spec.kinds
            for name, field in kind.model_fields.items()
            if field.annotation is Tensor
        ]
        if spec.retain:  # retained state outlives its owner; tensors must never be retained
            assert not tensor_fields, spec.name
            assert spec.qos == 1, spec.name
        if tensor_fields:
            assert spec.encoding == "msgpack", spec.name


def _state(device: str = "pi-1") -> DeviceState:
    return DeviceState(sender=device, device=device, session=1, status="online")


def test_decode_for_topic_checks_payload_against_topic() -> None:
    root = TopicRoot()
    parsed = parse_topic(root, DEVICE_STATE.topic(root, device="pi-1"))
    state = _state()
    assert decode_for_topic(parsed, encode(state)) == state
    with pytest.raises(DecodeError, match="topic says"):
        decode_for_topic(parsed, encode(_state("pi-2")))
    with pytest.raises(UnexpectedKind):
        decode_for_topic(parsed, encode(RebirthRequest(sender="pi-1")))


def test_publication_carries_the_topic_settings() -> None:
    root = TopicRoot(cluster="c")
    item = publication(root, DEVICE_STATE, _state(), device="pi-1")
    assert item.topic == "edgedi/v1/c/devices/pi-1/state"
    assert (item.qos, item.retain) == (1, True)
    with pytest.raises(UnexpectedKind):
        publication(root, DEVICE_BIRTH, _state(), device="pi-1")
    with pytest.raises(ValueError, match="topic says"):
        publication(root, DEVICE_STATE, _state(), device="pi-9")
    result: WireMessage = JobResult(sender="leader", job_id="j-1", status="error", error="boom")
    assert publication(root, JOB_RESULT, result, job_id="j-1", device="leader").retain is False


def test_a_message_is_refused_on_a_topic_of_another_sender() -> None:
    # Every topic a device writes names it; the sender must be that device.
    root = TopicRoot()
    writers = [spec for spec in CATALOGUE if spec.sender_parameter is not None]
    assert {spec.name for spec in writers} >= {"job_tiles", "job_partials", "job_result"}
    forged = JobResult(sender="mallory", job_id="j-1", status="error", error="x")
    parsed = parse_topic(root, JOB_RESULT.topic(root, job_id="j-1", device="leader"))
    with pytest.raises(DecodeError, match="sent by 'mallory'"):
        decode_for_topic(parsed, encode(forged))
    state = _state().model_copy(update={"sender": "mallory"})
    with pytest.raises(DecodeError, match="sent by 'mallory'"):
        decode_for_topic(parse_topic(root, DEVICE_STATE.topic(root, device="pi-1")), encode(state))
    with pytest.raises(ValueError, match="sent by 'mallory'"):
        publication(root, JOB_RESULT, forged, job_id="j-1", device="leader")


def test_topic_reference_page_is_up_to_date() -> None:
    page = ROOT / "docs" / "topics.md"
    assert page.read_text() == render_markdown(), (
        "docs/topics.md is stale: run `.venv/bin/python -m edgedi.broker.topics docs/topics.md`"
    )
