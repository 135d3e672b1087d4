"""Hostile bytes on every topic: refused by the receive path with a clear, bounded reason.

Every payload goes through the path a live agent uses, `MqttSession._dispatch`, fed an
`aiomqtt.Message` (aiomqtt's own class) on a concrete topic of each catalogue entry
(every entry is subscribed by an agent, the leader or a client). A refused payload
must reach no handler, count as `dropped_malformed`, and be logged once with the
error's type and a message that says what was wrong; the same payload through
`decode_for_topic` raises only a documented `ProtocolError`. Structurally valid
messages are then broken one field at a time: version, kind, a field's value, a
tensor's dtype, shape, size or data.
"""

from __future__ import annotations

import json
import logging
import math
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiomqtt
import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from plan_builders import one_tile_plan

from edgedi.agent.election import Election, LeaderClaim
from edgedi.broker.connection import MqttSession, Received, SessionSettings
from edgedi.broker.errors import (
    DecodeError,
    PayloadTooLarge,
    ProtocolError,
    SchemaVersionError,
    TensorError,
    UnexpectedKind,
)
from edgedi.broker.messages import (
    SCHEMA_VERSION,
    WIRE_INT_MAX,
    CancelJob,
    DeviceBirth,
    DeviceCapabilities,
    DeviceState,
    GateValue,
    Heartbeat,
    JobResult,
    JobSubmit,
    LeaderRecord,
    LinkEstimate,
    LinkProbe,
    PlanAnnouncement,
    RebirthRequest,
    ReductionPartial,
    TileFailed,
    TileResult,
    TileRows,
    TileTask,
    TileTaskBatch,
    TileTrace,
    TraceSpan,
    WireMessage,
    decode,
    encode,
    message_kinds,
)
from edgedi.broker.plan import Plan
from edgedi.broker.tensors import Limits, Tensor
from edgedi.broker.topics import (
    CATALOGUE,
    DEVICE_BIRTH,
    JOB_RESULT,
    TopicRoot,
    TopicSpec,
    decode_for_topic,
)
from edgedi.broker.topics import parse_topic as parse

ROOT = TopicRoot(prefix="test", cluster="hostile")
PARAMETERS = {"device": "pi-1", "job_id": "job-1", "target": "pi-2"}
DOCUMENTED = (DecodeError, SchemaVersionError, UnexpectedKind, PayloadTooLarge, TensorError)
# A refusal is one log line: bounded whatever the payload quoted.
MAX_LOG_LINE = 2500
FUZZ = settings(max_examples=120, deadline=None)


def topic_of(spec: TopicSpec) -> str:
    return spec.topic(ROOT, **{name: PARAMETERS[name] for name in spec.parameters})


def _plan() -> Plan:
    return one_tile_plan(epoch=3)


