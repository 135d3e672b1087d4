"""The topic catalogue: every MQTT topic edgedi uses, declared once.

Each `TopicSpec` names its pattern below the root, its QoS, retain flag, the
message kinds it carries and hence its encoding. Nothing else in the project
formats or parses topic strings: publishers call `spec.topic(root, ...)`,
subscribers `spec.filter(root, ...)`, receivers `parse_topic(root, topic)`.
`render_markdown()` writes the reference page `docs/topics.md`
(regenerate with `python -m edgedi.broker.topics docs/topics.md`).

The root is `<prefix>/<cluster>` — `edgedi/v1/default` unless configured — so
several clusters, or several test runs, share one broker without crosstalk.

Identity: every topic a device writes carries its own id in `{device}` (its
`sender_parameter`), so the broker's ACL can bind it to the device's login, and a
receiver refuses a message whose `sender` is not the device the topic names.
"""

from __future__ import annotations

import functools
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, NewType

from pydantic import BaseModel

from .errors import DecodeError, PayloadTooLarge, UnexpectedKind, UnknownTopic, clip
from .ids import is_topic_level
from .messages import (
    SCHEMA_VERSION,
    CancelJob,
    DeviceBirth,
    DeviceCapabilities,
    DeviceState,
    Encoding,
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
    WireMessage,
    decode,
    encode,
)
from .tensors import DEFAULT_LIMITS, Limits, Tensor

__all__ = [
    "CATALOGUE",
    "CONTROL_REBIRTH",
    "DEFAULT_PREFIX",
    "DEVICE_BIRTH",
    "DEVICE_HEARTBEAT",
    "DEVICE_PARTIALS",
    "DEVICE_PEER",
    "DEVICE_PROBE",
    "DEVICE_STATE",
    "DEVICE_TASKS",
    "JOB_GATES",
    "JOB_PARTIALS",
    "JOB_RESULT",
    "JOB_SUBMIT",
    "JOB_TILES",
    "PLANNER_LEADER",
    "PLAN_CURRENT",
    "RESULT_SUMMARY",
    "ParsedTopic",
    "Publication",
    "TopicRoot",
    "TopicSpec",
    "decode_for_topic",
    "parse_topic",
    "publication",
    "render_markdown",
]

DEFAULT_PREFIX: Final = "edgedi/v1"

_KIB: Final = 1024
_MIB: Final = 1024 * _KIB
# Per-topic payload bounds: generous multiples of the largest real message.
_SMALL_JSON: Final = 8 * _KIB  # states, heartbeats, leader records, rebirths (~300 bytes)


