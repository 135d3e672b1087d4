"""Who is in the cluster: a pure table built from births, states and heartbeats.

Sparkplug's session idea keeps it honest: every connection of a device has a
session counter, carried by its birth, its `online` state and its Last Will. A
death (Will or state) whose session is older than the device's latest birth is a
late message from a previous connection and never evicts the live device.

A device is *alive* when its latest state for its current session is `online`
and its last heartbeat (or, before the first one, its birth) is recent. The heartbeat
check catches a device whose network went silent before the broker's keepalive
notices (that takes 1.5 keepalives).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

DeviceStatus = Literal["online", "offline", "stopped"]

# Heartbeats every second; three missed ones mark a device silent. Short, because
# a silent worker holds up every job that has a tile on it.
HEARTBEAT_PERIOD_S = 1.0
SILENT_AFTER_S = 3.0
# The table holds at most this many devices: births under made-up ids (a flood, a
# misconfigured fleet) replace long-gone devices, never live ones.
MAX_DEVICES = 1024


@dataclass(frozen=True)
class DeviceRecord:
    device: str
    session: int
    status: DeviceStatus = "online"
    candidate: bool = False
    priority: int = 0
    capabilities: dict[str, Any] = field(default_factory=dict)
    born_at: float = 0.0
    last_heartbeat: float | None = None
    session_since: float = 0.0
    """When this session was first heard of (a re-announced birth keeps it)."""


@dataclass(frozen=True)
class MembershipChange:
    joined: tuple[str, ...] = ()
    left: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.joined or self.left)


class Membership:
    """The device table. Methods take `now` explicitly, so tests need no clock."""

    def __init__(
        self, silent_after_s: float = SILENT_AFTER_S, max_devices: int = MAX_DEVICES
    ) -> None:
        self._devices: dict[str, DeviceRecord] = {}
        self._silent_after_s = silent_after_s
        self._max_devices = max_devices
        self._alive_before: frozenset[str] = frozenset()
        self.refused = 0
        """Births and states of new devices turned away because the table was full."""

    def _make_room(self, now: float) -> bool:
        """Room for one more device: forget the longest-gone one if the table is full."""
        if len(self._devices) < self._max_devices:
            return True
        gone = [r for d, r in self._devices.items() if not self.is_alive(d, now)]
        if not gone:
            self.refused += 1
            return False
        oldest = min(
            gone, key=lambda r: r.born_at if r.last_heartbeat is None else r.last_heartbeat
        )
        del self._devices[oldest.device]
        return True

    def __contains__(self, device: object) -> bool:
        return device in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def birth(
        self,
        device: str,
        session: int,
        *,
        candidate: bool,
        priority: int = 0,
        capabilities: dict[str, Any] | None = None,
        now: float,
    ) -> None:
        current = self._devices.get(device)
        if current is not None and session < current.session:
            return  # a retained birth of an older session
        if current is None and not self._make_room(now):
            return
        status: DeviceStatus = "online"
        heartbeat = None
        since = now
        if current is not None and session == current.session:
            status, heartbeat = current.status, current.last_heartbeat
            since = current.session_since
        self._devices[device] = DeviceRecord(
            device=device,
            session=session,
            status=status,
            candidate=candidate,
            priority=priority,
            capabilities=dict(capabilities or {}),
            born_at=now,
            last_heartbeat=heartbeat,
            session_since=since,
        )

    def state(self, device: str, session: int, status: DeviceStatus, *, now: float) -> bool:
        """Apply a state message; returns False when it was stale and ignored."""
        current = self._devices.get(device)
        if current is None:
            if status != "online" or not self._make_room(now):
                return False
            # State before birth (retained order is not guaranteed): remember the session.
            self._devices[device] = DeviceRecord(
                device=device, session=session, born_at=now, session_since=now
            )
            return True
        if session < current.session:
            return False
        if session > current.session:
            # A newer connection's state arrived before its birth.
            self._devices[device] = replace(
                current, session=session, status=status, last_heartbeat=None, session_since=now
            )
            return True
        self._devices[device] = replace(current, status=status)
        return True

    def heartbeat(self, device: str, session: int, *, now: float) -> None:
        current = self._devices.get(device)
        if current is None or session != current.session:
            return
        self._devices[device] = replace(current, last_heartbeat=now)

    def forget(self, device: str) -> None:
        self._devices.pop(device, None)

    def is_alive(self, device: str, now: float) -> bool:
        record = self._devices.get(device)
        if record is None or record.status != "online":
            return False
        # Until its first heartbeat, a device counts from when we saw its birth, so a
        # retained record of a device that vanished without a Will expires too.
        reference = record.born_at if record.last_heartbeat is None else record.last_heartbeat
        return now - reference <= self._silent_after_s

    def alive(self, now: float) -> list[DeviceRecord]:
        """Alive devices in device-id order (stable plans and election)."""
        return [r for d, r in sorted(self._devices.items()) if self.is_alive(d, now)]

    def get(self, device: str) -> DeviceRecord | None:
        return self._devices.get(device)

    def records(self) -> Iterable[DeviceRecord]:
        return list(self._devices.values())

    def changes(self, now: float) -> MembershipChange:
        """What joined or left since the last call (the planner re-plans on a change)."""
        alive = frozenset(r.device for r in self.alive(now))
        change = MembershipChange(
            joined=tuple(sorted(alive - self._alive_before)),
            left=tuple(sorted(self._alive_before - alive)),
        )
        self._alive_before = alive
        return change