def valid_messages() -> dict[str, WireMessage]:
    """One valid message of every kind, agreeing with the topic parameters above."""
    rows = Tensor(np.linspace(-1, 1, 2 * 4 * 5, dtype=np.float32).reshape(1, 2, 4, 5))
    tile = {"job_id": "job-1", "epoch": 3, "segment": 0, "tile": 0, "device": "pi-1"}
    common = {"sender": "pi-1"}
    messages: list[WireMessage] = [
        DeviceBirth(
            **common,
            device="pi-1",
            session=5,
            candidate=True,
            capabilities=DeviceCapabilities(
                cores=4,
                memory_bytes=2**30,
                machine="Linux-aarch64",
                software_version="0.1.0",
                models=("tiny",),
            ),
            profile={"conv3x3": (1e-9, 1e-5)},
            link=LinkEstimate(bandwidth_bytes_per_second=1e7, latency_seconds=0.001),
        ),
        DeviceState(**common, device="pi-1", session=5, status="online"),
        Heartbeat(**common, device="pi-1", session=5, sequence=1, load=0.5, busy_tiles=0),
        LeaderRecord(**common, device="pi-1", epoch=3, session=5),
        PlanAnnouncement(**common, epoch=3, plan=_plan()),
        RebirthRequest(**common, reason="test"),
        JobResult(**common, job_id="job-1", status="ok", probabilities=(0.25, 0.75)),
        JobSubmit(
            **common,
            job_id="job-1",
            model="tiny",
            image=Tensor(np.zeros((1, 8, 8), dtype=np.uint8)),
            client="cam-1",
            submitted_at=1700000000.0,
        ),
        TileTask(
            **common,
            job_id="job-1",
            epoch=3,
            plan_id="plan-1",
            device="pi-1",
            model="tiny",
            model_digest="abc",
            input_size=48,
            segment=0,
            first_unit=0,
            last_unit=1,
            row_parts=((0, 4),),
            tile=0,
            input_rows=(0, 4),
            output_rows=(0, 4),
            tensor=rows,
            deadline=time.time() + 60,
        ),
        CancelJob(**common, job_id="job-1", epoch=3, reason="test"),
        ReductionPartial(**common, **tile, gate=0, sums=Tensor(np.ones((1, 3))), positions=4),
        GateValue(
            **common,
            job_id="job-1",
            epoch=3,
            segment=0,
            gate=0,
            vector=Tensor(np.ones((1, 3), dtype=np.float32)),
        ),
        TileResult(**common, **tile, output_rows=(0, 4), tensor=rows, compute_seconds=0.01),
        TileRows(**common, **tile, rows=(0, 4), tensor=rows),
        LinkProbe(**common, device="pi-1", probe=1, padding=b"0123"),
        TileFailed(**common, **tile, reason="test"),
        TileTrace(**common, **tile, spans=(TraceSpan(what="compute", start=1.0, end=2.0),)),
    ]
    valid = {message.kind: message for message in messages}
    task = valid["tile_task"]
    assert isinstance(task, TileTask)
    valid["tile_task_batch"] = TileTaskBatch(
        **common, job_id="job-1", epoch=3, device="pi-1", tasks=(task,)
    )
    return valid


VALID = valid_messages()
# (spec, kind) for every kind every topic carries.
TOPIC_KINDS = [(spec, cls.model_fields["kind"].default) for spec in CATALOGUE for cls in spec.kinds]


def case_of(kind: str) -> tuple[TopicSpec, str]:
    return next(case for case in TOPIC_KINDS if case[1] == kind)


TENSOR_FIELDS = [
    (spec, kind, name)
    for spec, kind in TOPIC_KINDS
    for name, field in type(VALID[kind]).model_fields.items()
    if field.annotation is Tensor
]


def document(kind: str) -> dict[str, Any]:
    """The valid message of `kind` as the plain map its encoding carries."""
    message = VALID[kind]
    if message.wire_encoding == "json":
        loaded: dict[str, Any] = json.loads(encode(message))
        return loaded
    unpacked: dict[str, Any] = msgpack.unpackb(encode(message))
    return unpacked


def payload_of(spec: TopicSpec, value: object) -> bytes:
    """`value` encoded the way `spec`'s topic carries messages."""
    if spec.encoding == "json":
        return json.dumps(value).encode()
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured_log() -> Iterator[list[logging.LogRecord]]:
    """The connection logger's records (per example: hypothesis reuses caplog otherwise)."""
    handler = _Records()
    logger = logging.getLogger("edgedi.broker.connection")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


async def deliver(
    spec: TopicSpec, payload: bytes, *, topic: str | None = None, limits: Limits | None = None
) -> tuple[MqttSession, list[Received], list[logging.LogRecord]]:
    """`payload` through a fresh session's receive path (fresh: logging is rate-limited)."""
    extra = {}
    if limits is not None:
        extra = {
            "max_payload_bytes": limits.max_payload_bytes,
            "max_tensor_elements": limits.max_elements,
        }
    session = MqttSession(SessionSettings(client_id="fuzz", **extra), ROOT)
    got: list[Received] = []

    async def handler(received: Received) -> None:
        got.append(received)

    await session.subscribe(spec, handler)
    message = aiomqtt.Message(
        topic or topic_of(spec), payload, qos=spec.qos, retain=False, mid=1, properties=None
    )
    with captured_log() as records:
        await session._dispatch(message)
    return session, got, records


