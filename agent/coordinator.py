"""The leader's job coordinator: one owned coroutine per job, from submission to result.

A job arrives on `jobs/submit`. Submission is idempotent by job id: a job in
progress is not started twice, and a finished one gets its cached result
re-published (a bounded LRU). Up to `jobs.max_in_flight` jobs run at once; up to
`jobs.max_queued` more wait for a slot; beyond that a job is refused with an error
result. Every job ends with exactly one `JobResult` on `results/<job_id>/<leader>`: ok, or
an explicit error (unknown model, bad image, no workers, a tile that failed on
every device it was tried on, deadline exceeded, leadership lost).

A row-strip plan runs first on the direct data plane (`edgedi.agent.direct`, on
unless `jobs.direct` is off): every device gets all of its tasks at once, devices
exchange gate partials and segment boundaries among themselves, and only the last
segment's results come back here. A device of the plan gone or suspect, a failed
tile, a departure or an overdue job makes the coordinator give up on that run and
run the job through the relayed path below, from the first segment, with attempt
numbers that supersede the direct tasks.

On the relayed path, per job and per plan segment, the coordinator

1. scatters one self-contained `TileTask` per tile (the tile's input rows ×
   columns of the current map, halo included) to the device the plan names;
2. gathers each attention gate's `ReductionPartial`s and, once every tile's is
   in, publishes the exact combined mean as a `GateValue`;
3. gathers the `TileResult`s and stitches the segment's output, the next input.

The tail (global pooling and head) runs on the leader; when it starts with a
global average pool it is fed the pooled mean of the last segment's tiles, as
`edgedi.models.tiling.run_partitioned` does. `images` plans go through the same
machinery as a single segment with a single tile; each goes to a device that
holds fewer than two images, or else finishes first (`_next_image_device`).

Each tile has a record of its copies in flight. A copy that fails, or whose device
leaves the cluster, is re-sent unchanged (attempt + 1) to another alive device
that holds the model, up to `jobs.tile_attempts` failures. Every tile is also
*overdue* after `jobs.straggler_factor` × the plan's predicted time (at least
`jobs.straggler_min_s`): a straggler — slow, stalled, or its messages lost to a
broker restart — gets a speculative copy on the least loaded other device (up to
`jobs.speculative_copies`; no more tiles with a copy out over all jobs than there
are alive devices, so an overloaded cluster is not loaded further), and the first
valid result wins. A tile that has given its partial for the gate being combined
only waits for the others and is left alone. The straggler's device is then
*suspect*: new tiles go elsewhere until it answers again, restarts (a new session)
or 10 s have passed, so a hung device costs one overdue wait, not one per
segment. A device that has not yet answered a tile (new, or a new session) is on
*probation*: it gets one trial tile (or one direct run) and no second until it
answers or 10 s have passed, so a ghost that announces itself and never computes
costs one overdue wait per 10 s, however often it is born again. A gate that was
already combined is re-sent to any late copy. Measured tile times go back to
`Planning.observe_tile`, so the next plan fits the devices as they are.

Errors say whether they are `retryable` (the cluster's state: no workers, a tile
lost, the deadline) or final (bad input, unknown model). A job that a stopping
coordinator leaves unfinished is not answered when another candidate is alive:
that one has it in its journal (`edgedi.agent.journal`) and runs it as leader.

All torch work (normalising the image, the tail) runs on the device's compute
thread through `CoordinatorLinks.compute`, an `images` plan's on a thread of its
own (`_leader_step`); the loop only slices and stitches numpy arrays. Every wait is
bounded by the job's deadline.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from edgedi.agent.config import JobSettings
from edgedi.agent.direct import direct_tasks, supports_direct
from edgedi.agent.journal import remember_result
from edgedi.agent.layout import (
    LayoutError,
    SegmentLayout,
    TileAssignment,
    plan_segment_layout,
    segment_layout,
)
from edgedi.agent.model_store import HeldModel, ModelNotHeld, ModelStore
from edgedi.agent.planning import Planning, PlanningError
from edgedi.broker.errors import BrokerError
from edgedi.broker.ids import DeviceId, JobId
from edgedi.broker.messages import (
    MAX_TRACE_SPANS,
    CancelJob,
    GateValue,
    JobResult,
    JobSpan,
    JobSubmit,
    ReductionPartial,
    SpanKind,
    TileFailed,
    TileResult,
    TileTask,
    TileTrace,
    new_message_id,
)
from edgedi.broker.plan import Plan
from edgedi.broker.ratelimit import RateLimitedLog
from edgedi.broker.tensors import Tensor
from edgedi.models.data import CLASSES
from edgedi.models.head_split import tail_from_head_partials
from edgedi.models.tiling import run_tail
from edgedi.models.training import normalize
from edgedi.models.units import splittable_head

__all__ = ["Coordinator", "CoordinatorLinks", "CoordinatorStatistics", "TileRecord"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_IMAGE_DTYPES = ("uint8", "float32", "float64")
_RUNS_MEMORY = 4096
_REPLAY_KINDS: dict[str, SpanKind] = {"compute": "compute", "send": "send"}
_TILE_DTYPES = ("float32", "float16")
_INBOX_SIZE = 4096
# Publishing an error result while shutting down must not hang the shutdown.
_FINAL_PUBLISH_TIMEOUT_S = 2.0
# How long a device that left a tile overdue gets no new tiles, unless it answers.
_SUSPECT_S = 10.0
# `images` plans: whole images each device should hold, the one it computes and the
# next, before any device gets a third.
_IMAGES_IN_HAND = 2


class CoordinatorLinks(Protocol):
    """How the coordinator reaches devices, clients and the compute thread."""

    async def send_task(self, task: TileTask) -> None: ...

    async def send_gate(self, message: GateValue, devices: Collection[str]) -> None: ...

    async def send_cancel(self, device: str, message: CancelJob) -> None: ...

    async def send_result(self, result: JobResult) -> None: ...

    async def compute(self, function: Callable[[], T]) -> T: ...


class JobFailed(Exception):
    """The job cannot complete; the message becomes the error result's text.

    `permanent` errors (bad input, unknown model) are answered from the result cache
    when the job is resubmitted; a transient one (no workers, tiles lost, deadline)
    is run again, since the cluster may have recovered since.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


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


@dataclass(frozen=True)
class _DeviceLost:
    """Internal inbox item: the device of an unfinished tile left the cluster."""

    job_id: str
    device: str


@dataclass(frozen=True)
class _Reconnected:
    """Internal inbox item: the connection to the broker was lost and is back."""

    job_id: str


_Inbound = ReductionPartial | TileResult | TileFailed | _DeviceLost | _Reconnected


