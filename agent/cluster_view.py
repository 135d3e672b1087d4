"""A cluster as an observer sees it on the broker: devices, leader and plan.

Built only from what agents publish (births, states, heartbeats, the leader record
and the plan, most of them retained), so `edgedi status`, `edgedi watch`, the demo's
readiness check and the tests all read the cluster the same way, without being a
member of it. `ClusterView.apply` takes one message and returns the changes it
made as readable lines, so `watch` prints what changed and nothing else (a
re-published retained record that says nothing new prints nothing).

A device's state counts only when it belongs to the device's latest birth: a
state of another session is a late Will of an older connection (Sparkplug's rule,
as in `edgedi.agent.membership`).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from edgedi.broker.connection import MqttSession, Received
from edgedi.broker.messages import (
    DeviceBirth,
    DeviceState,
    Heartbeat,
    LeaderRecord,
    PlanAnnouncement,
    WireMessage,
)
from edgedi.broker.plan import Plan
from edgedi.broker.topics import (
    DEVICE_BIRTH,
    DEVICE_HEARTBEAT,
    DEVICE_STATE,
    PLAN_CURRENT,
    PLANNER_LEADER,
)

__all__ = [
    "ClusterView",
    "DeviceView",
    "describe_plan",
    "plan_headline",
    "subscribe_view",
]


@dataclass
class DeviceView:
    """What is known of one device."""

    device: str
    birth: DeviceBirth | None = None
    state: DeviceState | None = None
    heartbeat: Heartbeat | None = None
    heartbeat_at: float | None = None

    @property
    def session(self) -> int | None:
        if self.birth is not None:
            return self.birth.session
        return self.state.session if self.state is not None else None

    @property
    def status(self) -> str:
        """online / offline / stopped from the current session's state; `unknown` without one."""
        if self.state is None or self.state.session != self.session:
            return "unknown"
        return self.state.status

    def to_json(self) -> dict[str, Any]:
        birth = self.birth
        capabilities = birth.capabilities if birth is not None else None
        beat = self.heartbeat if self.heartbeat and self.heartbeat.session == self.session else None
        return {
            "device": self.device,
            "status": self.status,
            "session": self.session,
            "candidate": birth.candidate if birth is not None else None,
            "priority": birth.priority if birth is not None else None,
            "cores": capabilities.cores if capabilities is not None else None,
            "memory_bytes": capabilities.memory_bytes if capabilities is not None else None,
            "models": list(capabilities.models) if capabilities is not None else [],
            "software_version": capabilities.software_version if capabilities else None,
            "torch_version": capabilities.torch_version if capabilities else None,
            "load": beat.load if beat is not None else None,
            "busy_tiles": beat.busy_tiles if beat is not None else None,
            # The device's own estimate from its heartbeat round trips with the leader.
            "clock_offset_s": beat.clock_offset_s if beat is not None else None,
        }


@dataclass
class ClusterView:
    """Devices, leader and plan of one cluster, from the messages applied so far."""

    devices: dict[str, DeviceView] = field(default_factory=dict)
    leader: LeaderRecord | None = None
    plan: PlanAnnouncement | None = None

    def _device(self, device: str) -> DeviceView:
        view = self.devices.get(device)
        if view is None:
            view = self.devices[device] = DeviceView(device)
        return view

    def apply(self, message: WireMessage, now: float | None = None) -> list[str]:
        """Take one message; the lines describe what changed (empty: nothing new)."""
        now = time.monotonic() if now is None else now
        if isinstance(message, DeviceBirth):
            return self._on_birth(message)
        if isinstance(message, DeviceState):
            return self._on_state(message)
        if isinstance(message, Heartbeat):
            view = self._device(message.device)
            if view.session is None or message.session >= view.session:
                view.heartbeat, view.heartbeat_at = message, now
            return []
        if isinstance(message, LeaderRecord):
            return self._on_leader(message)
        if isinstance(message, PlanAnnouncement):
            return self._on_plan(message)
        return []

    def _on_birth(self, birth: DeviceBirth) -> list[str]:
        view = self._device(birth.device)
        known = view.birth
        if known is not None and birth.session < known.session:
            return []  # a retained birth of an older session
        view.birth = birth
        if known is not None and known.session == birth.session:
            return []  # re-announced (reconnect or rebirth): nothing new
        capabilities = birth.capabilities
        role = "candidate" if birth.candidate else "worker only"
        if birth.candidate and birth.priority:
            role += f" (priority {birth.priority})"
        return [
            f"birth   {birth.device}: session {birth.session}, {capabilities.cores} core(s), "
            f"{role}, models {', '.join(capabilities.models) or '-'}"
        ]

    def _on_state(self, state: DeviceState) -> list[str]:
        view = self._device(state.device)
        session = view.session
        if session is not None and state.session < session:
            return [
                f"state   {state.device}: ignored a late {state.status} of old session "
                f"{state.session}"
            ]
        before = view.status
        view.state = state
        if view.status == before:
            return []
        return [f"state   {state.device}: {view.status} (session {state.session})"]

    def _on_leader(self, record: LeaderRecord) -> list[str]:
        current = self.leader
        if current is not None and (record.epoch, record.device) == (current.epoch, current.device):
            self.leader = record
            return []
        if current is not None and record.epoch < current.epoch:
            return []
        self.leader = record
        return [f"leader  {record.device} (epoch {record.epoch})"]

    def _on_plan(self, announcement: PlanAnnouncement) -> list[str]:
        current = self.plan
        if current is not None and announcement.epoch < current.epoch:
            return []
        if current is not None and current.plan.plan_id == announcement.plan.plan_id:
            return []
        self.plan = announcement
        return [f"plan    {plan_headline(announcement.plan)}"]

    # --- queries ----------------------------------------------------------------------

    def online(self) -> list[str]:
        """Devices whose current session says online, in id order."""
        return sorted(d for d, view in self.devices.items() if view.status == "online")

    def missing_for(self, expected: Collection[str]) -> list[str]:
        """What is still missing before `expected` devices form a planned cluster.

        Empty when every expected device is online, a leader among them is recorded,
        and the plan in force is of the leader's epoch and uses exactly these devices.
        """
        problems = []
        online = set(self.online())
        absent = sorted(set(expected) - online)
        if absent:
            problems.append(f"not online yet: {', '.join(absent)}")
        leader = self.leader
        if leader is None or leader.device not in online:
            problems.append("no leader elected yet")
        plan = self.plan
        if plan is None:
            problems.append("no plan published yet")
        elif leader is not None and plan.epoch < leader.epoch:
            problems.append(f"the plan is of epoch {plan.epoch}, the leader's is {leader.epoch}")
        elif set(plan.plan.devices) != set(expected):
            problems.append(
                f"the plan was made for {', '.join(plan.plan.devices)}, not all of "
                f"{', '.join(sorted(expected))}"
            )
        return problems

    def to_json(self) -> dict[str, Any]:
        leader = self.leader
        plan = self.plan
        return {
            "devices": [self.devices[d].to_json() for d in sorted(self.devices)],
            "leader": (
                {"device": leader.device, "epoch": leader.epoch, "session": leader.session}
                if leader is not None
                else None
            ),
            "plan": plan.plan.to_wire() if plan is not None else None,
        }