def refusal(spec: TopicSpec, payload: bytes, limits: Limits | None = None) -> ProtocolError:
    """The error `decode_for_topic` raises for `payload`; fails if it accepts it."""
    parsed = parse(ROOT, topic_of(spec))
    with pytest.raises(ProtocolError) as caught:
        decode_for_topic(parsed, payload, limits or Limits())
    assert type(caught.value) in DOCUMENTED, repr(caught.value)
    return caught.value


async def assert_refused(
    spec: TopicSpec, payload: bytes, *, limits: Limits | None = None
) -> ProtocolError:
    """Refused both ways: the documented error, no handler call, one clear log line."""
    error = refusal(spec, payload, limits)
    session, got, records = await deliver(spec, payload, limits=limits)
    assert not got
    statistics = session.statistics
    assert (statistics.dropped_malformed, statistics.handled, statistics.handler_errors) == (
        1,
        0,
        0,
    )
    warnings = [record for record in records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert line == f"dropped malformed message on {topic_of(spec)}: {type(error).__name__}: {error}"
    assert str(error) and len(line) < MAX_LOG_LINE
    return error


# --- arbitrary and damaged bytes ---------------------------------------------------------


@FUZZ
@given(spec=st.sampled_from(CATALOGUE), payload=st.binary(min_size=1, max_size=300))
@example(spec=case_of("tile_task")[0], payload=b"\x91" * 3000 + b"\x00")  # nested too deep
@example(spec=case_of("tile_task")[0], payload=b"\xc1")  # no msgpack value starts with 0xc1
@example(spec=DEVICE_BIRTH, payload=b"[" * 100_000)
async def test_arbitrary_bytes_are_refused_on_every_topic(spec: TopicSpec, payload: bytes) -> None:
    error = await assert_refused(spec, payload)
    assert not str(error).endswith(": ")  # msgpack's empty messages are replaced


@st.composite
def damaged(draw: st.DrawFn) -> tuple[TopicSpec, bytes]:
    """A valid payload truncated, with a byte changed, or with bytes inserted."""
    spec, kind = draw(st.sampled_from(TOPIC_KINDS))
    payload = bytearray(encode(VALID[kind]))
    at = draw(st.integers(0, len(payload) - 1))
    how = draw(st.sampled_from(["truncate", "change", "insert"]))
    if how == "truncate":
        del payload[max(1, at) :]
    elif how == "change":
        payload[at] = draw(st.integers(0, 255).filter(lambda byte: byte != payload[at]))
    else:
        payload[at:at] = draw(st.binary(min_size=1, max_size=8))
    return spec, bytes(payload)


@FUZZ
@given(case=damaged())
async def test_damaged_payloads_are_delivered_intact_or_refused(
    case: tuple[TopicSpec, bytes],
) -> None:
    # A changed byte inside a float or a tensor's data still makes a valid message:
    # then it is delivered as decoded. Anything else is refused; nothing escapes.
    spec, payload = case
    try:
        decoded = decode_for_topic(parse(ROOT, topic_of(spec)), payload)
    except DOCUMENTED:
        await assert_refused(spec, payload)
        return
    session, got, _ = await deliver(spec, payload)
    assert [received.message for received in got] == [decoded]
    assert session.statistics.dropped_malformed == 0


# --- structurally valid maps with one thing wrong ------------------------------------------

plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


@FUZZ
@given(
    case=st.sampled_from(TOPIC_KINDS),
    version=plain_values.filter(lambda v: v != SCHEMA_VERSION or type(v) is not int),
)
@example(case=case_of("device_birth"), version=True)  # equal to 1 in Python: still wrong
@example(case=case_of("device_birth"), version=3.0)  # equal to 3: still wrong
@example(case=case_of("tile_task"), version=True)
@example(case=case_of("tile_task"), version=1)  # the format before the direct data plane
@example(case=case_of("tile_task"), version=2)  # the format before traces
@example(case=case_of("tile_task"), version="3")
async def test_a_wrong_schema_version_is_refused(
    case: tuple[TopicSpec, str], version: object
) -> None:
    spec, kind = case
    wire = document(kind)
    wire["version"] = version
    error = await assert_refused(spec, payload_of(spec, wire))
    assert isinstance(error, SchemaVersionError)
    assert "schema version" in str(error)


@FUZZ
@given(case=st.sampled_from(TOPIC_KINDS), drop=st.booleans())
async def test_a_missing_version_is_refused(case: tuple[TopicSpec, str], drop: bool) -> None:
    spec, kind = case
    wire = document(kind)
    if drop:
        del wire["version"]
    else:
        wire["version"] = None
    error = await assert_refused(spec, payload_of(spec, wire))
    assert isinstance(error, SchemaVersionError) and "None" in str(error)


@FUZZ
@given(
    case=st.sampled_from(TOPIC_KINDS),
    kind=plain_values | st.sampled_from(sorted(message_kinds())) | st.text(min_size=100),
)
async def test_an_unknown_or_misplaced_kind_is_refused(
    case: tuple[TopicSpec, str], kind: object
) -> None:
    spec, expected_kind = case
    carried = {cls.model_fields["kind"].default for cls in spec.kinds}
    if isinstance(kind, str) and kind in carried:
        return  # the right kind: not what this test is about
    wire = document(expected_kind)
    wire["kind"] = kind
    error = await assert_refused(spec, payload_of(spec, wire))
    assert isinstance(error, UnexpectedKind)
    if isinstance(kind, str) and kind in message_kinds():
        assert f"message kind {kind!r} is not expected here" in str(error)
    else:
        assert "unknown message kind" in str(error)


def _fields(kind: str) -> list[str]:
    return [name for name in document(kind) if name not in ("version", "kind")]


@st.composite
def one_field_replaced(draw: st.DrawFn) -> tuple[TopicSpec, str, str, object]:
    spec, kind = draw(st.sampled_from(TOPIC_KINDS))
    field = draw(st.sampled_from(_fields(kind)))
    hostile = plain_values
    if spec.encoding == "msgpack":  # msgpack also carries bin, NaN and infinities
        hostile = hostile | st.binary(max_size=16) | st.floats()
    return spec, kind, field, draw(hostile)


@FUZZ
@given(case=one_field_replaced())
@example(case=(*case_of("job_result"), "epoch", 2**70))  # JSON carries any int size
@example(case=(*case_of("leader"), "epoch", 10**400))
@example(case=(*case_of("leader"), "priority", -(10**30)))
@example(case=(*case_of("tile_task"), "row_parts", [[0, 2**64 - 1]]))
@example(case=(*case_of("tile_task"), "deadline", math.inf))
@example(case=(*case_of("tile_task"), "epoch", math.nan))
@example(case=(*case_of("device_birth"), "device", "pi-2"))  # not the topic's device
async def test_a_field_with_a_wrong_value_is_refused_naming_it(
    case: tuple[TopicSpec, str, str, object],
) -> None:
    spec, kind, field, value = case
    wire = document(kind)
    wire[field] = value
    payload = payload_of(spec, wire)
    try:
        decoded = decode_for_topic(parse(ROOT, topic_of(spec)), payload)
    except DOCUMENTED:
        error = await assert_refused(spec, payload)
        assert field in str(error), str(error)
        return
    # The value happened to be valid (say, a short text as a reason): whatever is
    # accepted must survive being sent on, as a leader re-sends epochs and ids.
    assert decode(encode(decoded), spec.kinds) == decoded


@FUZZ
@given(case=st.sampled_from(TOPIC_KINDS), data=st.data())
async def test_a_missing_or_extra_field_is_refused_naming_it(
    case: tuple[TopicSpec, str], data: st.DataObject
) -> None:
    spec, kind = case
    wire = document(kind)
    required = [
        name
        for name, info in type(VALID[kind]).model_fields.items()
        if info.is_required() and name in wire
    ]
    if data.draw(st.booleans(), label="drop a required field") and required:
        field = data.draw(st.sampled_from(required), label="field")
        del wire[field]
        error = await assert_refused(spec, payload_of(spec, wire))
        assert f"{field}: Field required" in str(error)
    else:
        field = data.draw(
            st.text(min_size=1, max_size=300).filter(lambda name: name not in wire), label="extra"
        )
        wire[field] = 1
        error = await assert_refused(spec, payload_of(spec, wire))
        assert "Extra inputs are not permitted" in str(error)
        assert field in str(error) or len(field) > 40  # a long name is quoted clipped


@FUZZ
@given(
    spec=st.sampled_from(CATALOGUE),
    value=st.one_of(
        st.lists(plain_values, max_size=3),
        st.integers(-(2**63), 2**64 - 1),
        st.text(max_size=10),
        st.none(),
    ),
)
async def test_a_payload_that_is_not_an_object_is_refused(spec: TopicSpec, value: object) -> None:
    error = await assert_refused(spec, payload_of(spec, value))
    assert isinstance(error, DecodeError)
    assert f"a message is a {spec.encoding} object, not" in str(error)


@pytest.mark.parametrize("case", TOPIC_KINDS, ids=lambda case: f"{case[0].name}-{case[1]}")
async def test_the_other_encoding_is_refused(case: tuple[TopicSpec, str]) -> None:
    spec, kind = case
    wire = document(kind)
    for key, value in list(wire.items()):
        if isinstance(value, dict) and spec.encoding == "msgpack":
            wire[key] = None  # tensors cannot travel in JSON; the check comes first anyway
    other = (
        msgpack.packb(wire, use_bin_type=True)
        if spec.encoding == "json"
        else json.dumps(wire, default=str).encode()
    )
    error = await assert_refused(spec, other)
    assert isinstance(error, DecodeError)
    assert "malformed" in str(error) or "object" in str(error)


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda spec: spec.name)
async def test_an_oversized_payload_is_refused_before_parsing(spec: TopicSpec) -> None:
    limits = Limits(max_payload_bytes=1024)
    kind = spec.kinds[0].model_fields["kind"].default
    wire = document(kind)
    wire["padding"] = "x" * 2000
    error = await assert_refused(spec, payload_of(spec, wire), limits=limits)
    assert isinstance(error, PayloadTooLarge) and "over the limit of 1024" in str(error)


