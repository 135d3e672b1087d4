"""Every candidate's record of the jobs the cluster owes an answer, for a failover.

A leader that dies takes its jobs with it. So every candidate, leader or not,
listens to `jobs/submit` and `results/+/+`: a submission enters the journal, a
result on its topic takes it out (and goes into the result cache, so a client
that re-submits a finished job id is answered from it, whoever computed it). A
candidate that becomes leader runs what is still in its journal, with each job's
deadline counted from when it was first heard — jobs submitted before and during
the failover are answered, without waiting for the clients to re-submit.
Any result answers a job, a `retryable` error too (the client decides whether to
re-submit; the coordinator then runs it again rather than repeat the error).

The journal is bounded (`jobs.journal_size`, oldest dropped first, counted) and
forgets jobs whose deadline has passed: a client has stopped waiting for those.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from edgedi.broker.messages import JobResult, JobSubmit
from edgedi.broker.ratelimit import RateLimitedLog

__all__ = ["LEADERS_REMEMBERED", "JobJournal", "JournalEntry", "remember_leader", "remember_result"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JournalEntry:
    submit: JobSubmit
    received_at: float
    """When this device last heard the job submitted, on its monotonic clock (the
    deadline counts from it; the client's `submitted_at` is another device's clock)."""
    deadline: float


class JobJournal:
    """Unanswered jobs in arrival order; see the module docstring."""

    def __init__(self, capacity: int, default_deadline_s: float) -> None:
        self.capacity = capacity
        self.default_deadline_s = default_deadline_s
        self.dropped = 0
        self._log = RateLimitedLog(logger)
        self._entries: OrderedDict[str, JournalEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def submitted(self, message: JobSubmit, now: float) -> None:
        """A job was submitted; a re-submission replaces the entry (its deadline is new)."""
        deadline_s = message.deadline_seconds or self.default_deadline_s
        self._entries[message.job_id] = JournalEntry(message, now, now + deadline_s)
        self._entries.move_to_end(message.job_id)
        while len(self._entries) > self.capacity:
            job_id, _ = self._entries.popitem(last=False)
            self.dropped += 1
            self._log.warning(
                "full", "journal full (%d jobs): forgot job %s", self.capacity, job_id
            )

    def answered(self, job_id: str) -> None:
        self._entries.pop(job_id, None)

    def pending(self, now: float) -> list[JournalEntry]:
        """The unanswered jobs still within their deadline, oldest first."""
        for job_id in [j for j, entry in self._entries.items() if entry.deadline <= now]:
            del self._entries[job_id]
        return list(self._entries.values())


def remember_result(cache: OrderedDict[str, JobResult], result: JobResult, capacity: int) -> None:
    """Put a result in a bounded LRU cache of results by job id."""
    cache[result.job_id] = result
    cache.move_to_end(result.job_id)
    while len(cache) > capacity:
        cache.popitem(last=False)


LEADERS_REMEMBERED = 64
"""Leader records remembered: results of older terms are long answered."""


def remember_leader(leaders: set[tuple[int, str]], epoch: int, device: str) -> None:
    """Note that `device` claimed `epoch` (bounded: the newest epochs are kept).

    Results are believed only from a device that led in their epoch: one that did
    not, or a forger, answers nothing. Two devices may claim one epoch at once
    (the election then keeps the better-ranked); both are remembered, as the loser
    may have answered a job before it stood down.
    """
    leaders.add((epoch, device))
    while len(leaders) > LEADERS_REMEMBERED:
        leaders.remove(min(leaders))
