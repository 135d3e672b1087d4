"""Every message that travels over MQTT, and its encoding to and from bytes.

Each message is a frozen, strict pydantic model that forbids extra fields and
carries an explicit wire tag `kind` (a stable string, never a class name), the
schema `version`, the `sender` (device or client id), a `message_id` (uuid4 hex)
and `sent_at` (unix seconds). Plans, tasks, partials, gates and results carry the
`epoch` of the leader that issued them, so anything from a lower epoch is ignored.

Two encodings, fixed per message kind (`WireMessage.wire_encoding`):
- **json** for control messages a person, `mosquitto_sub`, Node-RED or Home
  Assistant may read (births, states, heartbeats, the leader, the plan, results);
- **msgpack** for anything carrying a `Tensor` (and for the small messages that
  share a topic with tensors), with the tensor as raw bytes.

`encode(message) -> bytes` and `decode(payload, kinds) -> message` are the only
ways in and out. Decoding checks, in order: payload size, well-formed bytes
within the structural limits (`Limits`: container sizes, items, nesting), an
object, the `version`, the `kind` (known and expected), then the schema; each
failure raises its own `ProtocolError` subclass (see `errors`).

Every sequence field is a tuple: msgpack arrays decode to tuples and strict
validation would refuse a list in their place; tuples also keep messages immutable.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .errors import (
    DecodeError,
    PayloadTooLarge,
    SchemaVersionError,
    TensorError,
    UnexpectedKind,
    clip,
)
from .ids import ID_PATTERN, DeviceIdField, JobIdField
from .plan import Plan
from .tensors import (
    DEFAULT_LIMITS,
    LIMITS_CONTEXT_KEY,
    Limits,
    Tensor,
    check_structure,
    pack,
    unpack,
)

__all__ = [
    "MAX_TASKS_PER_BATCH",
    "SCHEMA_VERSION",
    "WIRE_INT_MAX",
    "CancelJob",
    "ClockEcho",
    "DeviceBirth",
    "DeviceCapabilities",
    "DeviceState",
    "Encoding",
    "GateValue",
    "Heartbeat",
    "JobResult",
    "JobSpan",
    "JobSubmit",
    "LeaderRecord",
    "LinkEstimate",
    "LinkProbe",
    "PlanAnnouncement",
    "RebirthRequest",
    "ReductionPartial",
    "RowsForward",
    "TileFailed",
    "TileResult",
    "TileRows",
    "TileTask",
    "TileTaskBatch",
    "TileTrace",
    "TraceSpan",
    "UnitProfile",
    "WireMessage",
    "decode",
    "decode_as",
    "encode",
    "message_kinds",
    "new_message_id",
]

MAX_TASKS_PER_BATCH: Final = 256
"""Most tasks in one `TileTaskBatch` (a deep plan's whole job for one device is far
fewer; a sender splits a longer list)."""

SCHEMA_VERSION: Final = 3
"""The wire schema version this code speaks; bump it on any incompatible change."""

WIRE_INT_MAX: Final = 2**53 - 1
"""Largest magnitude of any integer field. JSON would carry any size and msgpack up
to 2**64 - 1: without a bound, a JSON record with a 2**70 epoch is accepted and then
cannot be packed into the msgpack tasks that cite it. 2**53 - 1 is also the largest
integer a JavaScript JSON reader (Node-RED) sees exactly; epochs, sessions
and counters stay far below it."""

Encoding = Literal["json", "msgpack"]

M = TypeVar("M", bound="WireMessage")

# Registry of concrete message classes by their `kind` tag (filled as classes are defined).
_KINDS: dict[str, type[WireMessage]] = {}


def new_message_id() -> str:
    """A fresh message id: uuid4 as 32 lowercase hex digits."""
    return uuid.uuid4().hex


def _check_row_interval(value: tuple[int, int]) -> tuple[int, int]:
    start, stop = value
    if start > stop:
        raise ValueError(f"row interval [{start}, {stop}) has start after stop")
    return value


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
NonNegativeInt = Annotated[int, Field(ge=0, le=WIRE_INT_MAX)]
RowInterval = Annotated[tuple[NonNegativeInt, NonNegativeInt], AfterValidator(_check_row_interval)]
"""Half-open row interval `[start, stop)` of a feature map's height axis."""
ShortText = Annotated[str, Field(max_length=2000)]
Name = Annotated[str, Field(min_length=1, max_length=200)]

