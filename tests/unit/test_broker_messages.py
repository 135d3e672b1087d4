"""Wire models: every kind round-trips, golden bytes stay compatible, bad input is refused.

Golden samples in tests/unit/golden/ pin the exact bytes of a few messages. If a
change to the models alters them on purpose, that is a wire-format change: bump
`SCHEMA_VERSION` and regenerate with
`EDGEDI_REGENERATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_broker_messages.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from plan_builders import one_tile_plan
from pydantic import ValidationError

from edgedi.broker.errors import (
    DecodeError,
    PayloadTooLarge,
    SchemaVersionError,
    TensorError,
    UnexpectedKind,
)
from edgedi.broker.messages import (
    MAX_TASKS_PER_BATCH,
    SCHEMA_VERSION,
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
    decode_as,
    encode,
    message_kinds,
    new_message_id,
)
from edgedi.broker.plan import Plan
from edgedi.broker.tensors import Limits, Tensor

GOLDEN = Path(__file__).parent / "golden"
_COMMON: dict[str, Any] = {
    "sender": "pi-1",
    "message_id": "0123456789abcdef0123456789abcdef",
    "sent_at": 1700000000.25,
}


def _plan() -> Plan:
    return one_tile_plan(plan_id="plan-7", epoch=4, model="vgg16-compact")


def samples() -> dict[str, WireMessage]:
    """One deterministic message of every kind."""
    image = Tensor(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
    rows = Tensor(np.linspace(-1, 1, 2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5))
    messages: dict[str, WireMessage] = {
        "device_birth": DeviceBirth(
            **_COMMON,
            device="pi-1",
            session=3,
            candidate=True,
            capabilities=DeviceCapabilities(
                cores=4,
                memory_bytes=4 * 2**30,
                machine="Linux-aarch64",
                software_version="0.1.0",
                torch_version="2.13.0",
                models=("vgg16-compact", "resnet18"),
            ),
            profile={"conv3x3": (1.5e-9, 2e-4), "linear": (1e-9, 1e-5)},
            link=LinkEstimate(bandwidth_bytes_per_second=1.2e7, latency_seconds=0.0005),
        ),
        "device_state": DeviceState(**_COMMON, device="pi-1", session=3, status="offline"),
        "heartbeat": Heartbeat(
            **_COMMON, device="pi-1", session=3, sequence=17, load=0.5, busy_tiles=2
        ),
        "leader": LeaderRecord(**_COMMON, device="pi-1", epoch=4, session=3),
        "plan_announcement": PlanAnnouncement(**_COMMON, epoch=4, plan=_plan()),
        "rebirth": RebirthRequest(**_COMMON, reason="new leader"),
        "job_result": JobResult(
            **_COMMON,
            job_id="job-42",
            status="ok",
            epoch=4,
            model="vgg16-compact",
            label=2,
            class_name="patches",
            probabilities=(0.1, 0.05, 0.8, 0.02, 0.02, 0.01),
            latency_ms={"queue": 0.5, "compute": 40.25, "total": 52.0},
            plan_id="plan-7",
            strategy="edgeci",
            devices=("pi-1", "pi-2"),
        ),
        "job_submit": JobSubmit(
            **_COMMON,
            job_id="job-42",
            model="vgg16-compact",
            image=image,
            client="camera-1",
            submitted_at=1700000000.0,
            deadline_seconds=5.0,
        ),
        "tile_task": TileTask(
            **_COMMON,
            job_id="job-42",
            epoch=4,
            plan_id="plan-7",
            device="pi-2",
            model="vgg16-compact",
            model_digest="0123456789abcdef",
            input_size=200,
            segment=1,
            first_unit=3,
            last_unit=5,
            row_parts=((0, 3), (3, 6)),
            tile=0,
            input_rows=(0, 4),
            output_rows=(0, 3),
            tensor=rows,
            deadline=1700000005.0,
        ),
        "cancel_job": CancelJob(**_COMMON, job_id="job-42", epoch=4, reason="deadline"),
        "reduction_partial": ReductionPartial(
            **_COMMON,
            job_id="job-42",
            epoch=4,
            segment=1,
            tile=0,
            gate=0,
            device="pi-2",
            sums=Tensor(np.array([1.5, -2.0, 3.25])),
            positions=120,
        ),
        "gate_value": GateValue(
            **_COMMON,
            job_id="job-42",
            epoch=4,
            segment=1,
            gate=0,
            vector=Tensor(np.array([0.5, 0.25, 0.75], dtype=np.float32)),
        ),
        "tile_result": TileResult(
            **_COMMON,
            job_id="job-42",
            epoch=4,
            segment=1,
            tile=0,
            device="pi-2",
            output_rows=(0, 3),
            tensor=rows,
            compute_seconds=0.0125,
            attempt=1,
        ),
        "link_probe": LinkProbe(**_COMMON, device="pi-2", probe=3, padding=b"probe"),
        "tile_rows": TileRows(
            **_COMMON,
            job_id="job-42",
            epoch=4,
            segment=2,
            tile=1,
            device="pi-2",
            rows=(3, 5),
            tensor=rows,
        ),
        "tile_failed": TileFailed(
            **_COMMON,
            job_id="job-42",
            epoch=4,
            segment=1,
            tile=0,
            device="pi-2",
            reason="out of memory",
        ),
        "tile_trace": TileTrace(
            **_COMMON,
            job_id="job-42",
            epoch=4,
            segment=1,
            tile=0,
            device="pi-2",
            spans=(
                TraceSpan(what="rows", start=1_700_000_000.0, end=1_700_000_000.25),
                TraceSpan(what="compute", start=1_700_000_000.25, end=1_700_000_000.5),
            ),
        ),
    }
    task = messages["tile_task"]
    assert isinstance(task, TileTask)
    direct = task.model_copy(update={"peers": ("pi-2", "pi-3")})
    second = direct.model_copy(update={"tile": 1, "message_id": "f" * 32, "tensor": None})
    messages["tile_task_batch"] = TileTaskBatch(
        **_COMMON,
        job_id="job-42",
        epoch=4,
        device="pi-2",
        tasks=(direct, second),
    )
    return messages


def test_samples_cover_every_kind() -> None:
    assert set(samples()) == set(message_kinds())


@pytest.mark.parametrize("kind", sorted(message_kinds()))
def test_every_kind_round_trips(kind: str) -> None:
    message = samples()[kind]
    payload = encode(message)
    assert decode(payload) == message
    assert decode(payload, (type(message),)) == message
    assert decode_as(payload, type(message)) == message


@pytest.mark.parametrize("kind", sorted(message_kinds()))
def test_encoding_matches_the_kind(kind: str) -> None:
    message = samples()[kind]
    payload = encode(message)
    if message.wire_encoding == "json":
        document = json.loads(payload)
        assert document["kind"] == kind
        assert document["version"] == SCHEMA_VERSION
    else:
        document = msgpack.unpackb(payload)
        assert document["kind"] == kind


def test_json_kinds_carry_no_tensors() -> None:
    for kind, cls in message_kinds().items():
        if cls.wire_encoding == "json":
            annotations = [str(field.annotation) for field in cls.model_fields.values()]
            assert not any("Tensor" in text for text in annotations), kind


GOLDEN_KINDS = ("device_birth", "job_result", "tile_task", "reduction_partial")


@pytest.mark.parametrize("kind", GOLDEN_KINDS)
def test_golden_samples_still_decode_and_encode_identically(kind: str) -> None:
    message = samples()[kind]
    path = GOLDEN / f"{kind}.{'json' if message.wire_encoding == 'json' else 'msgpack'}"
    if os.environ.get("EDGEDI_REGENERATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_bytes(encode(message))
    golden = path.read_bytes()
    assert decode(golden) == message, "an old payload no longer decodes to the same message"
    assert encode(message) == golden, "the wire bytes changed: bump SCHEMA_VERSION if intended"


def test_an_inconsistent_plan_is_refused_on_receipt() -> None:
    announcement = samples()["plan_announcement"]
    document = json.loads(encode(announcement))
    document["plan"]["devices"] = ["pi-2"]  # the plan names pi-1 but no longer lists it
    with pytest.raises(DecodeError, match="plan"):
        decode(json.dumps(document).encode(), (PlanAnnouncement,))


def test_job_result_is_plain_readable_json() -> None:
    document = json.loads(encode(samples()["job_result"]).decode("utf-8"))
    assert document["job_id"] == "job-42"
    assert document["class_name"] == "patches"
    assert document["latency_ms"]["total"] == 52.0


def _json(message: WireMessage, **changes: Any) -> bytes:
    document = json.loads(encode(message))
    document.update(changes)
    return json.dumps(document).encode()


def _msgpack(message: WireMessage, **changes: Any) -> bytes:
    document = msgpack.unpackb(encode(message))
    document.update(changes)
    return msgpack.packb(document)


@pytest.mark.parametrize("version", [0, 1, 2, 4, "3", 3.0, None])
def test_wrong_version_is_refused(version: object) -> None:
    state = samples()["device_state"]
    with pytest.raises(SchemaVersionError):
        decode(_json(state, version=version))
    with pytest.raises(SchemaVersionError):
        decode(_msgpack(samples()["cancel_job"], version=version))


def test_unknown_and_unexpected_kinds_are_refused() -> None:
    state = samples()["device_state"]
    with pytest.raises(UnexpectedKind, match="unknown"):
        decode(_json(state, kind="device_death"))
    with pytest.raises(UnexpectedKind, match="not expected"):
        decode(encode(state), (DeviceBirth,))
    with pytest.raises(UnexpectedKind):
        decode(_json(state, kind=7))


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"version": NaN}', b"\x93\x01\x02\x03"],
    ids=["empty", "truncated", "array", "string", "bad-utf8", "nan", "msgpack-array"],
)
def test_malformed_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(payload)


def test_schema_violations_raise_decode_error() -> None:
    state = samples()["device_state"]
    with pytest.raises(DecodeError, match="extra"):
        decode(_json(state, extra_field=1))
    with pytest.raises(DecodeError, match="session"):
        decode(_json(state, session="3"))  # strict: no string-to-int coercion
    with pytest.raises(DecodeError, match="status"):
        decode(_json(state, status="asleep"))
    with pytest.raises(DecodeError, match="device"):
        decode(_json(state, device="a/b"))  # never a topic separator inside an id
    with pytest.raises(DecodeError, match="message_id"):
        decode(_json(state, message_id="not-a-uuid"))
    task = samples()["tile_task"]
    with pytest.raises(DecodeError, match="input_rows"):
        decode(_msgpack(task, input_rows=(5, 2)))


def test_tensor_problems_surface_as_tensor_errors() -> None:
    task = samples()["tile_task"]
    wire = task.tensor.to_wire()
    with pytest.raises(TensorError):
        decode(_msgpack(task, tensor={**wire, "dtype": "complex64", "data": bytes(wire["data"])}))
    with pytest.raises(TensorError):
        decode(_msgpack(task, tensor={**wire, "shape": [9, 9], "data": bytes(wire["data"])}))
    with pytest.raises(PayloadTooLarge):
        decode(encode(task), limits=Limits(max_elements=10))


def test_payload_size_is_bounded_both_ways() -> None:
    big = Tensor(np.zeros(300, dtype=np.float64))
    message = GateValue(**_COMMON, job_id="j", epoch=0, segment=0, gate=0, vector=big)
    limits = Limits(max_payload_bytes=1024)
    with pytest.raises(PayloadTooLarge):
        encode(message, limits)
    payload = encode(message)
    with pytest.raises(PayloadTooLarge):
        decode(payload, limits=limits)
    with pytest.raises(PayloadTooLarge):
        decode(b"{" + b" " * 2000 + b"}", limits=limits)


def test_a_kind_with_the_wrong_encoding_is_refused() -> None:
    cancel = samples()["cancel_job"]
    as_json = json.dumps(cancel.model_dump(mode="json")).encode()
    with pytest.raises(DecodeError, match="msgpack"):
        decode(as_json)


def test_messages_are_frozen_and_validated_on_construction() -> None:
    state = samples()["device_state"]
    with pytest.raises(ValidationError):
        state.session = 4  # type: ignore[misc]
    with pytest.raises(ValidationError):
        JobResult(sender="x", job_id="j", status="error")  # an error needs a message
    with pytest.raises(ValidationError):
        JobResult(sender="x", job_id="j", status="ok", probabilities=(float("nan"),))
    with pytest.raises(ValidationError):
        DeviceState(sender="x", device="x", session=1, status="online", version=1)  # type: ignore[arg-type]


def test_defaults_fill_in_identity_and_time() -> None:
    first = RebirthRequest(sender="client-1")
    second = RebirthRequest(sender="client-1")
    assert first.message_id != second.message_id
    assert len(first.message_id) == 32
    assert first.sent_at > 1.6e9
    assert first.version == SCHEMA_VERSION


def test_tensors_refuse_json_serialisation() -> None:
    with pytest.raises(Exception, match="msgpack"):
        samples()["tile_task"].model_dump_json()


def _batch_task(**changes: Any) -> TileTask:
    task = samples()["tile_task"]
    assert isinstance(task, TileTask)
    return task.model_copy(update={"message_id": new_message_id(), **changes})


@pytest.mark.parametrize(
    "change",
    [{"device": "pi-3"}, {"job_id": "job-43"}, {"epoch": 5}, {"sender": "pi-9"}],
    ids=["device", "job", "epoch", "sender"],
)
def test_a_batch_holds_one_jobs_tasks_for_one_device(change: dict[str, Any]) -> None:
    good = samples()["tile_task_batch"]
    assert isinstance(good, TileTaskBatch)
    raw = msgpack.unpackb(encode(good))
    raw["tasks"][1].update(change)
    with pytest.raises(DecodeError, match=r"task 1 is not of this batch"):
        decode(msgpack.packb(raw, use_bin_type=True), (TileTaskBatch,))


def test_a_batch_has_between_one_and_the_bound_of_tasks() -> None:
    common = {**_COMMON, "job_id": "job-42", "epoch": 4, "device": "pi-2"}
    with pytest.raises(ValidationError):
        TileTaskBatch(**common, tasks=())
    too_many = tuple(_batch_task(tile=0) for _ in range(MAX_TASKS_PER_BATCH + 1))
    with pytest.raises(ValidationError):
        TileTaskBatch(**common, tasks=too_many)
