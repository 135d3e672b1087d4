"""Electing the planner over the broker, fenced by epochs.

MQTT gives us no consensus, so the rules are deterministic and every agent applies
them to the same retained record (`planner/leader`) and membership table:

* Candidates are the alive devices whose birth says they may plan. Their rank is
  `(priority, device id)`; lower wins.
* A candidate claims leadership only when no alive leader exists and it is the
  best-ranked alive candidate; its claim takes the highest epoch seen plus one.
* A record beats another when its epoch is higher, or equal with a better rank.
  A claimant that sees a better record from an alive device stands down; a
  rightful leader that sees a worse record for its epoch publishes its own again
  (the broker's retained copy may be the loser's, if the loser wrote last).
* A better-ranked device that joins later does not take over: leadership changes
  only when the leader dies, so plans stay stable.
* Everything that carries an epoch (plans, tasks, gate values) from below the
  highest epoch seen is ignored, so a deposed leader can never act twice.
* A record is believed only while it names an alive candidate *of the session it
  carries*: one of a device's earlier session (a restart at the wrong moment), of
  a worker, of an unknown or dead device is no leader, and the best candidate
  claims over it. Whatever the retained record holds, the cluster elects.
* An epoch cannot be driven to the edge of its range: a record more than
  `MAX_EPOCH_STEP` above the highest epoch seen is ignored (a real cluster counts
  up by one), and the first record an agent sees must leave `EPOCH_HEADROOM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from edgedi.agent.membership import DeviceRecord
from edgedi.broker.messages import WIRE_INT_MAX

EPOCH_HEADROOM = 2**40
"""Epochs this close to the wire's bound are never believed: room for 2**40 terms."""
MAX_EPOCH_STEP = 2**20
"""Largest jump above the highest epoch seen that a record may make (an agent away
through a million elections would miss nothing it could act on anyway)."""


@dataclass(frozen=True, order=True)
class LeaderClaim:
    epoch: int
    priority: int
    device: str
    session: int = 0

    def beats(self, other: LeaderClaim | None) -> bool:
        if other is None:
            return True
        if self.epoch != other.epoch:
            return self.epoch > other.epoch
        return (self.priority, self.device) < (other.priority, other.device)


class Decision(Enum):
    FOLLOW = "follow"  # someone else leads (or nobody yet, and it is not our turn)
    CLAIM = "claim"  # publish a new record with a higher epoch
    LEAD = "lead"  # we are the leader and the record says so
    REASSERT = "reassert"  # we lead, but the retained record is a worse one: publish ours


def best_candidate(alive: list[DeviceRecord]) -> DeviceRecord | None:
    candidates = [r for r in alive if r.candidate]
    return min(candidates, key=lambda r: (r.priority, r.device), default=None)


@dataclass
class Election:
    """One device's view of the election; feed it records, ask it what to do."""

    device: str
    priority: int
    candidate: bool
    session: int = 0
    current: LeaderClaim | None = None  # the best record seen in the current epoch
    highest_epoch: int = 0
    my_claim: LeaderClaim | None = None
    contested: bool = False
    """A worse record arrived while we lead: it may now be the retained one."""

    def plausible(self, epoch: int) -> bool:
        """Could a real term have this epoch? (Near the wire's bound no claim could
        follow it; far above what we have seen, it would spend the range.)"""
        if self.highest_epoch == 0:  # the first record this agent sees
            return epoch <= WIRE_INT_MAX - EPOCH_HEADROOM
        return epoch < WIRE_INT_MAX and epoch <= self.highest_epoch + MAX_EPOCH_STEP

    def observe(self, claim: LeaderClaim) -> bool:
        """A record arrived on planner/leader (retained or live); False: ignored as
        forged or corrupt (`plausible`)."""
        if not self.plausible(claim.epoch):
            return False
        self.highest_epoch = max(self.highest_epoch, claim.epoch)
        if claim.beats(self.current):
            self.current = claim
        if self.my_claim is not None and claim.beats(self.my_claim):
            self.my_claim = None  # stand down
        elif self.my_claim is not None and claim != self.my_claim:
            # Two candidates claimed at once and the loser wrote last: the broker now
            # retains its record, which newcomers would believe. Say ours again.
            self.contested = True
        return True

    @property
    def leader(self) -> str | None:
        return self.current.device if self.current else None

    @property
    def epoch(self) -> int:
        return self.current.epoch if self.current else 0

    def is_leader(self) -> bool:
        return self.my_claim is not None and self.my_claim == self.current

    def decide(self, alive: list[DeviceRecord]) -> Decision:
        sessions = {r.device: r.session for r in alive if r.candidate}
        if self.my_claim is not None:
            if self.current is not None and self.current != self.my_claim:
                if self.my_claim.beats(self.current):
                    return Decision.REASSERT
                self.my_claim = None
            elif self.contested:
                self.contested = False
                return Decision.REASSERT
            else:
                return Decision.LEAD
        current = self.current
        if current is not None and sessions.get(current.device) == current.session:
            if current.device == self.device and current.session == self.session:
                # Our own record from this session (e.g. after a reconnect): keep leading.
                self.my_claim = current
                return Decision.LEAD
            if current.device != self.device:
                return Decision.FOLLOW
        if not self.candidate:
            return Decision.FOLLOW
        best = best_candidate(alive)
        if best is None or best.device != self.device:
            return Decision.FOLLOW
        return Decision.CLAIM

    def make_claim(self) -> LeaderClaim:
        claim = LeaderClaim(self.highest_epoch + 1, self.priority, self.device, self.session)
        self.my_claim = claim
        self.observe(claim)
        return claim

    def accepts_epoch(self, epoch: int) -> bool:
        """Messages stamped with an older epoch come from a deposed leader."""
        return epoch >= self.highest_epoch
