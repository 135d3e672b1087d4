"""Who this agent is on the broker: its session counter, and that nobody else is it.

**Sessions.** Every start of the agent is a new session, numbered by a counter kept
in the device's state directory (as Sparkplug's bdSeq), never by the clock: a
Raspberry Pi without a real-time clock may start with a time earlier than its last
run. The counter also climbs above any session of this id still retained on the
broker, so a device whose state directory was wiped (a re-flashed card) is not
taken for an older session of itself.

**Duplicate ids.** Boards cloned from one SD card share a device id. Before an
agent announces anything it listens, for `IDENTITY_CHECK_S`, to the records of its
own id, on an MQTT connection of its own with no Will and a client id of its own
(so it can neither evict the running agent nor leave a state behind): a heartbeat
of its id means another agent holds it. The newcomer then stops with
`DuplicateDevice`, and the CLI exits with `EXIT_DUPLICATE_ID`, which the systemd
unit does not restart (`RestartPreventExitStatus=`). The running agent never
notices. Two agents that start at the same moment see each other only later, by
their heartbeats: `loses_to` decides, the same way on both, which one stops.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from edgedi.broker.messages import DeviceBirth, DeviceState, Heartbeat, WireMessage

__all__ = [
    "EXIT_DUPLICATE_ID",
    "IDENTITY_CHECK_S",
    "DuplicateDevice",
    "IdentityCheck",
    "loses_to",
    "new_instance",
    "next_session",
]

logger = logging.getLogger(__name__)

EXIT_DUPLICATE_ID = 78
"""The agent's exit status when its id is taken (sysexits' EX_CONFIG: a
configuration error, which a restart cannot fix)."""

# Heartbeats come every second: two periods always hold one from a live holder.
IDENTITY_CHECK_S = 2.0

SESSION_FILE = "session"


class DuplicateDevice(Exception):
    """Another live agent uses this device id; the message says which session."""


def new_instance() -> str:
    """A random name for this process, to tell it from another agent of the same id."""
    return uuid.uuid4().hex[:12]


def next_session(state_dir: Path | None, at_least: int = 1) -> int:
    """The next session number: one above the stored one and at least `at_least`;
    stored before it is used. Without a state directory only `at_least` counts."""
    stored = 0
    path = state_dir / SESSION_FILE if state_dir is not None else None
    if path is not None:
        try:
            stored = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as error:
            logger.warning("session counter %s unreadable (%s); starting over", path, error)
    session = max(stored + 1, at_least, 1)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            with partial.open("w") as file:
                file.write(f"{session}\n")
                file.flush()
                os.fsync(file.fileno())
            partial.replace(path)  # a power cut leaves the old number or the new one
        except OSError as error:
            logger.warning("could not store the session counter in %s: %s", path, error)
    return session


@dataclass
class IdentityCheck:
    """What the records of our own id say, before we announce ourselves."""

    device: str
    highest_session: int = 0
    """The highest session of this id the broker still holds (retained) or sends."""
    holder: Heartbeat | None = None
    """A heartbeat of this id: another agent is alive with it."""

    def observe(self, message: WireMessage) -> None:
        if not isinstance(message, DeviceBirth | DeviceState | Heartbeat):
            return
        if message.device != self.device:
            return
        self.highest_session = max(self.highest_session, message.session)
        if isinstance(message, Heartbeat) and self.holder is None:
            self.holder = message

    def problem(self) -> str | None:
        holder = self.holder
        if holder is None:
            return None
        return (
            f"device id {self.device} is already in use: an agent of session "
            f"{holder.session} is alive with it (heartbeating). This agent stops; the one "
            f"running keeps running. Give every device a unique device_id."
        )


def loses_to(mine: tuple[int, str], other: Heartbeat) -> bool:
    """Two agents of one id both running: does the one with (session, instance)
    `mine` stop for `other`? The lower (session, instance) stops, the same answer on
    both sides; the survivor's session is the higher, so the cluster keeps it."""
    theirs = (other.session, other.instance or "")
    return theirs > mine