_FROZEN_STRICT = ConfigDict(frozen=True, strict=True, extra="forbid")


class WireMessage(BaseModel):
    """Fields every message carries; subclasses add a `kind` literal and their content."""

    model_config = _FROZEN_STRICT

    wire_encoding: ClassVar[Encoding] = "json"
    """How this kind is encoded on the wire (fixed per kind, matched by its topics)."""
    added_fields: ClassVar[frozenset[str]] = frozenset()
    """Optional fields added within this schema version: left out of the bytes while
    unset, so a message that does not use them encodes as it always did."""

    version: Literal[3] = Field(
        default=SCHEMA_VERSION,
        description="wire schema version (2: the direct data plane; 3: traces, the split "
        "head, gate partials on devices/<id>/partials, deadlines as time left)",
    )
    kind: str = Field(description="message type tag, a stable string")
    sender: str = Field(pattern=ID_PATTERN, description="id of the device or client that sent it")
    message_id: str = Field(
        default_factory=new_message_id,
        pattern=r"^[0-9a-f]{32}$",
        description="uuid4 hex; unique per message, used to spot duplicates",
    )
    sent_at: FiniteFloat = Field(
        default_factory=time.time, description="unix time the sender built the message, seconds"
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        kind = cls.model_fields["kind"].default
        if not isinstance(kind, str):
            return  # an abstract intermediate class
        if kind in _KINDS:
            raise TypeError(f"message kind {kind!r} is declared twice")
        _KINDS[kind] = cls


class DeviceCapabilities(BaseModel):
    """What a device is and holds; sent in its birth."""

    model_config = _FROZEN_STRICT

    cores: int = Field(ge=1, le=WIRE_INT_MAX, description="CPU cores usable for inference")
    memory_bytes: NonNegativeInt = Field(description="memory available for inference, bytes")
    machine: str = Field(max_length=200, description="platform, e.g. 'Linux-aarch64'")
    software_version: str = Field(max_length=100, description="edgedi version")
    torch_version: str | None = Field(
        default=None, max_length=100, description="PyTorch version, if installed"
    )
    models: tuple[Name, ...] = Field(default=(), description="models this device holds")


class LinkEstimate(BaseModel):
    """The device's measured link to the broker."""

    model_config = _FROZEN_STRICT

    bandwidth_bytes_per_second: float = Field(
        gt=0, allow_inf_nan=False, description="sustained throughput, bytes per second"
    )
    latency_seconds: NonNegativeFloat = Field(description="one-way latency, seconds")


class UnitProfile(BaseModel):
    """Measured tile costs of one model on the device (see `edgedi.models.calibration`)."""

    model_config = _FROZEN_STRICT

    digest: Name = Field(description="architecture digest of the model at the device's input size")
    units: tuple[tuple[NonNegativeFloat, NonNegativeFloat], ...] = Field(
        min_length=1,
        max_length=1024,
        description="per spatial unit (seconds per MAC, seconds per op invocation)",
    )
    tail_seconds: NonNegativeFloat = Field(description="the tail (pooling and head), seconds")
    copy_seconds_per_byte: NonNegativeFloat = Field(
        default=0.0, description="converting a tile's input or output, seconds per byte"
    )
    channel_units: tuple[tuple[NonNegativeFloat, NonNegativeFloat] | None, ...] | None = Field(
        default=None,
        max_length=1024,
        description="per spatial unit, a channel tile's (seconds per MAC, seconds per tile); "
        "null for a unit not split by channels; absent: not measured",
    )


class DeviceBirth(WireMessage):
    """A device announces itself (retained): capabilities, fitted profile, session."""

    kind: Literal["device_birth"] = "device_birth"
    device: DeviceIdField = Field(description="the device's id (also in the topic)")
    session: NonNegativeInt = Field(
        description="session counter, incremented per agent start; its Will carries the same"
    )
    candidate: bool = Field(description="whether the device may be elected leader")
    priority: int = Field(
        default=0,
        ge=-WIRE_INT_MAX,
        le=WIRE_INT_MAX,
        description="election rank among candidates: lower wins, then the device id",
    )
    capabilities: DeviceCapabilities = Field(description="hardware, software and models held")
    profile: dict[Name, tuple[FiniteFloat, FiniteFloat]] = Field(
        default_factory=dict,
        description="fitted time model per unit kind: (a, b) with seconds ≈ a·FLOPs + b",
    )
    link: LinkEstimate | None = Field(default=None, description="measured link, if known")
    unit_profiles: dict[Name, UnitProfile] = Field(
        default_factory=dict,
        max_length=64,
        description="per model held: tile costs measured on the device (preferred by planners)",
    )


class DeviceState(WireMessage):
    """A device's liveness (retained); its Last Will publishes `offline`."""

    kind: Literal["device_state"] = "device_state"
    device: DeviceIdField = Field(description="the device's id (also in the topic)")
    session: NonNegativeInt = Field(
        description="the birth's session counter; a state of another session is stale"
    )
    status: Literal["online", "offline", "stopped"] = Field(
        description="online; offline (the Will: died); stopped (left gracefully)"
    )


class ClockEcho(BaseModel):
    """The leader's note on a heartbeat it heard: which one, and how long it held it."""

    model_config = _FROZEN_STRICT

    device: DeviceIdField = Field(description="the device whose heartbeat this echoes")
    sequence: NonNegativeInt = Field(description="that heartbeat's sequence number")
    held_s: NonNegativeFloat = Field(
        description="seconds from its arrival to this heartbeat's `sent_at` (leader's clock)"
    )


class Heartbeat(WireMessage):
    """A device's periodic load report (not retained)."""

    kind: Literal["heartbeat"] = "heartbeat"
    added_fields: ClassVar[frozenset[str]] = frozenset({"instance", "clock_offset_s", "echoes"})
    device: DeviceIdField = Field(description="the device's id (also in the topic)")
    session: NonNegativeInt = Field(description="the birth's session counter")
    sequence: NonNegativeInt = Field(description="counts up per heartbeat of this session")
    load: NonNegativeFloat = Field(description="busy fraction of the cores since the last beat")
    busy_tiles: NonNegativeInt = Field(description="tiles running or queued on the device")
    instance: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{1,32}$",
        description="random name of the agent process: a heartbeat of our own id with "
        "another instance is a second agent using the id",
    )
    clock_offset_s: FiniteFloat | None = Field(
        default=None,
        description="this device's clock minus the leader's, seconds, estimated from "
        "heartbeat round trips (0 on the leader; null: not known yet). Shown, never used",
    )
    echoes: tuple[ClockEcho, ...] | None = Field(
        default=None,
        max_length=1024,
        description="leader only: the heartbeats heard since its previous one, so each "
        "device can time the round trip (NTP's four timestamps)",
    )