@dataclass(frozen=True, slots=True)
class TopicRoot:
    """Where a cluster's topics live: `<prefix>/<cluster>/...`."""

    prefix: str = DEFAULT_PREFIX
    cluster: str = "default"

    def __post_init__(self) -> None:
        levels = self.prefix.split("/")
        if (
            not self.prefix
            or any(not level or level[0] == "$" for level in levels)
            or any(character in self.prefix for character in "+#\0")
        ):
            raise UnknownTopic(f"topic prefix {self.prefix!r} must be plain non-empty levels")
        if not is_topic_level(self.cluster):
            raise UnknownTopic(f"cluster name {self.cluster!r} is not a safe topic level")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.cluster}"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic of the catalogue."""

    name: str
    """Catalogue name, e.g. `device_birth`."""
    pattern: str
    """Levels below the root; `{parameter}` marks a single-level parameter."""
    qos: Literal[0, 1]
    retain: bool
    kinds: tuple[type[WireMessage], ...]
    description: str
    writers: str = ""
    """Who may publish on it (the shipped ACL grants exactly this; docs/topics.md)."""
    sender_parameter: str | None = None
    """The topic parameter that names the writer: the message's `sender` must equal
    it (the broker's ACL binds that level to the writer's login)."""
    max_payload_bytes: int | None = None
    """Largest payload accepted on this topic, checked before parsing (None: only the
    session's `Limits`). Control topics carry small JSON: a bound far below the
    global one makes a bloated message cost nothing to refuse."""
    levels: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.pattern.split("/")))
        encodings = {kind.wire_encoding for kind in self.kinds}
        if len(encodings) != 1:
            raise TypeError(f"topic {self.name} mixes encodings {sorted(encodings)}")

    @property
    def encoding(self) -> Encoding:
        return self.kinds[0].wire_encoding

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(level[1:-1] for level in self.levels if _is_parameter(level))

    def topic(self, root: TopicRoot, **parameters: str) -> str:
        """The concrete topic string, e.g. `edgedi/v1/default/devices/pi-1/birth`."""
        try:
            return _rendered(self, root, tuple(parameters.items()))
        except TypeError:  # an unhashable value: `_render` says what is wrong with it
            return self._render(root, parameters, wildcards=False)

    def filter(self, root: TopicRoot, **parameters: str) -> str:
        """A subscription filter: parameters not given become the `+` wildcard."""
        return self._render(root, parameters, wildcards=True)

    def _render(self, root: TopicRoot, parameters: Mapping[str, str], *, wildcards: bool) -> str:
        unknown = set(parameters) - set(self.parameters)
        if unknown:
            raise UnknownTopic(f"topic {self.name} has no parameter(s) {sorted(unknown)}")
        levels = [root.base]
        for level in self.levels:
            if not _is_parameter(level):
                levels.append(level)
                continue
            name = level[1:-1]
            value = parameters.get(name)
            if value is None:
                if not wildcards:
                    raise UnknownTopic(f"topic {self.name} needs parameter {name!r}")
                value = "+"
            elif not isinstance(value, str) or not is_topic_level(value):
                raise UnknownTopic(f"{name}={value!r} is not a safe single topic level")
            levels.append(value)
        return "/".join(levels)

    def match(self, root: TopicRoot, topic: str) -> dict[str, str] | None:
        """The parameters if `topic` is an instance of this spec under `root`, else None."""
        prefix = root.base + "/"
        if not topic.startswith(prefix):
            return None
        levels = topic[len(prefix) :].split("/")
        if len(levels) != len(self.levels):
            return None
        parameters: dict[str, str] = {}
        for pattern_level, level in zip(self.levels, levels, strict=True):
            if _is_parameter(pattern_level):
                if not is_topic_level(level):
                    return None
                parameters[pattern_level[1:-1]] = level
            elif pattern_level != level:
                return None
        return parameters


def _is_parameter(level: str) -> bool:
    return level.startswith("{") and level.endswith("}")


@functools.lru_cache(maxsize=4096)
def _rendered(spec: TopicSpec, root: TopicRoot, parameters: tuple[tuple[str, str], ...]) -> str:
    """`spec.topic`, remembered: every message sent renders one, and the checks of its
    levels cost more than the rest of publishing a small message (errors are not kept)."""
    return spec._render(root, dict(parameters), wildcards=False)


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """An incoming topic resolved against the catalogue."""

    spec: TopicSpec
    parameters: Mapping[str, str]
    topic: str


# --- The catalogue ------------------------------------------------------------------