# --- tensors -----------------------------------------------------------------------------


def _with_tensor(kind: str, field: str, tensor: object) -> dict[str, Any]:
    wire = document(kind)
    wire[field] = tensor
    return wire


@FUZZ
@given(
    case=st.sampled_from(TENSOR_FIELDS),
    dtype=st.one_of(
        st.sampled_from(
            ["complex64", "bool", "object", "int32", "uint16", "float128", "<f4", ">f4", "f4", ""]
        ),
        st.text(max_size=200),
        plain_values,
        st.binary(max_size=64),
    ),
)
async def test_a_tensor_dtype_outside_the_allow_list_is_refused(
    case: tuple[TopicSpec, str, str], dtype: object
) -> None:
    spec, kind, field = case
    if dtype in ("float32", "float16", "float64", "uint8", "int64"):
        return
    tensor = {"dtype": dtype, "shape": [2], "data": bytes(8)}
    error = await assert_refused(spec, payload_of(spec, _with_tensor(kind, field, tensor)))
    assert isinstance(error, TensorError)
    assert str(error).startswith(f"invalid {kind}: {field}: tensor dtype ")
    assert "is not one of float32, float16, float64, uint8, int64" in str(error)


_ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8, "uint8": 1, "int64": 8}


@FUZZ
@given(
    case=st.sampled_from(TENSOR_FIELDS),
    dtype=st.sampled_from(sorted(_ITEMSIZE)),
    shape=st.lists(st.integers(0, 6), max_size=4),
    length=st.integers(0, 2000),
)
async def test_a_tensor_whose_shape_disagrees_with_its_bytes_is_refused(
    case: tuple[TopicSpec, str, str], dtype: str, shape: list[int], length: int
) -> None:
    spec, kind, field = case
    needed = math.prod(shape) * _ITEMSIZE[dtype]
    if length == needed:
        length += 1
    tensor = {"dtype": dtype, "shape": shape, "data": bytes(length)}
    error = await assert_refused(spec, payload_of(spec, _with_tensor(kind, field, tensor)))
    assert isinstance(error, TensorError)
    assert f"{field}: tensor {dtype}{shape} needs {needed} bytes, data has {length}" in str(error)