class LeaderRecord(WireMessage):
    """The elected leader (retained): planner and job coordinator of the cluster."""

    kind: Literal["leader"] = "leader"
    device: DeviceIdField = Field(description="the leader's device id")
    epoch: NonNegativeInt = Field(description="leadership epoch; a new leader takes a higher one")
    session: NonNegativeInt = Field(description="the leader's session counter")
    priority: int = Field(
        default=0,
        ge=-WIRE_INT_MAX,
        le=WIRE_INT_MAX,
        description="the leader's election rank (breaks ties between equal epochs)",
    )


class PlanAnnouncement(WireMessage):
    """The plan in force (retained), issued by the leader of `epoch`."""

    kind: Literal["plan_announcement"] = "plan_announcement"
    epoch: NonNegativeInt = Field(description="epoch of the leader that made the plan")
    plan: Plan = Field(description="the plan (schema in broker/plan.py)")


class RebirthRequest(WireMessage):
    """Ask every device to re-announce its birth and state (Sparkplug's rebirth)."""

    kind: Literal["rebirth"] = "rebirth"
    reason: ShortText = Field(default="", description="why, for the logs")


MAX_TRACE_SPANS: Final = 4096
"""Spans in one job's trace: far above what a 4-device plan of 20 segments makes."""

SpanKind = Literal["scatter", "rows", "queue", "compute", "gate", "tail", "send"]