async def subscribe_view(
    session: MqttSession, view: ClusterView, *, heartbeats: bool = False, on_lines: Any = None
) -> None:
    """Feed `view` from `session` (births, states, leader, plan; heartbeats if asked).

    `on_lines`, if given, is called with the lines each message produced (non-empty only).
    """

    async def handle(received: Received) -> None:
        lines = view.apply(received.message)
        if lines and on_lines is not None:
            on_lines(lines)

    for spec in (DEVICE_BIRTH, DEVICE_STATE, PLANNER_LEADER, PLAN_CURRENT):
        await session.subscribe(spec, handle)
    if heartbeats:
        await session.subscribe(DEVICE_HEARTBEAT, handle)


# --- plans in words ---------------------------------------------------------------------


def plan_headline(plan: Plan) -> str:
    """One line: id, epoch, strategy, shape of the work, predicted latency."""
    if plan.mode == "images":
        shape = f"whole images over {len(plan.images)} device(s)"
    else:
        shape = f"{len(plan.segments)} segment(s) over {', '.join(plan.devices_used)}"
    return (
        f"{plan.plan_id[:8]} (epoch {plan.epoch}): {plan.strategy}, {plan.model} "
        f"{plan.input_shape[1]}x{plan.input_shape[2]}, {shape}, leader {plan.leader}, "
        f"predicted {plan.predicted_latency_s * 1000:.1f} ms"
    )


def _interval(interval: tuple[int, int]) -> str:
    return f"{interval[0]}-{interval[1]}"


def describe_plan(plan: Plan, indent: str = "  ") -> list[str]:
    """The plan in a few lines: per segment, which device computes which rows."""
    lines = [
        f"plan {plan.plan_id[:8]} (epoch {plan.epoch}) by {plan.leader}: strategy {plan.strategy}, "
        f"model {plan.model} at {plan.input_shape[1]}x{plan.input_shape[2]}",
    ]
    if plan.mode == "images":
        for share in plan.images:
            lines.append(
                f"{indent}{share.device}: {share.share * 100:.0f}% of the images, "
                f"predicted {share.latency_s * 1000:.1f} ms each"
            )
    for position, segment in enumerate(plan.segments):
        gates = f", {segment.reductions} gate round(s)" if segment.reductions else ""
        if segment.channel_split:
            gates = f", split by channels, {segment.reductions} exchange(s)"
        parts = []
        for part in segment.parts:
            if part.empty:
                continue
            where = f"rows {_interval(part.rows)}"
            if part.channels is not None:
                where = f"channels {_interval(part.channels)} (sends rows {_interval(part.rows)})"
            if part.cols is not None and part.cols != (0, segment.out_width):
                where += f" x cols {_interval(part.cols)}"
            parts.append(f"{part.device} {where}")
        lines.append(
            f"{indent}segment {position + 1}: units {segment.first_unit}-{segment.last_unit}"
            f"{gates}, output {segment.out_height}x{segment.out_width}, predicted "
            f"{segment.predicted.total_s * 1000:.1f} ms: {'; '.join(parts)}"
        )
    lines.append(
        f"{indent}tail (pool + classifier) on {plan.tail_device}; predicted latency "
        f"{plan.predicted_latency_s * 1000:.1f} ms, {plan.predicted_bytes / 1e6:.2f} MB moved"
    )
    return lines