DEVICE_BIRTH: Final = TopicSpec(
    name="device_birth",
    pattern="devices/{device}/birth",
    qos=1,
    retain=True,
    kinds=(DeviceBirth,),
    description="A device's capabilities, fitted profile and session counter; "
    "re-published on every (re)connect and on a rebirth request.",
    max_payload_bytes=256 * _KIB,
    sender_parameter="device",
    writers="the device `device` only",
)
DEVICE_STATE: Final = TopicSpec(
    name="device_state",
    pattern="devices/{device}/state",
    qos=1,
    retain=True,
    kinds=(DeviceState,),
    description="Liveness: `online` after the birth, `stopped` on a graceful exit, "
    "`offline` from the MQTT Last Will. A state whose session differs from the "
    "birth's is stale (a late Will of an older connection).",
    max_payload_bytes=_SMALL_JSON,
    sender_parameter="device",
    writers="the device `device` only (and the broker, its Will)",
)
DEVICE_HEARTBEAT: Final = TopicSpec(
    name="device_heartbeat",
    pattern="devices/{device}/heartbeat",
    qos=0,
    retain=False,
    kinds=(Heartbeat,),
    description="Periodic load report; losing one is harmless.",
    max_payload_bytes=_SMALL_JSON,
    sender_parameter="device",
    writers="the device `device` only",
)
PLANNER_LEADER: Final = TopicSpec(
    name="planner_leader",
    pattern="planner/leader",
    qos=1,
    retain=True,
    kinds=(LeaderRecord,),
    description="The elected leader and its epoch. A new leader takes a higher epoch; "
    "everyone ignores plans and tasks of lower epochs.",
    max_payload_bytes=_SMALL_JSON,
    writers="planner candidates",
)
PLAN_CURRENT: Final = TopicSpec(
    name="plan_current",
    pattern="plans/current",
    qos=1,
    retain=True,
    kinds=(PlanAnnouncement,),
    description="The plan in force, wrapped with the epoch of the leader that made it.",
    max_payload_bytes=1 * _MIB,
    writers="planner candidates (the leader)",
)
JOB_SUBMIT: Final = TopicSpec(
    name="job_submit",
    pattern="jobs/submit",
    qos=1,
    retain=False,
    kinds=(JobSubmit,),
    description="A client submits an image. Job ids make submission idempotent: "
    "a retry with the same id is not run twice.",
    max_payload_bytes=16 * _MIB,
    writers="clients and devices allowed to submit jobs",
)
DEVICE_TASKS: Final = TopicSpec(
    name="device_tasks",
    pattern="devices/{device}/tasks",
    qos=1,
    retain=False,
    kinds=(TileTask, TileTaskBatch, CancelJob),
    description="The leader's work for one device: tile tasks (one at a time, or a direct "
    "job's all at once), and job cancellations.",
    writers="planner candidates (the leader)",
)
DEVICE_PEER: Final = TopicSpec(
    name="device_peer",
    pattern="devices/{device}/peer/{target}",
    qos=1,
    retain=False,
    kinds=(TileRows,),
    description="The direct data plane, from device `device` to device `target`: rows of "
    "a tile's output that a tile of the next segment needs.",
    sender_parameter="device",
    writers="the device `device` only",
)
DEVICE_PARTIALS: Final = TopicSpec(
    name="device_partials",
    pattern="devices/{device}/partials",
    qos=1,
    retain=False,
    kinds=(ReductionPartial,),
    description="The direct data plane: a tile's gate partial sums, published once by its "
    "device; every device reads all devices' (`devices/+/partials`) and the holders of "
    "that segment combine them, each itself, in tile order.",
    sender_parameter="device",
    writers="the device `device` only",
)
DEVICE_PROBE: Final = TopicSpec(
    name="device_probe",
    pattern="devices/{device}/probe",
    qos=1,
    retain=False,
    kinds=(LinkProbe,),
    description="A device's own round trips through the broker, at start: the latency "
    "per message and the bandwidth it announces for the planner.",
    sender_parameter="device",
    writers="the device `device` only",
)
JOB_PARTIALS: Final = TopicSpec(
    name="job_partials",
    pattern="jobs/{job_id}/partials/{device}",
    qos=1,
    retain=False,
    kinds=(ReductionPartial,),
    description="Workers' per-channel partial sums for an attention gate, to the leader; "
    "`device` is the worker.",
    sender_parameter="device",
    writers="the device `device` only",
)
JOB_GATES: Final = TopicSpec(
    name="job_gates",
    pattern="jobs/{job_id}/gates",
    qos=1,
    retain=False,
    kinds=(GateValue,),
    description="The leader's combined gate vector, to the workers of that job.",
    writers="planner candidates (the leader)",
)
JOB_TILES: Final = TopicSpec(
    name="job_tiles",
    pattern="jobs/{job_id}/tiles/{device}",
    qos=1,
    retain=False,
    kinds=(TileResult, TileFailed, TileTrace),
    description="Workers' tile outputs (or failures), and traced tiles' timelines, to the "
    "leader; `device` is the worker.",
    sender_parameter="device",
    writers="the device `device` only",
)
JOB_RESULT: Final = TopicSpec(
    name="job_result",
    pattern="results/{job_id}/{device}",
    qos=1,
    retain=False,
    kinds=(JobResult,),
    description="Exactly one final result or error per submitted job, from the leader "
    "`device` (subscribe to `results/<job_id>/+`); JSON, so `mosquitto_sub`, Node-RED or "
    "Home Assistant can read it. Believe it only when `device` led the cluster in the "
    "result's `epoch` (the leader record of that epoch names it).",
    max_payload_bytes=256 * _KIB,
    sender_parameter="device",
    writers="the planner candidate `device` only (the leader)",
)
RESULT_SUMMARY: Final = TopicSpec(
    name="result_summary",
    pattern="summary/last_result",
    qos=1,
    retain=True,
    kinds=(JobResult,),
    description="The leader's last finished job (its result without the trace), on a "
    "fixed topic for dashboards: Home Assistant's cluster sensors read it. Published "
    "only with `home_assistant.discovery` on.",
    writers="planner candidates (the leader)",
)
CONTROL_REBIRTH: Final = TopicSpec(
    name="control_rebirth",
    pattern="control/rebirth",
    qos=1,
    retain=False,
    kinds=(RebirthRequest,),
    description="Asks every device to re-announce its birth and state.",
    max_payload_bytes=_SMALL_JSON,
    writers="planner candidates",
)