class JobSpan(BaseModel):
    """One interval of a traced job on one device (see `JobSubmit.trace`)."""

    model_config = _FROZEN_STRICT

    device: DeviceIdField = Field(description="the device the interval was spent on")
    segment: NonNegativeInt | None = Field(default=None, description="segment; null: none")
    tile: NonNegativeInt | None = Field(default=None, description="tile; null: none")
    what: SpanKind = Field(
        description="scatter (the leader sends the tasks), rows (a tile waits for its input "
        "rows), queue (for the compute thread), compute, gate (waits for a gate's partials), "
        "tail (the leader runs pool and classifier), send (a message on its way: predicted "
        "timelines only)"
    )
    start_ms: FiniteFloat = Field(description="start, ms after the leader took the job")
    end_ms: FiniteFloat = Field(description="end, ms after the leader took the job")


class JobResult(WireMessage):
    """A job's final outcome: exactly one per submitted job (JSON, for any MQTT client)."""

    kind: Literal["job_result"] = "job_result"
    job_id: JobIdField = Field(description="the submitted job's id (also in the topic)")
    status: Literal["ok", "error"] = Field(description="ok, or error with `error` set")
    epoch: NonNegativeInt | None = Field(default=None, description="epoch of the coordinator")
    model: Name | None = Field(default=None, description="model that ran")
    label: NonNegativeInt | None = Field(default=None, description="predicted class index")
    class_name: Name | None = Field(default=None, description="predicted class name")
    probabilities: tuple[FiniteFloat, ...] = Field(
        default=(), description="class probabilities, in class index order"
    )
    latency_ms: dict[Name, NonNegativeFloat] = Field(
        default_factory=dict,
        description="latency breakdown per stage in milliseconds (e.g. queue, compute, total)",
    )
    plan_id: Name | None = Field(default=None, description="id of the plan used")
    strategy: Name | None = Field(default=None, description="partitioning strategy of the plan")
    devices: tuple[DeviceIdField, ...] = Field(default=(), description="devices that computed")
    error: ShortText | None = Field(default=None, description="what went wrong, if status=error")
    retryable: bool = Field(
        default=False,
        description="an error of the cluster's state (no workers, tiles lost, deadline), "
        "not of the job: resubmitting the same job id runs it again",
    )
    trace: tuple[JobSpan, ...] = Field(
        default=(),
        max_length=MAX_TRACE_SPANS,
        description="the job's timeline when the submit asked for one: each device's own "
        "wall clock against the leader's, so spans of devices whose clocks disagree shift",
    )
    predicted_trace: tuple[JobSpan, ...] = Field(
        default=(),
        max_length=MAX_TRACE_SPANS,
        description="with `trace`: the timeline the plan predicted for the job (the "
        "leader's replay of the direct data plane), from the same origin",
    )

    @model_validator(mode="after")
    def _status_matches_content(self) -> JobResult:
        if self.status == "error" and not self.error:
            raise ValueError("an error result needs an error message")
        if self.status == "ok" and (self.error is not None or self.retryable):
            raise ValueError("an ok result carries no error message and is not retryable")
        return self


class _TensorMessage(WireMessage):
    """Base of the msgpack-encoded kinds."""

    wire_encoding: ClassVar[Encoding] = "msgpack"


class JobSubmit(_TensorMessage):
    """A client submits an image; re-submitting the same `job_id` is idempotent."""

    kind: Literal["job_submit"] = "job_submit"
    job_id: JobIdField = Field(description="the job's id, chosen by the client")
    model: Name = Field(description="model to run")
    image: Tensor = Field(description="input image, (channels, height, width)")
    client: str = Field(pattern=ID_PATTERN, description="id of the submitting client")
    submitted_at: FiniteFloat = Field(
        description="unix time of the first submission (kept on retries), seconds"
    )
    deadline_seconds: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="give up after this long"
    )
    strategy: Name | None = Field(
        default=None,
        description="partitioning strategy for this job (e.g. 'single'); null: the cluster's",
    )
    trace: bool = Field(
        default=False,
        description="ask every device for the timeline of its tiles; the result carries it "
        "(a diagnostic: each tile sends one more small message)",
    )


class RowsForward(BaseModel):
    """Where some of a tile's output rows go next: one tile of the next segment."""

    model_config = _FROZEN_STRICT

    tile: NonNegativeInt = Field(description="tile index in the next segment")
    device: DeviceIdField = Field(description="the device that computes that tile")
    rows: RowInterval = Field(description="rows of this segment's output it needs")