huge_sizes = st.integers(min_value=2**24 + 1, max_value=2**64 - 1)
huge_shapes = st.one_of(
    st.lists(huge_sizes, min_size=1, max_size=8),
    st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=8).filter(
        lambda shape: math.prod(size for size in shape if size) > 2**24
    ),
)


@FUZZ
@given(case=st.sampled_from(TENSOR_FIELDS), shape=huge_shapes, data=st.binary(max_size=64))
@example(case=TENSOR_FIELDS[0], shape=[2**31, 2**31], data=b"")
@example(case=TENSOR_FIELDS[0], shape=[0, 2**63], data=b"")  # empty, past numpy's index range
@example(case=TENSOR_FIELDS[0], shape=[0, 2**40, 2**40], data=b"")
async def test_a_huge_declared_size_is_refused_before_any_allocation(
    case: tuple[TopicSpec, str, str], shape: list[int], data: bytes
) -> None:
    spec, kind, field = case
    tensor = {"dtype": "float32", "shape": shape, "data": data}
    error = await assert_refused(spec, payload_of(spec, _with_tensor(kind, field, tensor)))
    assert isinstance(error, PayloadTooLarge)
    assert "over the limit of 16777216" in str(error)
    assert str(error).startswith(f"invalid {kind}: {field}: ")