CATALOGUE: Final[tuple[TopicSpec, ...]] = (
    DEVICE_BIRTH,
    DEVICE_STATE,
    DEVICE_HEARTBEAT,
    PLANNER_LEADER,
    PLAN_CURRENT,
    JOB_SUBMIT,
    DEVICE_TASKS,
    DEVICE_PEER,
    DEVICE_PARTIALS,
    DEVICE_PROBE,
    JOB_PARTIALS,
    JOB_GATES,
    JOB_TILES,
    JOB_RESULT,
    RESULT_SUMMARY,
    CONTROL_REBIRTH,
)


def parse_topic(root: TopicRoot, topic: str) -> ParsedTopic:
    """Resolve an incoming topic string; raises `UnknownTopic` if it is not ours."""
    for spec in CATALOGUE:
        parameters = spec.match(root, topic)
        if parameters is not None:
            return ParsedTopic(spec=spec, parameters=parameters, topic=topic)
    raise UnknownTopic(f"topic {clip(topic)} is not in the catalogue under {root.base!r}")


def decode_for_topic(
    parsed: ParsedTopic, payload: bytes, limits: Limits = DEFAULT_LIMITS
) -> WireMessage:
    """Decode `payload` as one of the kinds its topic carries.

    Also checks that a field named like a topic parameter (a birth's `device`, a
    result's `job_id`) agrees with the topic, so a misrouted or forged message is
    rejected (`DecodeError`) instead of being filed under the wrong device or job.
    """
    most = parsed.spec.max_payload_bytes
    if most is not None and len(payload) > most:
        raise PayloadTooLarge(
            f"payload of {len(payload)} bytes is over the limit of {most} for {parsed.spec.name}"
        )
    message = decode(payload, parsed.spec.kinds, limits=limits)
    for name, value in parsed.parameters.items():
        carried = getattr(message, name, None)
        if carried is not None and carried != value:
            raise DecodeError(
                f"{message.kind} on {parsed.topic!r} carries {name}={carried!r}, "
                f"the topic says {value!r}"
            )
    writer = parsed.spec.sender_parameter
    if writer is not None and message.sender != parsed.parameters.get(writer):
        raise DecodeError(
            f"{message.kind} on {parsed.topic!r} is sent by {message.sender!r}, "
            f"not by the device the topic names"
        )
    return message


@dataclass(frozen=True, slots=True)
class Publication:
    """A message ready to publish: topic, encoded payload, QoS and retain flag."""

    topic: str
    payload: bytes
    qos: Literal[0, 1]
    retain: bool


def publication(
    root: TopicRoot,
    spec: TopicSpec,
    message: WireMessage,
    *,
    limits: Limits = DEFAULT_LIMITS,
    **parameters: str,
) -> Publication:
    """Encode `message` for `spec`'s topic; refuses a kind the topic does not carry.

    Raises `UnexpectedKind` for the wrong kind, `UnknownTopic` for bad parameters,
    `PayloadTooLarge` when the encoded message is over `limits`, and `ValueError`
    when a field contradicts a topic parameter (a bug in the caller).
    """
    if type(message) not in spec.kinds:
        raise UnexpectedKind(f"topic {spec.name} does not carry {message.kind}")
    for name, value in parameters.items():
        carried = getattr(message, name, None)
        if carried is not None and carried != value:
            raise ValueError(f"{message.kind} has {name}={carried!r} but the topic says {value!r}")
    writer = spec.sender_parameter
    if writer is not None and writer in parameters and message.sender != parameters[writer]:
        raise ValueError(f"{message.kind} is sent by {message.sender!r} on {writer}'s topic")
    topic = spec.topic(root, **parameters)
    payload = encode(message, limits)
    if spec.max_payload_bytes is not None and len(payload) > spec.max_payload_bytes:
        raise PayloadTooLarge(
            f"{message.kind} encodes to {len(payload)} bytes, over the limit of "
            f"{spec.max_payload_bytes} for {spec.name}"
        )
    return Publication(topic=topic, payload=payload, qos=spec.qos, retain=spec.retain)