class TileTask(_TensorMessage):
    """The leader asks a device to run one segment on one tile of rows (× columns).

    Self-contained, so that it can be re-dispatched to any device unchanged: the
    model, the segment's units and its whole output partition let the receiver
    recompute the tile's geometry (halo rows, gate shares). Tiles are numbered
    row-major: tile k is row part k // len(column_parts) × column part
    k % len(column_parts) (a single full-width column part when `column_parts` is null).
    """

    kind: Literal["tile_task"] = "tile_task"
    added_fields: ClassVar[frozenset[str]] = frozenset({"deadline_in_s", "channel_parts"})
    job_id: JobIdField = Field(description="the job")
    epoch: NonNegativeInt = Field(description="epoch of the leader that sent it")
    plan_id: Name = Field(description="plan the tile belongs to")
    device: DeviceIdField = Field(description="the device that must run it (also in the topic)")
    model: Name = Field(description="model to run")
    model_digest: Name = Field(description="architecture digest of the model at `input_size`")
    input_size: int = Field(
        gt=0, le=WIRE_INT_MAX, description="square input size the model is built for, pixels"
    )
    segment: NonNegativeInt = Field(description="index of the fused segment in the plan")
    first_unit: NonNegativeInt = Field(description="first unit of the segment")
    last_unit: NonNegativeInt = Field(description="last unit of the segment (inclusive)")
    row_parts: tuple[RowInterval, ...] = Field(
        min_length=1, description="the segment's output row partition, in order"
    )
    column_parts: tuple[RowInterval, ...] | None = Field(
        default=None, description="output column partition of a grid; null: full-width strips"
    )
    channel_parts: tuple[RowInterval, ...] | None = Field(
        default=None,
        description="channel tiles: the hidden-channel partition, one per row part (tile k "
        "computes channels k from the whole input map and sends on rows k); null: row tiles",
    )
    tile: NonNegativeInt = Field(description="index of the tile within the segment")
    input_rows: RowInterval = Field(description="rows of the segment input in `tensor`")
    input_columns: RowInterval | None = Field(
        default=None, description="columns of the segment input in `tensor`"
    )
    output_rows: RowInterval = Field(description="rows of the segment output to produce")
    output_columns: RowInterval | None = Field(
        default=None, description="columns of the segment output to produce"
    )
    tensor: Tensor | None = Field(
        description="segment input rows, halo included; null in a direct task whose rows "
        "come from the devices of the previous segment (`TileRows`)"
    )
    deadline: FiniteFloat = Field(
        description="unix time (the leader's clock) after which the result is useless; "
        "read only when `deadline_in_s` is absent (a leader of an older version)"
    )
    deadline_in_s: NonNegativeFloat | None = Field(
        default=None,
        description="seconds left before the deadline when the task was sent; the receiver "
        "counts them on its own monotonic clock, so the two clocks need not agree",
    )
    attempt: NonNegativeInt = Field(default=0, description="0, then +1 per re-dispatch")
    local_gates: bool = Field(
        default=False,
        description="the tile is the whole map: compute each gate's mean locally "
        "(exact) instead of sending partials and waiting for the combined value",
    )
    peers: tuple[DeviceIdField, ...] | None = Field(
        default=None,
        description="direct data plane: the device of every tile of the segment, by tile "
        "index. Gate partials go straight to them and every holder combines them itself; "
        "null: partials go to the leader, which sends the gate values",
    )
    forward: tuple[RowsForward, ...] = Field(
        default=(),
        description="direct data plane: the next segment's tiles that need rows of this "
        "tile's output; they get them straight from this device and no `TileResult` "
        "goes to the leader. Empty: the output goes to the leader",
    )
    trace: bool = Field(
        default=False, description="send the leader a `TileTrace` of this tile's timeline"
    )
    run: NonNegativeInt = Field(
        default=0,
        description="the leader's run of this job id: a job resubmitted after a retryable "
        "error runs again under the same id with run + 1, so devices that cancelled the "
        "earlier run take its tasks",
    )
    head_partial: bool = Field(
        default=False,
        description="direct data plane, last segment, a head that starts with a linear layer "
        "on the whole map: answer with this tile's rows times their block of that layer's "
        "weights (a (1, out) vector, no bias) instead of the rows",
    )

    @model_validator(mode="after")
    def _direct(self) -> TileTask:
        if self.forward and self.peers is None:
            raise ValueError("a task that forwards its rows must name its segment's peers")
        if self.peers is not None and len(self.peers) != len(self.row_parts) * len(
            self.column_parts or (None,)
        ):
            raise ValueError("peers must name one device per tile of the segment")
        if self.tensor is None and self.peers is None:
            raise ValueError("only a direct task may leave its input to its peers")
        return self

    @property
    def direct(self) -> bool:
        """Runs on the direct data plane (see `peers`)."""
        return self.peers is not None