@pytest.mark.parametrize(
    "shape", [[2**31, 2**31], [2**64 - 1] * 8, [0, 2**63], [16777216, 2], [0] + [2**24] * 7]
)
def test_decoding_a_huge_declaration_allocates_nothing_like_it(shape: list[int]) -> None:
    spec, kind, field = TENSOR_FIELDS[0]
    payload = payload_of(
        spec, _with_tensor(kind, field, {"dtype": "float64", "shape": shape, "data": b""})
    )
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            decode(payload, spec.kinds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # the declaration is up to 2**70 bytes


@FUZZ
@given(
    case=st.sampled_from(TENSOR_FIELDS),
    dtype=st.sampled_from(["float32", "float16", "float64"]),
    values=st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.5]), min_size=1),
)
async def test_non_finite_tensors_pass_the_codec_as_documented(
    case: tuple[TopicSpec, str, str], dtype: str, values: list[float]
) -> None:
    # The codec carries NaN and infinities bit-exactly; consumers reject them where
    # inputs must be finite (see test_hostile_worker and test_hostile_coordinator).
    spec, kind, field = case
    array = np.array(values, dtype=dtype)
    wire = _with_tensor(
        kind, field, {"dtype": dtype, "shape": [len(values)], "data": array.tobytes()}
    )
    session, got, _ = await deliver(spec, payload_of(spec, wire))
    assert session.statistics.dropped_malformed == 0 and len(got) == 1
    tensor = getattr(got[0].message, field)
    assert tensor == Tensor(array)
    assert tensor.is_finite() == bool(np.isfinite(array).all())


# --- regressions of bugs found by the fuzzing above --------------------------------------