@dataclass
class _SegmentState:
    """What the coordinator gathers while one segment of a job runs."""

    layout: SegmentLayout
    position: int
    partials: list[dict[int, ReductionPartial]] = field(init=False)
    first_partial: list[float | None] = field(init=False)
    gates: dict[int, GateValue] = field(default_factory=dict)
    unsent_gates: set[int] = field(default_factory=set)
    outputs: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict)
    worker_compute: float = 0.0

    def __post_init__(self) -> None:
        self.partials = [{} for _ in self.layout.gates]
        self.first_partial = [None] * len(self.layout.gates)


@dataclass
class _Job:
    submit: JobSubmit
    received_at: float
    deadline: float
    inbox: asyncio.Queue[_Inbound]
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


class Coordinator:
    """Runs the jobs while this device leads `epoch`; see the module docstring."""

    def __init__(
        self,
        device_id: str,
        epoch: int,
        store: ModelStore,
        planning: Planning,
        links: CoordinatorLinks,
        settings: JobSettings,
        *,
        alive_devices: Callable[[], Collection[str]],
        results: OrderedDict[str, JobResult] | None = None,
        successor: Callable[[], bool] = lambda: False,
        on_finished: Callable[[JobResult], None] | None = None,
        proven: Collection[str] = (),
    ) -> None:
        self.device_id = DeviceId(device_id)
        self.epoch = epoch
        self.store = store
        self.planning = planning
        self.links = links
        self.settings = settings
        self.alive_devices = alive_devices
        # True when another candidate is alive: it has every unanswered job in its
        # journal and takes over what this coordinator leaves unfinished.
        self.successor = successor
        self.statistics = CoordinatorStatistics()
        # Told once per job this coordinator ran to its end (metrics, the last result):
        # not for a resubmitted job answered from the cache.
        self.on_finished = on_finished
        # Shared across leadership terms of this agent, so a retry after a re-election
        # by the same device still finds the result.
        self._results: OrderedDict[str, JobResult] = (
            results if results is not None else (OrderedDict())
        )
        self._jobs: dict[str, _Job] = {}
        # Runs of each job id (bounded): a resubmitted job gets the next, so devices
        # that cancelled the last run still take its tasks.
        self._runs: OrderedDict[str, int] = OrderedDict()
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._group: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._drain_s = 0.0
        self._round_robin: dict[str, dict[str, float]] = {}
        # Jobs handed over before `run()` started (a new leader's journal).
        self._backlog: list[tuple[JobSubmit, float | None]] = []
        # Devices with an overdue tile and no word since: new tiles go elsewhere until
        # they answer again (a hung device costs one overdue wait, not one per segment).
        self._suspect_since: dict[str, float] = {}
        # Probation: devices that have answered a tile, and when an unproven device
        # got its trial tile (no second one until it answers, or _SUSPECT_S passes).
        # A new leader takes over the devices that have been working in their current
        # session for a while (`proven`): probation is for newcomers and ghosts, not
        # for a cluster that merely changed leaders.
        self._proven: set[str] = {self.device_id, *proven}
        self._trial_since: dict[str, float] = {}
        self._log = RateLimitedLog(logger)

    # --- lifecycle ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def owns(self, job_id: str) -> bool:
        return job_id in self._jobs

    async def run(self) -> None:
        """Coordinate until `stop()`; then let jobs finish for a while and end the rest."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            backlog, self._backlog = self._backlog, []
            for message, received_at in backlog:
                self.submit(message, received_at=received_at)
            await self._stop.wait()
            self._stopping = True
            if self._jobs and self._drain_s > 0:
                pending = [job.task for job in self._jobs.values() if job.task is not None]
                await asyncio.wait(pending, timeout=self._drain_s)
            for job in list(self._jobs.values()):
                if job.task is not None:
                    job.task.cancel()
        self._group = None

    def stop(self, drain_s: float = 0.0) -> None:
        """Take no new jobs; give the running ones `drain_s` seconds, then end them."""
        self._drain_s = drain_s
        self._stop.set()

    # --- incoming -------------------------------------------------------------------

    def submit(self, message: JobSubmit, *, received_at: float | None = None) -> None:
        """A job from `jobs/submit`, or one taken over from the journal (never blocks).

        `received_at` (this device's monotonic clock) is when the job first reached this
        device; its deadline counts from then.
        """
        group = self._group
        if self._stopping:
            logger.info("not taking job %s: the coordinator is stopping", message.job_id)
            return
        if group is None:
            capacity = self.settings.max_in_flight + self.settings.max_queued
            if len(self._backlog) < capacity:
                self._backlog.append((message, received_at))
            return
        job_id = message.job_id
        cached = self._results.get(job_id)
        if cached is not None and cached.retryable:
            # Failed for a reason of the cluster's state, which may have passed: run again.
            del self._results[job_id]
            cached = None
        if cached is not None:
            self._results.move_to_end(job_id)
            self.statistics.duplicates += 1
            logger.info("job %s was resubmitted: publishing its result again", job_id)
            again = cached
            if (cached.sender, cached.epoch) != (self.device_id, self.epoch):
                # A predecessor's answer, said again by the leader in force, which
                # vouches for it: a client that never saw the leader of the original
                # epoch believes only a result from the one it knows.
                again = cached.model_copy(
                    update={
                        "sender": self.device_id,
                        "epoch": self.epoch,
                        "message_id": new_message_id(),
                        "sent_at": time.time(),
                    }
                )
            group.create_task(self._publish(again), name=f"republish-{job_id}")
            return
        if job_id in self._jobs:
            self.statistics.duplicates += 1
            logger.debug("job %s is already in progress", job_id)
            return
        self.statistics.submitted += 1
        now = time.monotonic() if received_at is None else received_at
        deadline_s = message.deadline_seconds or self.settings.deadline_s
        run = self._runs.pop(job_id, -1) + 1
        self._runs[job_id] = run
        while len(self._runs) > _RUNS_MEMORY:
            self._runs.popitem(last=False)
        job = _Job(
            submit=message,
            received_at=now,
            deadline=now + deadline_s,
            inbox=asyncio.Queue(maxsize=_INBOX_SIZE),
            run=run,
        )
        self._jobs[job_id] = job
        capacity = self.settings.max_in_flight + self.settings.max_queued
        if len(self._jobs) > capacity:
            self.statistics.refused += 1
            job.task = group.create_task(
                self._finish(
                    job,
                    self._error(
                        job,
                        f"the coordinator is busy: {capacity} jobs in progress or waiting",
                        retryable=True,
                    ),
                ),
                name=f"job-{job_id}",
            )
            return
        job.task = group.create_task(self._job_main(job), name=f"job-{job_id}")

    def answered_elsewhere(self, result: JobResult) -> None:
        """Another coordinator published this job's result: drop ours without a second one."""
        job = self._jobs.get(result.job_id)
        if job is None or result.sender == self.device_id or job.task is None:
            return
        logger.info("job %s was answered by %s; dropping it here", job.job_id, result.sender)
        job.abandoned = True
        job.task.cancel()

    def route(self, message: ReductionPartial | TileResult | TileFailed | TileTrace) -> None:
        """A worker's partial, result, failure or trace, for the job that owns it."""
        job = self._jobs.get(message.job_id)
        if job is None or message.epoch != self.epoch:
            self.statistics.dropped_messages += 1
            logger.debug("dropped %s for job %s (not in progress)", message.kind, message.job_id)
            return
        if isinstance(message, TileTrace):
            for span in message.spans:
                job.span(
                    message.device, span.what, span.start, span.end, message.segment, message.tile
                )
            return
        held_a_copy = message.device in job.direct_devices | job.direct_failed or any(
            message.device in record.sent.values() for record in job.tiles.values()
        )
        if held_a_copy and message.device in self._suspect_since:
            logger.info("%s answers again", message.device)
            del self._suspect_since[message.device]
        if held_a_copy:
            self._prove(message.device)
        self._deliver(job, message)

    def device_restarted(self, device: str) -> None:
        """A new session of `device` (a restart, a replacement): it starts unsuspected,
        and on probation (a trial tile still out stays out: a re-birth earns no new one)."""
        self._suspect_since.pop(device, None)
        if device != self.device_id:
            self._proven.discard(device)

    def devices_left(self, devices: Collection[str]) -> None:
        """Membership change: unfinished tiles on these devices are re-dispatched."""
        gone = set(devices)
        for device in gone:
            self._suspect_since.pop(device, None)  # it comes back, if ever, as itself again
        for job in self._jobs.values():
            for device in sorted(gone & _unfinished_devices(job)):
                self._deliver(job, _DeviceLost(job.job_id, device))

    def connection_restored(self) -> None:
        """The broker connection is back: devices' messages to each other may have been
        lost meanwhile, so direct runs in progress go to the relayed path now rather
        than when they turn overdue."""
        for job in self._jobs.values():
            if job.direct_devices:
                self._deliver(job, _Reconnected(job.job_id))

    def _deliver(self, job: _Job, item: _Inbound) -> None:
        try:
            job.inbox.put_nowait(item)
        except asyncio.QueueFull:
            self.statistics.dropped_messages += 1
            self.statistics.inbox_overflow += 1
            self._log.warning(
                "inbox", "inbox of job %s is full; dropped a %s", job.job_id, type(item).__name__
            )

    # --- one job --------------------------------------------------------------------

    async def _job_main(self, job: _Job) -> None:
        try:
            async with asyncio.timeout(max(0.0, job.deadline - time.monotonic())):
                async with self._slots:
                    job.add_time("queue", time.monotonic() - job.received_at)
                    result = await self._execute(job)
        except TimeoutError:
            waiting = sorted(_unfinished_devices(job))
            detail = f" (waiting for {', '.join(waiting)})" if waiting else ""
            result = self._error(
                job, f"deadline exceeded after {job.deadline - job.received_at:.1f} s{detail}"
            )
        except JobFailed as error:
            result = self._error(job, str(error), retryable=not error.permanent)
        except asyncio.CancelledError:
            try:
                async with asyncio.timeout(_FINAL_PUBLISH_TIMEOUT_S):
                    if job.abandoned:
                        await self._release(job, "answered by another leader")
                    elif self.successor():
                        logger.info("job %s is left to the next leader", job.job_id)
                        await self._release(job, "left to the next leader")
                    else:
                        why = "the coordinator stopped (leadership lost or shutting down)"
                        await self._finish(job, self._error(job, f"{why}; resubmit"))
            except TimeoutError:
                logger.warning("could not end job %s cleanly", job.job_id)
            raise
        except Exception as error:  # a bug in one job must not end the others
            logger.exception("job %s failed", job.job_id)
            result = self._error(job, f"internal error: {type(error).__name__}: {error}")
        await self._finish(job, result)

    async def _release(self, job: _Job, reason: str) -> None:
        """Forget the job and stop its tiles on every device that was sent one.

        Not only where a tile is unfinished: a copy that lost its race may still run.
        Except a whole image (`images` plan) whose only copy answered: nothing of it
        runs anywhere, and a cancel per image would only cost a message.
        """
        self._jobs.pop(job.job_id, None)
        images = job.plan is not None and job.plan.mode == "images"
        devices = {
            d
            for record in job.tiles.values()
            if not (images and record.done and len(record.sent) == 1)
            for d in record.sent.values()
        }
        devices |= job.direct_failed | job.direct_devices
        for device in sorted(devices):
            cancel = CancelJob(
                sender=self.device_id,
                job_id=job.job_id,
                epoch=self.epoch,
                reason=reason,
                run=job.run,
            )
            try:
                await self.links.send_cancel(device, cancel)
            except BrokerError as error:
                logger.debug("could not cancel job %s on %s: %s", job.job_id, device, error)

    async def _finish(self, job: _Job, result: JobResult) -> None:
        remember_result(self._results, result, self.settings.result_cache)
        if result.status == "ok":
            self.statistics.completed += 1
        else:
            self.statistics.errors += 1
            logger.warning("job %s failed: %s", job.job_id, result.error)
        if self.on_finished is not None:
            try:
                self.on_finished(result)
            except Exception:  # an observer's bug must not lose the job's result
                logger.exception("on_finished failed for job %s", job.job_id)
        await self._release(job, result.error or "job finished")
        await self._publish(result)

    async def _publish(self, result: JobResult) -> None:
        try:
            await self.links.send_result(result)
        except BrokerError as error:
            logger.warning("could not publish the result of job %s: %s", result.job_id, error)

    def _error(self, job: _Job, message: str, *, retryable: bool = True) -> JobResult:
        plan = job.plan
        return JobResult(
            sender=self.device_id,
            job_id=job.submit.job_id,
            status="error",
            epoch=self.epoch,
            model=job.submit.model,
            latency_ms={"total": max(0.0, (time.monotonic() - job.received_at) * 1000.0)},
            plan_id=plan.plan_id if plan is not None else None,
            strategy=plan.strategy if plan is not None else job.submit.strategy,
            devices=tuple(DeviceId(device) for device in sorted(job.devices)),
            error=message[:2000],
            retryable=retryable,
        )

    async def _execute(self, job: _Job) -> JobResult:
        submit = job.submit
        try:
            held = self.store.get(submit.model)
        except ModelNotHeld as error:
            raise JobFailed(f"unknown model: {error}", permanent=True) from None
        image = _check_image(submit.image, held.input_size)

        started = time.monotonic()
        try:
            plan = await self.planning.plan_for(submit.model, submit.strategy)
        except PlanningError as error:
            raise JobFailed(str(error)) from None
        if plan.model_digest != held.digest:
            raise JobFailed(f"plan {plan.plan_id} is for another architecture of {submit.model}")
        job.plan = plan
        job.add_time("plan", time.monotonic() - started)

        started = time.monotonic()
        x: npt.NDArray[np.float32] = await self._leader_step(job, lambda: normalize(image).numpy())
        job.add_time("prepare", time.monotonic() - started)

        segments = self._segments(plan, held)
        tail = held.spec.tail_units
        pooled_tail = bool(tail) and tail[0].kind == "gap"
        logits: npt.NDArray[Any] | None = None
        direct: dict[int, npt.NDArray[np.float32]] | None = None
        if plan.mode == "rows" and self.settings.direct and supports_direct(segments):
            direct = await self._run_direct(job, held, plan, segments, x)
            if direct is None:
                job.attempt_base = 1  # the relayed copies supersede the direct tasks
        for position, (layout, assignments) in enumerate(segments):
            if direct is not None and position < len(segments) - 1:
                continue
            segment_started = time.monotonic()
            if direct is not None:
                outputs = direct
            else:
                outputs = await self._run_segment(job, held, position, layout, assignments, x)
            started = time.monotonic()
            if direct is not None and self._splits_head(held, segments):
                partials = [outputs[tile] for tile in sorted(outputs)]
                logits = await self.links.compute(
                    functools.partial(_tail_from_head_partials, held, partials)
                )
                job.add_time("tail", time.monotonic() - started)
                job.local_span(self.device_id, "tail", started, time.monotonic())
            elif position == len(segments) - 1 and pooled_tail:
                pooled = _pooled_mean(outputs, held.spec.tail_units[0].in_shape)
                job.add_time("gather", time.monotonic() - started)
                started = time.monotonic()
                logits = await self._leader_step(
                    job, functools.partial(_tail_from_pooled, held, layout.last + 1, pooled)
                )
                job.add_time("tail", time.monotonic() - started)
                job.local_span(self.device_id, "tail", started, time.monotonic())
            else:
                x = _stitch(layout, outputs)
                job.add_time("gather", time.monotonic() - started)
            job.add_time(f"segment_{position}", time.monotonic() - segment_started)
        if logits is None:
            started = time.monotonic()
            logits = await self._leader_step(
                job, functools.partial(_tail_from_map, held, segments[-1][0].last + 1, x)
            )
            job.add_time("tail", time.monotonic() - started)
            job.local_span(self.device_id, "tail", started, time.monotonic())
        assert logits is not None
        return self._success(job, held, plan, logits)

    async def _leader_step(self, job: _Job, function: Callable[[], T]) -> T:
        """One of the leader's own torch steps of a job: normalising, the tail.

        They run on the compute thread, between the tiles, except for an `images`
        plan: there this device computes whole images too, and a step of about a
        millisecond queued behind them would wait for up to every image in its
        queue, twice per job (before the image can be sent, and before its result),
        while the device that has the job waits for its next one. Those steps run
        on a thread of their own instead.
        """
        if job.plan is not None and job.plan.mode == "images":
            return await asyncio.to_thread(function)
        return await self.links.compute(function)

    def _splits_head(
        self, held: HeldModel, segments: list[tuple[SegmentLayout, tuple[TileAssignment, ...]]]
    ) -> bool:
        """Direct runs: the last tiles send their share of the head's first layer."""
        unit = splittable_head(held.spec)
        return self.settings.split_head and unit is not None and segments[-1][0].last + 1 == unit

    async def _run_direct(
        self,
        job: _Job,
        held: HeldModel,
        plan: Plan,
        segments: list[tuple[SegmentLayout, tuple[TileAssignment, ...]]],
        x: npt.NDArray[np.float32],
    ) -> dict[int, npt.NDArray[np.float32]] | None:
        """Run the job on the direct data plane (see `edgedi.agent.direct`).

        Returns the last segment's outputs, or None when the job must be run again
        through the leader: a device of the plan is gone or suspect, a tile failed,
        a device left, or the job is overdue (a straggler, lost messages). The
        relayed path then re-sends what is needed, with copies and re-dispatch.
        """
        used = {a.device for _, assignments in segments for a in assignments}
        alive = set(self.alive_devices())
        unusable = sorted((used - alive) | (used & self._suspects()))
        if unusable:
            logger.info("job %s: not direct, %s gone or not answering", job.job_id, unusable)
            return None
        started = time.monotonic()
        template = self._tile_task(
            job, held, plan, 0, segments[0][0], segments[0][1][0], x
        ).model_copy(update={"tensor": None})
        tasks = direct_tasks(
            template, segments, x, self.settings.wire_dtype, self._splits_head(held, segments)
        )
        # The first segment's tiles first, this device's own before the remote ones:
        # taking it costs the loop nothing, and its compute thread starts at once
        # instead of after the others are encoded. The later segments' tasks are
        # small and only needed when their rows arrive.
        tasks.sort(key=lambda t: (t.segment > 0, t.device != self.device_id))
        job.direct_devices = used
        job.devices |= used
        for device in used:
            self._on_trial(device)
        if not await self._send_tasks(job, tasks):
            return None
        job.add_time("scatter", time.monotonic() - started)
        job.local_span(self.device_id, "scatter", started, time.monotonic())
        last_layout, last_assignments = segments[-1]
        owners = {a.index: a.device for a in last_assignments}
        overdue_s = self._overdue_after(plan.predicted_latency_s)
        outputs: dict[int, npt.NDArray[np.float32]] = {}
        worker_compute = 0.0
        reason = ""
        while len(outputs) < last_layout.count:
            left = started + overdue_s - time.monotonic()
            try:
                item = await asyncio.wait_for(job.inbox.get(), timeout=max(0.0, left))
            except TimeoutError:
                reason = f"overdue after {overdue_s:.2f} s"
                break
            if isinstance(item, _DeviceLost):
                reason = f"device {item.device} left"
                break
            if isinstance(item, _Reconnected):
                reason = "the broker connection was lost and restored"
                break
            if isinstance(item, ReductionPartial) or item.attempt != 0:
                continue
            if isinstance(item, TileFailed):
                reason = f"tile {item.tile} of segment {item.segment} failed: {item.reason}"
                break
            if item.segment != len(segments) - 1 or owners.get(item.tile) != item.device:
                self.statistics.dropped_messages += 1
                continue
            problem = (
                _check_head_partial(held, last_layout, item)
                if item.head_partial
                else _check_output(last_layout, item)
            )
            if problem is not None:
                reason = f"bad result from {item.device}: {problem}"
                break
            outputs[item.tile] = item.tensor.array.astype(np.float32, copy=False)
            worker_compute = max(worker_compute, item.compute_seconds)
        job.direct_devices = set()
        if not reason:
            for device in used:  # every one of them delivered: the result needs them all
                self._prove(device)
        if reason:
            self.statistics.direct_fallbacks += 1
            job.direct_failed = used
            logger.warning("job %s: direct plane gave up (%s); relaying", job.job_id, reason)
            return None
        job.add_time("compute", time.monotonic() - started - job.timings.get("scatter", 0.0) / 1000)
        job.add_time("worker_compute", worker_compute)
        return outputs

    def _success(
        self, job: _Job, held: HeldModel, plan: Plan, logits: npt.NDArray[Any]
    ) -> JobResult:
        values = np.asarray(logits, dtype=np.float64).reshape(-1)
        if not np.isfinite(values).all():
            raise JobFailed("the model produced non-finite logits", permanent=True)
        shifted = np.exp(values - values.max())
        probabilities = shifted / shifted.sum()
        label = int(np.argmax(probabilities))
        names = CLASSES if held.spec.num_classes == len(CLASSES) else None
        job.devices.add(self.device_id)  # the tail ran here
        total_s = time.monotonic() - job.received_at
        job.timings["total"] = total_s * 1000.0
        # What the plan predicted for the client's round trip, beside what happened.
        job.timings["predicted"] = plan.predicted_latency_s * 1000.0
        self.planning.observe_job(held.name, plan, total_s)
        return JobResult(
            sender=self.device_id,
            job_id=job.submit.job_id,
            status="ok",
            epoch=self.epoch,
            model=held.name,
            label=label,
            class_name=names[label] if names is not None else None,
            probabilities=tuple(float(p) for p in probabilities),
            latency_ms={stage: max(0.0, value) for stage, value in job.timings.items()},
            plan_id=plan.plan_id,
            strategy=plan.strategy,
            devices=tuple(DeviceId(device) for device in sorted(job.devices)),
            trace=tuple(sorted(job.spans, key=lambda span: (span.start_ms, span.device))),
            predicted_trace=self._predicted_trace(job, held, plan),
        )

    def _predicted_trace(self, job: _Job, held: HeldModel, plan: Plan) -> tuple[JobSpan, ...]:
        """A traced job: the plan's replayed timeline, from the leader taking the job."""
        if not job.submit.trace:
            return ()
        replay = self.planning.replay(held.name, plan)
        if replay is None or not replay.events:
            return ()
        origin = min(event.start for event in replay.events)
        spans = []
        for event in replay.events[:MAX_TRACE_SPANS]:
            segment = re.match(r"s(\d+)", event.label)
            spans.append(
                JobSpan(
                    device=DeviceId(event.device),
                    segment=int(segment.group(1)) if segment else None,
                    what="tail" if event.label == "tail" else _REPLAY_KINDS[event.kind],
                    start_ms=(event.start - origin) * 1000.0,
                    end_ms=(event.end - origin) * 1000.0,
                )
            )
        return tuple(spans)

    def _segments(
        self, plan: Plan, held: HeldModel
    ) -> list[tuple[SegmentLayout, tuple[TileAssignment, ...]]]:
        spec = held.spec
        try:
            if plan.mode == "images":
                last = len(spec.spatial_units) - 1
                height = spec.units[last].out_shape[1]
                layout = segment_layout(spec, 0, last, [(0, height)])
                device, ahead = self._next_image_device(plan)
                latency = next((i.latency_s for i in plan.images if i.device == device), 0.0)
                # Its output comes after the images ahead of it on the device.
                expected = latency * (ahead + 1)
                return [(layout, (TileAssignment(0, device, expected_s=expected),))]
            return [plan_segment_layout(spec, segment) for segment in plan.segments]
        except LayoutError as error:
            raise JobFailed(f"plan {plan.plan_id} cannot be executed: {error}") from None

    def _next_image_device(self, plan: Plan) -> tuple[str, int]:
        """The device for the next whole image (`_image_device`), and how many
        unfinished tiles it holds already."""
        shares = {share.device: share.share for share in plan.images if share.share > 0}
        if len(self._round_robin) > 16:
            self._round_robin.clear()
        credit = self._round_robin.setdefault(plan.plan_id, dict.fromkeys(sorted(shares), 0.0))
        in_hand = dict.fromkeys(shares, 0)
        for job in self._jobs.values():
            for record in job.tiles.values():
                for device in record.devices & in_hand.keys():
                    in_hand[device] += 1
        chosen = _image_device(shares, in_hand, credit)
        return chosen, in_hand[chosen]

    async def _run_segment(
        self,
        job: _Job,
        held: HeldModel,
        position: int,
        layout: SegmentLayout,
        assignments: tuple[TileAssignment, ...],
        x: npt.NDArray[np.float32],
    ) -> dict[int, npt.NDArray[np.float32]]:
        plan = job.plan
        assert plan is not None
        started = time.monotonic()
        alive = set(self.alive_devices())
        records: list[TileRecord] = []
        for assignment in assignments:
            task = self._tile_task(job, held, plan, position, layout, assignment, x)
            if job.attempt_base:
                task = task.model_copy(update={"attempt": job.attempt_base})
            if task.device not in alive or task.device in self._suspects():
                # The plan names a device that left since it was made, or that is not
                # answering: send its tile elsewhere.
                device = self._pick_device(job, avoid=(), exclude={task.device})
                if device is None and task.device in alive:
                    device = task.device  # nobody else: the suspect is the best hope
                if device is None:
                    raise JobFailed(f"device {task.device} left and no other can take its tile")
                logger.info(
                    "job %s: tile %d goes to %s (%s %s)",
                    job.job_id,
                    task.tile,
                    device,
                    task.device,
                    "left" if task.device not in alive else "is not answering",
                )
                task = task.model_copy(update={"device": DeviceId(device)})
            record = TileRecord(
                segment=position,
                index=task.tile,
                task=task,
                expected_s=assignment.expected_s,
                compute_s=assignment.compute_s if task.device == assignment.device else 0.0,
                planned_device=task.device,
                first_sent_at=started,
                sent_at=started,
                overdue_at=started + self._overdue_after(assignment.expected_s),
                attempt=job.attempt_base,
                running={job.attempt_base: task.device},
                sent={job.attempt_base: task.device},
                first_attempt=job.attempt_base,
            )
            job.tiles[(position, task.tile)] = record
            job.devices.add(task.device)
            self._on_trial(task.device)
            records.append(record)
        await self._send_tasks(job, [record.task for record in records])
        scattered = time.monotonic()
        job.add_time("scatter", scattered - started)
        job.local_span(self.device_id, "scatter", started, scattered, segment=position)

        state = _SegmentState(layout, position)
        while len(state.outputs) < layout.count:
            wait = min(r.overdue_at for r in records if not r.done) - time.monotonic()
            try:
                # Bounded by the job's deadline too (see _job_main).
                item = await asyncio.wait_for(job.inbox.get(), timeout=max(0.0, wait))
            except TimeoutError:
                await self._chase_stragglers(job, state, records)
                continue
            if isinstance(item, _Reconnected):
                continue  # meant for a direct run that has given up already
            if isinstance(item, _DeviceLost):
                for record in records:
                    if item.device in record.devices:
                        await self._device_lost(job, record, item.device)
                continue
            if item.segment != position or not 0 <= item.tile < layout.count:
                await self._late_message(job, item)
                continue
            record = records[item.tile]
            if not isinstance(item, ReductionPartial) and item.attempt < job.attempt_base:
                continue  # the direct plane's, which gave up on this job
            if not _from_a_copy(record, item):
                self.statistics.dropped_messages += 1
                logger.warning(
                    "job %s: dropped a %s for tile %d from %s, which holds no copy of it",
                    job.job_id,
                    item.kind,
                    item.tile,
                    item.device,
                )
                continue
            if isinstance(item, ReductionPartial):
                await self._on_partial(job, state, record, item)
            elif isinstance(item, TileResult):
                if record.done:
                    continue  # a slower copy of a tile that is complete
                problem = _check_output(layout, item)
                if problem is not None:
                    why = f"bad result from {item.device}: {problem}"
                    await self._copy_failed(job, record, item.attempt, why)
                    continue
                state.outputs[item.tile] = item.tensor.array.astype(np.float32, copy=False)
                record.done = True
                state.worker_compute = max(state.worker_compute, item.compute_seconds)
                self._learn_speed(record, item)
            elif not record.done:
                await self._copy_failed(job, record, item.attempt, f"{item.device}: {item.reason}")
        finished = time.monotonic()
        for gate, value in state.gates.items():
            job.gate_values[(position, gate)] = value
        job.add_time("compute", finished - scattered)
        job.add_time("worker_compute", state.worker_compute)
        for gate, moment in enumerate(state.first_partial):
            if moment is not None and gate in state.gates:
                job.add_time("reductions", max(0.0, state.gates[gate].sent_at - moment))
        return state.outputs

    async def _late_message(self, job: _Job, item: _Inbound) -> None:
        """A message of an earlier segment: a copy that lost the race is still running.

        A late partial gets the gate's value, so the copy finishes (its result is
        dropped) instead of holding the device's slot until the job ends.
        """
        if not isinstance(item, ReductionPartial):
            return
        value = job.gate_values.get((item.segment, item.gate))
        if value is None:
            return
        try:
            await self.links.send_gate(value, {item.device})
        except BrokerError as error:
            logger.debug("job %s: late gate not sent: %s", job.job_id, error)

    def _learn_speed(self, record: TileRecord, result: TileResult) -> None:
        """Feed the planned device's measured tile time back into its profile.

        When a copy beat the plan's own, that device's answer never comes (its tile
        is cancelled with the job); the time it had already taken is a lower bound
        of its compute time and is reported instead.
        """
        if record.compute_s <= 0:
            return
        first = record.first_attempt
        if result.attempt == first and result.compute_seconds > 0:
            self.planning.observe_tile(result.device, record.compute_s, result.compute_seconds)
        elif record.running.get(first) == record.planned_device:
            waited = time.monotonic() - record.first_sent_at
            self.planning.observe_tile(record.planned_device, record.compute_s, waited)

    def _copies_out(self, now: float) -> int:
        """Tiles, over all jobs, whose latest speculative copy is unanswered but not yet
        overdue itself. A copy that is overdue too (lost to a broker restart, stuck)
        no longer counts, or lost copies would hold back the copies that replace them."""
        return sum(
            1
            for job in self._jobs.values()
            for record in job.tiles.values()
            if record.copies
            and not record.done
            and now - record.sent_at < self._overdue_after(record.expected_s)
        )

    def _suspects(self) -> set[str]:
        """Devices that left a tile overdue lately and have not answered since, and
        devices on probation whose trial tile is out."""
        now = time.monotonic()
        for table in (self._suspect_since, self._trial_since):
            for device, since in list(table.items()):
                if now - since > _SUSPECT_S:
                    del table[device]  # give it another chance
        return set(self._suspect_since) | set(self._trial_since)

    def _on_trial(self, device: str) -> None:
        """`device` was just given a tile (or a direct run's tasks): if it is on
        probation, that was its trial."""
        if device not in self._proven:
            self._trial_since.setdefault(device, time.monotonic())

    def _prove(self, device: str) -> None:
        """`device` answered: off probation."""
        if device not in self._proven:
            self._proven.add(device)
            self._trial_since.pop(device, None)

    def _overdue_after(self, expected_s: float) -> float:
        """How long a copy of a tile may take before it counts as a straggler."""
        return max(self.settings.straggler_min_s, self.settings.straggler_factor * expected_s)

    def _tile_task(
        self,
        job: _Job,
        held: HeldModel,
        plan: Plan,
        position: int,
        layout: SegmentLayout,
        assignment: TileAssignment,
        x: npt.NDArray[np.float32],
    ) -> TileTask:
        rows, columns = layout.tile(assignment.index)
        in_rows, in_columns = rows.in_rows, columns.in_rows
        block = x[:, :, in_rows.start : in_rows.stop, in_columns.start : in_columns.stop]
        tensor = np.ascontiguousarray(block, dtype=self.settings.wire_dtype)
        deadline, deadline_in_s = _deadline_fields(job.deadline)
        return TileTask(
            sender=self.device_id,
            job_id=job.submit.job_id,
            epoch=self.epoch,
            plan_id=plan.plan_id,
            device=DeviceId(assignment.device),
            model=held.name,
            model_digest=held.digest,
            input_size=held.input_size,
            segment=position,
            first_unit=layout.first,
            last_unit=layout.last,
            row_parts=tuple((part.start, part.stop) for part in layout.row_parts),
            column_parts=(
                None
                if layout.column_parts is None
                else tuple((part.start, part.stop) for part in layout.column_parts)
            ),
            tile=assignment.index,
            input_rows=(in_rows.start, in_rows.stop),
            input_columns=(in_columns.start, in_columns.stop),
            output_rows=(rows.out_rows.start, rows.out_rows.stop),
            output_columns=(columns.out_rows.start, columns.out_rows.stop),
            tensor=Tensor(tensor),
            deadline=deadline,
            deadline_in_s=deadline_in_s,
            local_gates=layout.count == 1 and bool(layout.gates),
            trace=job.submit.trace,
            run=job.run,
        )

    async def _send_tasks(self, job: _Job, tasks: list[TileTask]) -> bool:
        """Publish tasks concurrently (the PUBACK round trips overlap); False if any failed.

        A task that could not be sent (the broker is away) is not fatal: its tile
        turns overdue and is sent again.
        """
        outcomes = await asyncio.gather(
            *(self.links.send_task(task) for task in tasks), return_exceptions=True
        )
        sent = True
        for task, outcome in zip(tasks, outcomes, strict=True):
            if isinstance(outcome, BrokerError):
                logger.warning(
                    "job %s: could not send tile %d to %s: %s",
                    job.job_id,
                    task.tile,
                    task.device,
                    outcome,
                )
                sent = False
            elif isinstance(outcome, BaseException):
                raise outcome
        return sent

    async def _send_gate(
        self, job: _Job, state: _SegmentState, gate: int, devices: set[str]
    ) -> None:
        try:
            await self.links.send_gate(state.gates[gate], devices)
        except BrokerError as error:
            # The tiles waiting for it turn overdue; the gate is re-sent before any copy.
            state.unsent_gates.add(gate)
            logger.warning("job %s: could not send gate %d: %s", job.job_id, gate, error)
        else:
            state.unsent_gates.discard(gate)

    async def _on_partial(
        self, job: _Job, state: _SegmentState, record: TileRecord, partial: ReductionPartial
    ) -> None:
        layout = state.layout
        if not 0 <= partial.gate < len(layout.gates):
            logger.warning("job %s: partial for unknown gate %d", job.job_id, partial.gate)
            return
        gate = layout.gates[partial.gate]
        share = layout.gate_positions(partial.tile, partial.gate)
        if (
            partial.sums.shape != (1, gate.out_channels)
            or not partial.sums.is_finite()
            or partial.positions != share
        ):
            logger.warning(
                "job %s: malformed partial from %s (shape %s, %d positions of %d)",
                job.job_id,
                partial.device,
                partial.sums.shape,
                partial.positions,
                share,
            )
            return
        if partial.gate in state.gates:
            # A re-sent or speculative copy reached a gate combined already: send it on.
            await self._send_gate(job, state, partial.gate, {partial.device})
            return
        if state.first_partial[partial.gate] is None:
            state.first_partial[partial.gate] = time.monotonic()
        collected = state.partials[partial.gate]
        collected[partial.tile] = partial  # of any copy: the input, hence the sums, are the same
        if len(collected) < layout.count:
            return
        total = np.zeros((1, gate.out_channels), dtype=np.float64)
        positions = 0
        for item in collected.values():
            total += item.sums.array
            positions += item.positions
        expected = gate.out_height * gate.out_width
        if positions != expected:
            raise JobFailed(
                f"gate {partial.gate} of segment {state.position}: partials cover {positions} "
                f"positions, the map has {expected}"
            )
        state.gates[partial.gate] = GateValue(
            sender=self.device_id,
            job_id=job.submit.job_id,
            epoch=self.epoch,
            segment=state.position,
            gate=partial.gate,
            vector=Tensor(total / positions),
        )
        devices = {
            device
            for (segment, _), other in job.tiles.items()
            if segment == state.position
            for device in other.devices
        }
        await self._send_gate(job, state, partial.gate, devices)

    async def _chase_stragglers(
        self, job: _Job, state: _SegmentState, records: list[TileRecord]
    ) -> None:
        """Overdue tiles: re-send lost gate values, then send a copy of each straggler.

        A tile that has given its partial for the gate being combined waits for the
        others and is not a straggler; one that has not (or has no gate left to reach)
        is. Its copy goes to the least loaded other device; the first result wins.
        """
        now = time.monotonic()
        devices = {device for record in records for device in record.devices}
        for gate in sorted(state.unsent_gates):
            await self._send_gate(job, state, gate, devices)
        pending = next((g for g in range(len(state.layout.gates)) if g not in state.gates), None)
        for record in records:
            if record.done or record.overdue_at > now:
                continue
            record.overdue_at = now + self._overdue_after(record.expected_s)
            if pending is not None and record.index in state.partials[pending]:
                continue
            if record.copies >= self.settings.speculative_copies:
                continue
            if self._copies_out(now) >= max(1, len(self.alive_devices())):
                # Everything is late (an overloaded cluster, predictions too optimistic):
                # more copies would only add load. The measurements correct the plans.
                self.statistics.speculation_held += 1
                continue
            waited = now - record.sent_at
            why = f"overdue: no answer from {record.device} after {waited:.2f} s"
            for device in record.devices:
                self._suspect_since.setdefault(device, now)
            if await self._send_copy(job, record, why, speculative=True):
                record.copies += 1
                self.statistics.speculative += 1

    async def _device_lost(self, job: _Job, record: TileRecord, device: str) -> None:
        for attempt, holder in list(record.running.items()):
            if holder == device:
                await self._copy_failed(job, record, attempt, f"device {device} left")

    async def _copy_failed(self, job: _Job, record: TileRecord, attempt: int, reason: str) -> None:
        """One copy of a tile failed: re-send it unless another copy is still out."""
        if record.running.pop(attempt, None) is None:
            return  # an attempt that was superseded or has already failed
        record.failures += 1
        if record.running:
            logger.info(
                "job %s: a copy of tile %d failed (%s); another is still out",
                job.job_id,
                record.index,
                reason,
            )
            return
        if record.failures >= self.settings.tile_attempts:
            raise JobFailed(
                f"tile {record.index} of segment {record.segment} failed "
                f"{record.failures} time(s); last: {reason}"
            )
        if not await self._send_copy(job, record, reason, speculative=False):
            raise JobFailed(
                f"tile {record.index} of segment {record.segment} failed ({reason}) and no "
                "other device holding the model is alive"
            )
        self.statistics.redispatched += 1

    def _pick_device(
        self, job: _Job, avoid: Collection[str], exclude: Collection[str]
    ) -> str | None:
        """The alive device holding the job's model with the fewest unfinished tiles of it.

        Devices in `exclude` are never chosen, those in `avoid` only when nothing else is
        left.
        """
        holders = {birth.device for birth in self.planning.devices_for(job.submit.model)}
        suspects = self._suspects()
        candidates = sorted((set(self.alive_devices()) & holders) - set(exclude))
        if not candidates:
            return None
        load = dict.fromkeys(candidates, 0)
        for other in job.tiles.values():
            for device in other.devices:
                if device in load:
                    load[device] += 1
        fresh = [d for d in candidates if d not in avoid and d not in suspects]
        fresh = fresh or [device for device in candidates if device not in avoid]
        return min(fresh or candidates, key=lambda device: (load[device], device))

    async def _send_copy(
        self, job: _Job, record: TileRecord, reason: str, *, speculative: bool
    ) -> bool:
        """Send the tile (unchanged, new attempt) to another device; False if none can take it.

        A speculative copy never goes where a copy is already out; a re-send prefers a
        device that has not tried the tile, and falls back to the one that just failed
        (its new attempt replaces the old there).
        """
        if speculative:
            device = self._pick_device(job, avoid=record.tried, exclude=record.devices)
        else:
            device = self._pick_device(job, avoid=record.tried | record.devices, exclude=())
        if device is None:
            return False
        for attempt, holder in list(record.running.items()):
            if holder == device:
                del record.running[attempt]  # superseded by the new attempt on the same device
        now = time.monotonic()
        deadline, deadline_in_s = _deadline_fields(job.deadline)
        record.attempt += 1
        record.running[record.attempt] = device
        record.sent[record.attempt] = device
        record.sent_at = now
        record.overdue_at = now + self._overdue_after(record.expected_s)
        record.task = record.task.model_copy(
            update={
                "device": device,
                "attempt": record.attempt,
                "message_id": new_message_id(),
                "sent_at": time.time(),
                "deadline": deadline,
                "deadline_in_s": deadline_in_s,
            }
        )
        job.devices.add(device)
        self._on_trial(device)
        logger.warning(
            "job %s: %s tile %d of segment %d to %s (attempt %d): %s",
            job.job_id,
            "copying" if speculative else "re-sending",
            record.index,
            record.segment,
            device,
            record.attempt,
            reason,
        )
        if not await self._send_tasks(job, [record.task]):
            # Try again soon: the broker may be back by then.
            record.overdue_at = now + self.settings.straggler_min_s
        return True


# --- array helpers (numpy only: they run on the event loop) -----------------------------


def _deadline_fields(deadline: float) -> tuple[float, float]:
    """A job's deadline (our monotonic clock) for a task: the time left, which the
    worker counts on its own clock, and the wall-clock instant for older workers."""
    left = max(0.0, deadline - time.monotonic())
    return time.time() + left, left


def _image_device(
    shares: dict[str, float], in_hand: dict[str, int], credit: dict[str, float]
) -> str:
    """Where the next whole image goes, given each device's share of the speed and
    unfinished tiles; `credit` is the round robin's state, updated.

    First the devices with fewer than `_IMAGES_IN_HAND`, then the rest; within each,
    the one that would finish the image first (its tiles in hand plus this one, over
    its share); equals by smooth weighted round robin over the shares. So every
    device holds the image it computes and the next one, whatever order the answers
    come back in, and never waits for the leader between two (a blind round robin
    left one device without an image while another had three).
    """
    for device, share in shares.items():
        credit[device] = credit.get(device, 0.0) + share

    def order(device: str) -> tuple[bool, float, float]:
        held = in_hand.get(device, 0)
        finish = round((held + 1) / shares[device], 6)  # rounded: equal shares tie
        return held >= _IMAGES_IN_HAND, finish, -credit[device]

    chosen = min(sorted(shares), key=order)
    credit[chosen] -= sum(shares.values())
    return chosen


def _from_a_copy(record: TileRecord, item: ReductionPartial | TileResult | TileFailed) -> bool:
    """Did the coordinator send this tile to the message's device (that attempt, if any)?"""
    if isinstance(item, ReductionPartial):
        return item.device in record.sent.values()
    return record.sent.get(item.attempt) == item.device


def _unfinished_devices(job: _Job) -> set[str]:
    """Devices that hold a copy of an unfinished tile of the job."""
    relayed = {device for record in job.tiles.values() for device in record.devices}
    return relayed | job.direct_devices


def _check_image(image: Tensor, size: int) -> npt.NDArray[Any]:
    """The image as (1, size, size); `JobFailed` for a wrong shape, dtype or values."""
    if image.dtype not in _IMAGE_DTYPES:
        raise JobFailed(
            f"bad image: dtype {image.dtype} is not one of {', '.join(_IMAGE_DTYPES)}",
            permanent=True,
        )
    shape = image.shape
    squeezed = tuple(size for size in shape if size != 1) if len(shape) > 2 else shape
    if len(shape) > 4 or squeezed != (size, size):
        raise JobFailed(
            f"bad image: shape {list(shape)}; the model takes one grayscale {size}x{size} image "
            f"(shape [{size}, {size}] or [1, {size}, {size}])",
            permanent=True,
        )
    if not image.is_finite():
        raise JobFailed("bad image: it holds NaN or infinite values", permanent=True)
    # A writable copy: torch warns about (and must not write into) read-only buffers.
    return np.array(image.array.reshape(1, size, size))


def _check_head_partial(held: HeldModel, layout: SegmentLayout, result: TileResult) -> str | None:
    rows, _ = layout.tile(result.tile)
    if tuple(result.output_rows) != (rows.out_rows.start, rows.out_rows.stop):
        return f"output rows {result.output_rows}, expected {rows.out_rows}"
    unit = splittable_head(held.spec)
    if unit is None:
        return "a head partial of a model whose head cannot be split"
    expected = (1, held.spec.units[unit].main[0].out_channels)
    if result.tensor.shape != expected:
        return f"head partial of shape {list(result.tensor.shape)}, expected {list(expected)}"
    if result.tensor.dtype not in _TILE_DTYPES:
        return f"output dtype {result.tensor.dtype}"
    if not result.tensor.is_finite():
        return "output holds NaN or infinite values"
    return None


def _tail_from_head_partials(
    held: HeldModel, partials: list[npt.NDArray[np.float32]]
) -> npt.NDArray[np.float64]:
    """Compute thread: the tail from the last tiles' shares of the head's first layer."""
    logits: npt.NDArray[np.float64] = tail_from_head_partials(held.model, partials).double().numpy()
    return logits


def _check_output(layout: SegmentLayout, result: TileResult) -> str | None:
    rows, columns = layout.tile(result.tile)
    expected = (1, layout.out_channels, len(rows.out_rows), len(columns.out_rows))
    if result.tensor.shape != expected:
        return f"output shape {list(result.tensor.shape)}, expected {list(expected)}"
    if result.tensor.dtype not in _TILE_DTYPES:
        return f"output dtype {result.tensor.dtype}"
    if tuple(result.output_rows) != (rows.out_rows.start, rows.out_rows.stop):
        return f"output rows {result.output_rows}, expected {rows.out_rows}"
    if not result.tensor.is_finite():
        return "output holds NaN or infinite values"
    return None


def _tail_from_pooled(
    held: HeldModel, first: int, pooled: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Compute thread: the tail from the global average pool's exact mean."""
    logits: npt.NDArray[np.float64] = run_tail(held.model, first, pooled=pooled).double().numpy()
    return logits


def _tail_from_map(
    held: HeldModel, first: int, x: npt.NDArray[np.float32]
) -> npt.NDArray[np.float64]:
    """Compute thread: the tail from the whole stitched map."""
    logits: npt.NDArray[np.float64] = (
        run_tail(held.model, first, torch.from_numpy(x)).double().numpy()
    )
    return logits


def _stitch(
    layout: SegmentLayout, outputs: dict[int, npt.NDArray[np.float32]]
) -> npt.NDArray[np.float32]:
    """The segment's output map from its tiles (row-major grid)."""
    columns = len(layout.column_tiles)
    bands = []
    for row in range(len(layout.row_tiles)):
        pieces = [outputs[row * columns + column] for column in range(columns)]
        bands.append(pieces[0] if columns == 1 else np.concatenate(pieces, axis=3))
    stitched = bands[0] if len(bands) == 1 else np.concatenate(bands, axis=2)
    return np.ascontiguousarray(stitched)


def _pooled_mean(
    outputs: dict[int, npt.NDArray[np.float32]], shape: tuple[int, int, int]
) -> npt.NDArray[np.float64]:
    """The global average pool of the whole map from its disjoint tiles, exactly."""
    channels, height, width = shape
    total = np.zeros((1, channels), dtype=np.float64)
    positions = 0
    for tile in outputs.values():
        total += tile.sum(axis=(2, 3), dtype=np.float64)
        positions += tile.shape[2] * tile.shape[3]
    if positions != height * width:
        raise JobFailed(f"the last segment's tiles cover {positions} of {height * width} positions")
    mean: npt.NDArray[np.float64] = total / positions
    return mean