class TileTaskBatch(_TensorMessage):
    """Several tile tasks of one job for one device, in one message.

    The direct data plane sends each device all of its tasks of a job at once, and a
    message costs both event loops far more than the bytes of a task (a QoS 1 round
    trip, topic matching, decoding): ResNet-34 on four devices is 72 tasks a job.
    The receiver takes the tasks in order, exactly as if each had come alone. Only
    devices whose birth says they read it get one (`edgedi.agent.device
    .takes_task_batches`): an older device would refuse the kind.
    """

    kind: Literal["tile_task_batch"] = "tile_task_batch"
    job_id: JobIdField = Field(description="the job of every task")
    epoch: NonNegativeInt = Field(description="epoch of the leader that sent it")
    device: DeviceIdField = Field(description="the device of every task (also in the topic)")
    tasks: tuple[TileTask, ...] = Field(
        min_length=1, max_length=MAX_TASKS_PER_BATCH, description="the tasks, in order"
    )

    @model_validator(mode="after")
    def _one_job_one_device(self) -> TileTaskBatch:
        for index, task in enumerate(self.tasks):
            if (task.job_id, task.epoch, task.device, task.sender) != (
                self.job_id,
                self.epoch,
                self.device,
                self.sender,
            ):
                raise ValueError(
                    f"task {index} is not of this batch's job, epoch, device and sender"
                )
        return self


class CancelJob(_TensorMessage):
    """Stop working on a job (shares the tasks topic, hence msgpack)."""

    kind: Literal["cancel_job"] = "cancel_job"
    job_id: JobIdField = Field(description="the job to drop")
    epoch: NonNegativeInt = Field(description="epoch of the leader that sent it")
    reason: ShortText = Field(default="", description="why, for the logs")
    run: NonNegativeInt = Field(
        default=0,
        description="the run of the job id that is cancelled (see `TileTask.run`); tasks of "
        "a later run of the same job id are still taken",
    )


class ReductionPartial(_TensorMessage):
    """A worker's per-channel sums for one attention gate of a fused segment."""

    kind: Literal["reduction_partial"] = "reduction_partial"
    job_id: JobIdField = Field(description="the job (also in the topic)")
    epoch: NonNegativeInt = Field(description="epoch of the task's leader")
    segment: NonNegativeInt = Field(description="index of the fused segment")
    tile: NonNegativeInt = Field(description="index of the tile that summed")
    gate: NonNegativeInt = Field(description="index of the gate within the segment")
    device: DeviceIdField = Field(description="the worker")
    sums: Tensor = Field(description="per-channel sums over the tile's own rows (float64)")
    positions: NonNegativeInt = Field(
        description="spatial positions summed (rows × width); the leader divides by the total"
    )


class GateValue(_TensorMessage):
    """The leader's combined gate vector, once every partial of a gate is in."""

    kind: Literal["gate_value"] = "gate_value"
    job_id: JobIdField = Field(description="the job (also in the topic)")
    epoch: NonNegativeInt = Field(description="epoch of the leader")
    segment: NonNegativeInt = Field(description="index of the fused segment")
    gate: NonNegativeInt = Field(description="index of the gate within the segment")
    vector: Tensor = Field(description="the gate's per-channel values")