# --- The reference page --------------------------------------------------------------


def _type_name(annotation: object) -> str:
    """A short readable name of a field's type for the docs."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, NewType):
        return str(annotation.__name__)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is Literal:
        return " \\| ".join(repr(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = typing.get_args(annotation)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_name(args[0])}]"
        inner = ", ".join(_type_name(arg) for arg in args)
        if origin is tuple:  # a fixed-length JSON/msgpack array
            return f"[{inner}]"
        return f"{getattr(origin, '__name__', origin)}[{inner}]"
    if annotation is Tensor:
        return "tensor"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _fields_table(model: type[BaseModel]) -> list[str]:
    lines = ["| field | type | description |", "|---|---|---|"]
    for name, info in model.model_fields.items():
        if name in ("version", "sender", "message_id", "sent_at"):
            continue  # common to every message; described once above
        if name == "kind":
            lines.append(f'| `kind` | `"{info.default}"` | the message type tag |')
            continue
        optional = "" if info.is_required() else " (optional)"
        type_name = _type_name(info.annotation)
        lines.append(f"| `{name}` | {type_name}{optional} | {info.description or ''} |")
    return lines


def render_markdown(root: TopicRoot | None = None) -> str:
    """The topic reference page (`docs/topics.md`), generated from the catalogue."""
    root = root or TopicRoot()
    lines = [
        "# MQTT topics and payloads",
        "",
        "<!-- Generated by `python -m edgedi.broker.topics docs/topics.md`; do not edit. -->",
        "",
        f"Every topic lives under `<prefix>/<cluster>/`, by default `{root.base}/`.",
        "`{parameter}` stands for one topic level (letters, digits, `_`, `.`, `-`).",
        "JSON payloads are UTF-8 objects; msgpack payloads are maps whose tensors are",
        "`{dtype, shape, data: bin}` with raw little-endian bytes (dtype one of float32,",
        "float16, float64, uint8, int64).",
        "",
        f"Every payload carries `version` (currently {SCHEMA_VERSION}), `kind` (the tag below),",
        "`sender` (device or client id), `message_id` (uuid4 hex) and `sent_at` (unix",
        "seconds). Messages from an older leader `epoch` are ignored.",
        "",
        "Who may publish what: every topic a device writes carries its own id as",
        "`{device}`; the shipped ACL (`deploy/ansible/roles/mosquitto/templates/acl.j2`)",
        "lets each login write only under its own id, and receivers refuse a message",
        "whose `sender` is not the device its topic names. Clients may only write",
        "`jobs/submit` and read results. A result is believed only from the device that",
        "led the cluster in the result's epoch. On a broker without logins and ACL",
        "(tests, a bench) none of this is enforced, and every agent says so at start-up.",
        "",
        "| topic | QoS | retained | encoding | payload kinds | written by |",
        "|---|---|---|---|---|---|",
    ]
    for spec in CATALOGUE:
        kinds = ", ".join(f"`{kind.model_fields['kind'].default}`" for kind in spec.kinds)
        retained = "yes" if spec.retain else "no"
        lines.append(
            f"| `{spec.pattern}` | {spec.qos} | {retained} | {spec.encoding} | {kinds} "
            f"| {spec.writers} |"
        )
    for spec in CATALOGUE:
        lines += ["", f"## `{spec.pattern}`", "", spec.description, ""]
        most = spec.max_payload_bytes
        lines.append(
            f"Example: `{spec.filter(root)}` — QoS {spec.qos}, "
            f"{'retained' if spec.retain else 'not retained'}, {spec.encoding}"
            + (f", at most {most // _KIB} KiB." if most is not None else ".")
        )
        for kind in spec.kinds:
            tag = kind.model_fields["kind"].default
            doc = (kind.__doc__ or "").strip().splitlines()[0]
            lines += ["", f"### `{tag}` ({kind.__name__})", "", doc, ""]
            lines += _fields_table(kind)
    lines += ["", "## Nested objects"]
    for model in (DeviceCapabilities, LinkEstimate):
        doc = (model.__doc__ or "").strip().splitlines()[0]
        lines += ["", f"### {model.__name__}", "", doc, ""]
        lines += _fields_table(model)
    lines += ["", "`Plan`: see `broker/plan.py`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # regenerate the reference page
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    text = render_markdown()
    if target is None:
        sys.stdout.write(text)
    else:
        target.write_text(text)
