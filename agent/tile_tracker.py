"""The leader's bookkeeping of tiles in flight, and of the devices it trusts with them.

Each tile of a relayed segment has a `TileRecord` of its copies in flight, so it can
be re-sent or duplicated. Every copy is *overdue* after `jobs.straggler_factor` ×
the plan's predicted time (at least `jobs.straggler_min_s`). The `TileTracker` keeps,
over all jobs of one coordinator:

- *suspects*: devices that left a tile overdue and have not answered since; new
  tiles go elsewhere until they answer again, restart (a new session) or
  `SUSPECT_S` pass, so a hung device costs one overdue wait, not one per segment;
- *probation*: a device that has not yet answered a tile (new, or a new session)
  gets one trial tile and no second until it answers or `SUSPECT_S` pass, so a
  ghost that announces itself and never computes costs one overdue wait per
  `SUSPECT_S`, however often it is born again. The trial is a relayed tile, never
  a direct run: only there is the newcomer's own time measured (and copied when
  overdue), so a device slower than it announced is learnt from its first job;
- how many speculative copies are out (`copies_out`), which bounds new ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from edgedi.agent.config import JobSettings
from edgedi.broker.messages import ReductionPartial, TileFailed, TileResult, TileTask

__all__ = ["SUSPECT_S", "TileRecord", "TileTracker", "from_a_copy"]

logger = logging.getLogger(__name__)

SUSPECT_S = 10.0
"""How long a device that left a tile overdue gets no new tiles, unless it answers."""


@dataclass
class TileRecord:
    """One tile of a job: its copies in flight, so it can be re-sent or duplicated.

    `running` maps each attempt still out to its device: the plan's first copy,
    re-sends after a failure or departure, and speculative copies of an overdue tile.
    The first valid result of any attempt completes the tile; later ones are dropped.
    """

    segment: int
    index: int
    task: TileTask
    """The copy sent last."""
    expected_s: float
    """The plan's predicted time from sending the tile to its output."""
    compute_s: float
    """The plan's predicted compute time on the planned device (0: none)."""
    planned_device: str
    first_sent_at: float
    sent_at: float
    overdue_at: float
    attempt: int = 0
    running: dict[int, str] = field(default_factory=dict)
    sent: dict[int, str] = field(default_factory=dict)
    """Every attempt ever sent, and its device: only they may answer."""
    failures: int = 0
    copies: int = 0
    done: bool = False
    first_attempt: int = 0
    """The plan's own copy (1 when the job fell back from the direct plane)."""

    @property
    def device(self) -> str:
        return self.task.device

    @property
    def tried(self) -> set[str]:
        """Devices that were ever sent a copy."""
        return set(self.sent.values())

    @property
    def devices(self) -> set[str]:
        """Devices that hold an unanswered copy of the tile."""
        return set() if self.done else set(self.running.values())


class TileTracker:
    """Suspects, probation and the copies out; see the module docstring."""

    def __init__(self, settings: JobSettings, *, proven: Collection[str] = ()) -> None:
        self.settings = settings
        # Devices with an overdue tile and no word since: new tiles go elsewhere until
        # they answer again (a hung device costs one overdue wait, not one per segment).
        self._suspect_since: dict[str, float] = {}
        # Probation: devices that have answered a tile, and when an unproven device
        # got its trial tile (no second one until it answers, or SUSPECT_S passes).
        # A new leader takes over the devices that have been working in their current
        # session for a while (`proven`): probation is for newcomers and ghosts, not
        # for a cluster that merely changed leaders.
        self._proven: set[str] = set(proven)
        self._trial_since: dict[str, float] = {}

    def suspect(self, device: str, now: float) -> None:
        """`device` left a tile overdue (from `now`, unless it is suspect already)."""
        self._suspect_since.setdefault(device, now)

    def unsuspect(self, device: str) -> None:
        """A new session of `device`, or it left: no longer suspect."""
        self._suspect_since.pop(device, None)

    def on_probation(self, device: str) -> None:
        """A new session of `device`: on probation again (a trial tile still out stays
        out: a re-birth earns no new one)."""
        self._proven.discard(device)

    def answered(self, device: str) -> None:
        """`device`, which held a copy, answered: neither suspect nor on probation."""
        if device in self._suspect_since:
            logger.info("%s answers again", device)
            del self._suspect_since[device]
        self.prove(device)

    def suspects(self) -> set[str]:
        """Devices that left a tile overdue lately and have not answered since, and
        devices on probation whose trial tile is out."""
        now = time.monotonic()
        for table in (self._suspect_since, self._trial_since):
            for device, since in list(table.items()):
                if now - since > SUSPECT_S:
                    del table[device]  # give it another chance
        return set(self._suspect_since) | set(self._trial_since)

    def on_trial(self, device: str) -> None:
        """`device` was just given a tile: if it is on probation, that was its trial."""
        if device not in self._proven:
            self._trial_since.setdefault(device, time.monotonic())

    def unproven(self, devices: Iterable[str]) -> set[str]:
        """Those of `devices` still on probation (they have not answered a tile)."""
        return {device for device in devices if device not in self._proven}

    def prove(self, device: str) -> None:
        """`device` answered: off probation."""
        if device not in self._proven:
            self._proven.add(device)
            self._trial_since.pop(device, None)

    def overdue_after(self, expected_s: float) -> float:
        """How long a copy of a tile may take before it counts as a straggler."""
        return max(self.settings.straggler_min_s, self.settings.straggler_factor * expected_s)

    def copies_out(self, records: Iterable[TileRecord], now: float) -> int:
        """Tiles of `records` (those of all jobs) whose latest speculative copy is
        unanswered but not yet overdue itself. A copy that is overdue too (lost to a
        broker restart, stuck) no longer counts, or lost copies would hold back the
        copies that replace them."""
        return sum(
            1
            for record in records
            if record.copies
            and not record.done
            and now - record.sent_at < self.overdue_after(record.expected_s)
        )


def from_a_copy(record: TileRecord, item: ReductionPartial | TileResult | TileFailed) -> bool:
    """Did the coordinator send this tile to the message's device (that attempt, if any)?"""
    if isinstance(item, ReductionPartial):
        return item.device in record.sent.values()
    return record.sent.get(item.attempt) == item.device