class TileResult(_TensorMessage):
    """A worker's output rows for one tile."""

    kind: Literal["tile_result"] = "tile_result"
    job_id: JobIdField = Field(description="the job (also in the topic)")
    epoch: NonNegativeInt = Field(description="epoch of the task's leader")
    segment: NonNegativeInt = Field(description="index of the fused segment")
    tile: NonNegativeInt = Field(description="index of the tile")
    device: DeviceIdField = Field(description="the worker")
    output_rows: RowInterval = Field(description="rows of the segment output in `tensor`")
    output_columns: RowInterval | None = Field(
        default=None, description="columns of the segment output in `tensor`; null: all"
    )
    tensor: Tensor = Field(description="the output rows")
    compute_seconds: NonNegativeFloat = Field(description="time spent computing, seconds")
    attempt: NonNegativeInt = Field(default=0, description="the task's attempt number")
    head_partial: bool = Field(
        default=False,
        description="`tensor` is the head's first linear layer applied to `output_rows` "
        "(see `TileTask.head_partial`), not the rows",
    )


class TileRows(_TensorMessage):
    """Rows of one tile's output, sent straight to a device that needs them as input.

    Direct data plane: the producer of segment `segment - 1` sends the rows that tile
    `tile` of segment `segment` needs (halo included) to that tile's device.
    """

    kind: Literal["tile_rows"] = "tile_rows"
    job_id: JobIdField = Field(description="the job")
    epoch: NonNegativeInt = Field(description="epoch of the task's leader")
    segment: NonNegativeInt = Field(description="the receiving tile's segment")
    tile: NonNegativeInt = Field(description="the receiving tile's index")
    device: DeviceIdField = Field(description="the sender (also in the topic)")
    rows: RowInterval = Field(description="rows of the receiving segment's input in `tensor`")
    tensor: Tensor = Field(description="the rows, full width")
    attempt: NonNegativeInt = Field(default=0, description="attempt of the tasks involved")


class LinkProbe(_TensorMessage):
    """A device's message to itself through the broker: it measures its own link."""

    kind: Literal["link_probe"] = "link_probe"
    device: DeviceIdField = Field(description="the device (also in the topic)")
    probe: NonNegativeInt = Field(description="counts up per probe of this measurement")
    padding: bytes = Field(max_length=4 * 1024 * 1024, description="payload of the probe's size")


class TraceSpan(BaseModel):
    """One interval of a tile's timeline, on the clock of the device that ran it."""

    model_config = _FROZEN_STRICT

    what: Literal["rows", "queue", "compute", "gate"] = Field(description="see `JobSpan`")
    start: FiniteFloat = Field(description="unix time on the device, seconds")
    end: FiniteFloat = Field(description="unix time on the device, seconds")


class TileTrace(_TensorMessage):
    """A traced tile's timeline, sent to the leader before the tile's other outcome."""

    kind: Literal["tile_trace"] = "tile_trace"
    job_id: JobIdField = Field(description="the job (also in the topic)")
    epoch: NonNegativeInt = Field(description="epoch of the task's leader")
    segment: NonNegativeInt = Field(description="index of the fused segment")
    tile: NonNegativeInt = Field(description="index of the tile")
    device: DeviceIdField = Field(description="the worker")
    attempt: NonNegativeInt = Field(default=0, description="the task's attempt number")
    spans: tuple[TraceSpan, ...] = Field(
        max_length=256, description="the tile's intervals, in order"
    )


class TileFailed(_TensorMessage):
    """A worker could not compute a tile (shares the tiles topic, hence msgpack)."""

    kind: Literal["tile_failed"] = "tile_failed"
    job_id: JobIdField = Field(description="the job (also in the topic)")
    epoch: NonNegativeInt = Field(description="epoch of the task's leader")
    segment: NonNegativeInt = Field(description="index of the fused segment")
    tile: NonNegativeInt = Field(description="index of the tile")
    device: DeviceIdField = Field(description="the worker")
    reason: ShortText = Field(description="what went wrong")
    attempt: NonNegativeInt = Field(default=0, description="the task's attempt number")


def message_kinds() -> Mapping[str, type[WireMessage]]:
    """Every concrete message class by its `kind` tag."""
    return dict(_KINDS)


