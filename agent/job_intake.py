"""Job intake: what the leader keeps of each job it takes, and of the jobs it answered.

- `ResultCache`: the results of finished jobs, by job id (a bounded LRU, shared by
  the agent and its coordinators across leadership terms), so a resubmitted job is
  answered again instead of run twice;
- `RunNumbers`: this leader's run of each job id (bounded), so devices that
  cancelled a job's last run still take the tasks of its next;
- `Job`: one job in progress (its inbox of workers' messages, timings, tiles, trace);
- `CoordinatorStatistics`: the counts the coordinator keeps (metrics).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from edgedi.agent.journal import remember_result
from edgedi.agent.tile_tracker import TileRecord
from edgedi.broker.ids import DeviceId, JobId
from edgedi.broker.messages import (
    MAX_TRACE_SPANS,
    GateValue,
    JobResult,
    JobSpan,
    JobSubmit,
    ReductionPartial,
    SpanKind,
    TileFailed,
    TileResult,
)
from edgedi.broker.plan import Plan

__all__ = [
    "INBOX_SIZE",
    "CoordinatorStatistics",
    "DeviceLost",
    "Inbound",
    "Job",
    "Reconnected",
    "ResultCache",
    "RunNumbers",
    "unfinished_devices",
]

INBOX_SIZE = 4096
"""Messages waiting in one job's inbox; more are dropped (and counted)."""
_RUNS_MEMORY = 4096


class ResultCache:
    """Results of finished jobs by job id: a bounded LRU of `capacity` results."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._results: OrderedDict[str, JobResult] = OrderedDict()

    def __len__(self) -> int:
        return len(self._results)

    def get(self, job_id: str) -> JobResult | None:
        return self._results.get(job_id)

    def remember(self, result: JobResult) -> None:
        """Keep `result` as the newest (the oldest goes beyond `capacity`)."""
        remember_result(self._results, result, self.capacity)

    def touch(self, job_id: str) -> None:
        """The result of `job_id` was asked for again: the newest now."""
        self._results.move_to_end(job_id)

    def forget(self, job_id: str) -> None:
        self._results.pop(job_id, None)


class RunNumbers:
    """Runs of each job id, the newest `memory` job ids remembered: 0, then 1, ..."""

    def __init__(self, memory: int = _RUNS_MEMORY) -> None:
        self.memory = memory
        self._runs: OrderedDict[str, int] = OrderedDict()

    def next(self, job_id: str) -> int:
        run = self._runs.pop(job_id, -1) + 1
        self._runs[job_id] = run
        while len(self._runs) > self.memory:
            self._runs.popitem(last=False)
        return run


@dataclass(frozen=True)
class DeviceLost:
    """Internal inbox item: the device of an unfinished tile left the cluster."""

    job_id: str
    device: str


@dataclass(frozen=True)
class Reconnected:
    """Internal inbox item: the connection to the broker was lost and is back."""

    job_id: str


Inbound = ReductionPartial | TileResult | TileFailed | DeviceLost | Reconnected


@dataclass
class Job:
    submit: JobSubmit
    received_at: float
    deadline: float
    inbox: asyncio.Queue[Inbound]
    timings: dict[str, float] = field(default_factory=dict)
    tiles: dict[tuple[int, int], TileRecord] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)
    plan: Plan | None = None
    task: asyncio.Task[None] | None = None
    abandoned: bool = False
    gate_values: dict[tuple[int, int], GateValue] = field(default_factory=dict)
    """Combined gates of finished segments, for copies that reach them late."""
    attempt_base: int = 0
    """First attempt of the relayed tiles: 1 after the direct plane gave up."""
    direct_devices: set[str] = field(default_factory=set)
    """Devices holding direct tasks of the job while the direct plane runs."""
    direct_failed: set[str] = field(default_factory=set)
    """Devices that got direct tasks of a run that gave up: cancelled at the end."""
    run: int = 0
    """This coordinator's run of the job id (`TileTask.run`)."""
    trace_origin: float = field(default_factory=time.time)
    """Wall time the job's trace counts from (`JobSubmit.trace`): the devices' spans
    come stamped with their wall clocks."""
    trace_origin_monotonic: float = field(default_factory=time.monotonic)
    """The same moment on this device's monotonic clock, for the leader's own spans."""
    spans: list[JobSpan] = field(default_factory=list)
    compute_times: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per device, the plan's predicted and the measured compute time of its relayed
    tiles in this job, summed: learnt once per job (`Planning.observe_compute`)."""

    def add_compute(self, device: str, predicted_s: float, measured_s: float) -> None:
        predicted, measured = self.compute_times.get(device, (0.0, 0.0))
        self.compute_times[device] = (predicted + predicted_s, measured + measured_s)

    @property
    def job_id(self) -> JobId:
        return self.submit.job_id

    def span(
        self,
        device: str,
        what: SpanKind,
        start: float,
        end: float,
        segment: int | None = None,
        tile: int | None = None,
    ) -> None:
        """Record an interval of a traced job (wall times; nothing when not traced)."""
        if not self.submit.trace or len(self.spans) >= MAX_TRACE_SPANS:
            return
        self.spans.append(
            JobSpan(
                device=DeviceId(device),
                segment=segment,
                tile=tile,
                what=what,
                start_ms=(start - self.trace_origin) * 1000.0,
                end_ms=(max(start, end) - self.trace_origin) * 1000.0,
            )
        )

    def local_span(
        self,
        device: str,
        what: SpanKind,
        start: float,
        end: float,
        segment: int | None = None,
        tile: int | None = None,
    ) -> None:
        """`span` for the leader's own steps, timed on its monotonic clock."""
        shift = self.trace_origin - self.trace_origin_monotonic
        self.span(device, what, start + shift, end + shift, segment, tile)

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds * 1000.0


@dataclass
class CoordinatorStatistics:
    submitted: int = 0
    duplicates: int = 0
    completed: int = 0
    errors: int = 0
    refused: int = 0
    redispatched: int = 0
    speculative: int = 0
    speculation_held: int = 0
    dropped_messages: int = 0
    inbox_overflow: int = 0
    direct_fallbacks: int = 0


def unfinished_devices(job: Job) -> set[str]:
    """Devices that hold a copy of an unfinished tile of the job."""
    relayed = {device for record in job.tiles.values() for device in record.devices}
    return relayed | job.direct_devices