def test_integers_are_bounded_so_every_message_can_be_re_encoded() -> None:
    # A JSON leader record with a 2**70 epoch used to decode, and every msgpack task
    # citing that epoch then failed to pack (TypeError, outside the error tree).
    record = json.loads(encode(VALID["leader"]))
    for epoch in (2**70, 10**400, WIRE_INT_MAX + 1):
        record["epoch"] = epoch
        with pytest.raises(DecodeError, match="epoch: Input should be less than or equal to"):
            decode(json.dumps(record).encode(), (LeaderRecord,))
    record["epoch"] = WIRE_INT_MAX
    leader = decode(json.dumps(record).encode(), (LeaderRecord,))
    assert isinstance(leader, LeaderRecord)
    cancel = CancelJob(sender="pi-1", job_id="job-1", epoch=leader.epoch)
    assert decode(encode(cancel)) == cancel


def test_an_empty_tensor_with_a_huge_dimension_is_a_payload_error() -> None:
    # numpy refused the shape with a bare ValueError ("Maximum allowed dimension exceeded").
    with pytest.raises(PayloadTooLarge, match=r"empty tensor of shape \[0, 9223372036854775808\]"):
        Tensor.from_wire({"dtype": "float32", "shape": [0, 2**63], "data": b""})
    assert Tensor.from_wire({"dtype": "float32", "shape": [0, 5], "data": b""}).shape == (0, 5)


async def test_malformed_results_of_many_jobs_log_one_line() -> None:
    # The rate limiter was keyed by the topic's last level: on `results/+` (watch)
    # that is the sender's job id, one table entry per job, forever.
    session = MqttSession(SessionSettings(client_id="fuzz"), ROOT)

    async def handler(received: Received) -> None:
        raise AssertionError("a malformed result reached the handler")

    await session.subscribe(JOB_RESULT, handler)
    with captured_log() as records:
        for number in range(50):
            topic = JOB_RESULT.topic(ROOT, job_id=f"job-{number}", device="pi-1")
            await session._dispatch(
                aiomqtt.Message(topic, b"{}", qos=1, retain=False, mid=1, properties=None)
            )
    assert session.statistics.dropped_malformed == 50
    assert len([record for record in records if record.levelno >= logging.WARNING]) == 1


@settings(max_examples=30, deadline=None)
@given(
    case=st.sampled_from(TOPIC_KINDS),
    piece=st.text(min_size=1, max_size=4, alphabet="ab\"'\\\x00é"),
    repeat=st.integers(2000, 50_000),
)
async def test_huge_quoted_values_give_short_reasons(
    case: tuple[TopicSpec, str], piece: str, repeat: int
) -> None:
    spec, kind = case
    text = piece * repeat
    for field in ("kind", "version", text):
        wire = document(kind)
        wire[field] = text if field != text else 1
        await assert_refused(spec, payload_of(spec, wire))
    if spec.encoding == "msgpack" and any(f[1] == kind for f in TENSOR_FIELDS):
        field = next(f[2] for f in TENSOR_FIELDS if f[1] == kind)
        tensor = {"dtype": text, "shape": [1], "data": b"\x00"}
        await assert_refused(spec, payload_of(spec, _with_tensor(kind, field, tensor)))


def test_a_leader_record_at_the_bound_cannot_poison_the_next_claim() -> None:
    # Every integer field is bounded, so the record decodes; were it believed, the
    # candidate that claims next would take epoch + 1 and fail to build its record
    # (in the runtime's control loop, which would end the agent). It is ignored.
    record = json.loads(encode(VALID["leader"]))
    record.update(epoch=WIRE_INT_MAX, device="mallory")
    leader = decode(json.dumps(record).encode(), (LeaderRecord,))
    assert isinstance(leader, LeaderRecord)
    election = Election("pi-1", priority=0, candidate=True, session=5)
    election.observe(LeaderClaim(leader.epoch, leader.priority, leader.device, leader.session))
    claim = election.make_claim()
    LeaderRecord(sender="pi-1", device="pi-1", epoch=claim.epoch, session=claim.session)