def encode(message: WireMessage, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The wire bytes of `message` in its kind's encoding.

    Raises `PayloadTooLarge` when the result exceeds `limits.max_payload_bytes`, so a
    sender fails loudly instead of the broker dropping the message silently.
    """
    unset = {name for name in message.added_fields if getattr(message, name) is None}
    if message.wire_encoding == "json":
        payload = message.model_dump_json(exclude=unset).encode()
    else:
        payload = pack(message.model_dump(mode="python", exclude=unset))
    if len(payload) > limits.max_payload_bytes:
        raise PayloadTooLarge(
            f"{message.kind} encodes to {len(payload)} bytes, over the limit of "
            f"{limits.max_payload_bytes}"
        )
    return payload


def decode(
    payload: bytes,
    kinds: Iterable[type[WireMessage]] | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> WireMessage:
    """Validate `payload` as one of `kinds` (all kinds when None) and return the message.

    Raises `PayloadTooLarge`, `DecodeError`, `SchemaVersionError`, `UnexpectedKind`
    or `TensorError` (all `ProtocolError`) for a payload that is not acceptable.
    """
    allowed = tuple(_KINDS.values()) if kinds is None else tuple(kinds)
    encodings = {cls.wire_encoding for cls in allowed}
    if len(encodings) > 1 and kinds is not None:
        raise ValueError(f"expected kinds mix encodings {sorted(encodings)}")
    if len(payload) > limits.max_payload_bytes:
        raise PayloadTooLarge(
            f"payload of {len(payload)} bytes is over the limit of {limits.max_payload_bytes}"
        )
    encoding = encodings.pop() if len(encodings) == 1 else _sniff_encoding(payload)
    raw = _parse_json(payload, limits) if encoding == "json" else unpack(payload, limits)
    if not isinstance(raw, Mapping):
        raise DecodeError(f"a message is a {encoding} object, not {type(raw).__name__}")
    version = raw.get("version")
    # `2.0` equals 2 in Python, and pydantic would take it for the Literal too.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"message schema version {clip(version)}; this code speaks {SCHEMA_VERSION}"
        )
    kind = raw.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnexpectedKind(f"unknown message kind {clip(kind)}")
    if cls not in allowed:
        names = ", ".join(sorted(c.model_fields["kind"].default for c in allowed))
        raise UnexpectedKind(f"message kind {kind!r} is not expected here (expected {names})")
    if cls.wire_encoding != encoding:
        raise DecodeError(f"{kind} travels as {cls.wire_encoding}, got {encoding}")
    context = {LIMITS_CONTEXT_KEY: limits}
    try:
        if encoding == "json":
            return cls.model_validate_json(payload, context=context)
        return cls.model_validate(raw, context=context)
    except ValidationError as error:
        raise DecodeError(f"invalid {kind}: {_summarise(error)}") from error
    except (TensorError, PayloadTooLarge) as error:  # raised by a Tensor field's validator
        raise type(error)(f"invalid {kind}: {error}") from error


def decode_as(payload: bytes, cls: type[M], *, limits: Limits = DEFAULT_LIMITS) -> M:
    """`decode` for exactly one expected kind, typed as that kind."""
    message = decode(payload, (cls,), limits=limits)
    assert isinstance(message, cls)  # decode returns only allowed kinds
    return message


def _sniff_encoding(payload: bytes) -> Encoding:
    # A JSON object starts with `{` (maybe after whitespace); a msgpack map never does.
    return "json" if payload.lstrip()[:1] == b"{" else "msgpack"


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(payload: bytes, limits: Limits) -> object:
    try:
        value = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise DecodeError(f"malformed JSON: {error}") from error
    # JSON's parser has no limits of its own: its work is bounded by the topic's
    # payload size; what it built is checked before any validator walks it.
    check_structure(value, limits)
    return value


_MAX_ERROR_TEXT: Final = 300


def _path_part(part: str | int) -> str:
    return str(part) if isinstance(part, int) or len(part) <= 40 else clip(part)


def _summarise(error: ValidationError, most: int = 5) -> str:
    """`field.path: message` for the first few errors, like the config loader prints.

    Paths and messages are clipped: a peer picks the keys (an extra field's name) and
    some texts (a plan's device list), and the summary goes to the log.
    """
    lines = []
    for detail in error.errors(include_url=False, include_input=False)[:most]:
        path = ".".join(_path_part(part) for part in detail["loc"]) or "(message)"
        text = detail["msg"]
        if len(text) > _MAX_ERROR_TEXT:
            text = text[:_MAX_ERROR_TEXT] + "..."
        lines.append(f"{path}: {text}")
    more = error.error_count() - most
    if more > 0:
        lines.append(f"... and {more} more")
    return "; ".join(lines)
