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
*probation*: it gets one trial tile, relayed (never a direct run, where an overrun
names no device), and no second until it answers or 10 s have passed, so a ghost
that announces itself and never computes costs one overdue wait per 10 s, however
often it is born again, and a newcomer slower than it announced is measured. A
gate that was already combined is re-sent to any late copy. Measured tile times,
summed per device, go back to `Planning.observe_compute` when the job ends, so the
next plan fits the devices as they are.

Errors say whether they are `retryable` (the cluster's state: no workers, a tile
lost, the deadline) or final (bad input, unknown model). A job that a stopping
coordinator leaves unfinished is not answered when another candidate is alive:
that one has it in its journal (`edgedi.agent.journal`) and runs it as leader.

All torch work (normalising the image, the tail) runs on the device's compute
thread through `CoordinatorLinks.compute`, an `images` plan's on a thread of its
own (`_leader_step`); the loop only slices and stitches numpy arrays. Every wait is
bounded by the job's deadline.

This module is the orchestrator; each idea has its own home: job records, the
result cache and run numbers in `edgedi.agent.job_intake`; running segments
(relayed or direct) in `edgedi.agent.segments`; tile records, suspects, probation
and copies in `edgedi.agent.tile_tracker`; checks of images and results in
`edgedi.agent.result_checks`; combining partials and stitching tiles in
`edgedi.models.reduce`; the links to devices in `edgedi.agent.transport`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from edgedi.agent.config import JobSettings
from edgedi.agent.direct import supports_direct
from edgedi.agent.job_intake import (
    INBOX_SIZE,
    CoordinatorStatistics,
    DeviceLost,
    Inbound,
    Job,
    Reconnected,
    ResultCache,
    RunNumbers,
    unfinished_devices,
)
from edgedi.agent.layout import (
    LayoutError,
    SegmentLayout,
    TileAssignment,
    plan_segment_layout,
    segment_layout,
)
from edgedi.agent.model_store import HeldModel, ModelNotHeld, ModelStore
from edgedi.agent.planning import Planning, PlanningError
from edgedi.agent.result_checks import JobFailed, check_image
from edgedi.agent.segments import SegmentRunner, pooled_outputs, stitch_outputs
from edgedi.agent.tile_tracker import TileRecord, TileTracker
from edgedi.agent.transport import CoordinatorLinks
from edgedi.broker.errors import BrokerError
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import (
    MAX_TRACE_SPANS,
    CancelJob,
    JobResult,
    JobSpan,
    JobSubmit,
    ReductionPartial,
    SpanKind,
    TileFailed,
    TileResult,
    TileTrace,
    new_message_id,
)
from edgedi.broker.plan import Plan
from edgedi.broker.ratelimit import RateLimitedLog
from edgedi.models.data import CLASSES
from edgedi.models.head_split import tail_from_head_partials
from edgedi.models.tiling import run_tail
from edgedi.models.training import normalize

__all__ = ["Coordinator", "CoordinatorLinks", "CoordinatorStatistics", "TileRecord"]

logger = logging.getLogger(__name__)


_REPLAY_KINDS: dict[str, SpanKind] = {"compute": "compute", "send": "send"}
# Publishing an error result while shutting down must not hang the shutdown.
_FINAL_PUBLISH_TIMEOUT_S = 2.0
T = TypeVar("T")
# `images` plans: whole images each device should hold, the one it computes and the
# next, before any device gets a third.
_IMAGES_IN_HAND = 2


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
        results: ResultCache | None = None,
        successor: Callable[[], bool] = lambda: False,
        on_finished: Callable[[JobResult], None] | None = None,
        proven: Collection[str] = (),
        takes_batches: Callable[[str], bool] = lambda device: False,
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
        self._results = results if results is not None else ResultCache(settings.result_cache)
        self._jobs: dict[str, Job] = {}
        # Runs of each job id: a resubmitted job gets the next, so devices that
        # cancelled the last run still take its tasks.
        self._runs = RunNumbers()
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._group: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._drain_s = 0.0
        self._round_robin: dict[str, dict[str, float]] = {}
        # Jobs handed over before `run()` started (a new leader's journal).
        self._backlog: list[tuple[JobSubmit, float | None]] = []
        # Suspects and probation (a new leader takes over the devices that have been
        # working in their current session for a while, `proven`).
        self.tracker = TileTracker(settings, proven={self.device_id, *proven})
        self._log = RateLimitedLog(logger)
        # Running a plan's segments: relayed, or all at once on the direct plane.
        self.segments = SegmentRunner(
            self.device_id,
            epoch,
            planning,
            links,
            settings,
            self.statistics,
            self.tracker,
            alive_devices=alive_devices,
            jobs=self._jobs,
            takes_batches=takes_batches,
        )

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
            self._results.forget(job_id)
            cached = None
        if cached is not None:
            self._results.touch(job_id)
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
        run = self._runs.next(job_id)
        job = Job(
            submit=message,
            received_at=now,
            deadline=now + deadline_s,
            inbox=asyncio.Queue(maxsize=INBOX_SIZE),
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
        if held_a_copy:
            self.tracker.answered(message.device)
        self._deliver(job, message)

    def device_restarted(self, device: str) -> None:
        """A new session of `device` (a restart, a replacement): it starts unsuspected,
        and on probation (a trial tile still out stays out: a re-birth earns no new one)."""
        self.tracker.unsuspect(device)
        if device != self.device_id:
            self.tracker.on_probation(device)

    def devices_left(self, devices: Collection[str]) -> None:
        """Membership change: unfinished tiles on these devices are re-dispatched."""
        gone = set(devices)
        for device in gone:
            self.tracker.unsuspect(device)  # it comes back, if ever, as itself again
        for job in self._jobs.values():
            for device in sorted(gone & unfinished_devices(job)):
                self._deliver(job, DeviceLost(job.job_id, device))

    def connection_restored(self) -> None:
        """The broker connection is back: devices' messages to each other may have been
        lost meanwhile, so direct runs in progress go to the relayed path now rather
        than when they turn overdue."""
        for job in self._jobs.values():
            if job.direct_devices:
                self._deliver(job, Reconnected(job.job_id))

    def _deliver(self, job: Job, item: Inbound) -> None:
        try:
            job.inbox.put_nowait(item)
        except asyncio.QueueFull:
            self.statistics.dropped_messages += 1
            self.statistics.inbox_overflow += 1
            self._log.warning(
                "inbox", "inbox of job %s is full; dropped a %s", job.job_id, type(item).__name__
            )

    # --- one job --------------------------------------------------------------------

    async def _job_main(self, job: Job) -> None:
        try:
            async with asyncio.timeout(max(0.0, job.deadline - time.monotonic())):
                async with self._slots:
                    job.add_time("queue", time.monotonic() - job.received_at)
                    result = await self._execute(job)
        except TimeoutError:
            waiting = sorted(unfinished_devices(job))
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

    async def _release(self, job: Job, reason: str) -> None:
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

    async def _finish(self, job: Job, result: JobResult) -> None:
        self._results.remember(result)
        if job.plan is not None:
            # One verdict per device per job: a job of many small tiles is one vote.
            for device, (predicted, measured) in job.compute_times.items():
                self.planning.observe_compute(device, predicted, measured, plan_id=job.plan.plan_id)
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

    def _error(self, job: Job, message: str, *, retryable: bool = True) -> JobResult:
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

    async def _execute(self, job: Job) -> JobResult:
        submit = job.submit
        try:
            held = self.store.get(submit.model)
        except ModelNotHeld as error:
            raise JobFailed(f"unknown model: {error}", permanent=True) from None
        image = check_image(submit.image, held.input_size)

        started = time.monotonic()
        try:
            # A re-plan in progress does not hold the job: the plan it replaces runs.
            plan = await self.planning.plan_for(
                submit.model, submit.strategy, stale_ok=True, for_job=True
            )
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
            direct = await self.segments.run_direct(job, held, plan, segments, x)
            if direct is None:
                job.attempt_base = 1  # the relayed copies supersede the direct tasks
        for position, (layout, assignments) in enumerate(segments):
            if direct is not None and position < len(segments) - 1:
                continue
            segment_started = time.monotonic()
            if direct is not None:
                outputs = direct
            else:
                outputs = await self.segments.run_segment(
                    job, held, position, layout, assignments, x
                )
            started = time.monotonic()
            if direct is not None and self.segments.splits_head(held, segments):
                partials = [outputs[tile] for tile in sorted(outputs)]
                logits = await self.links.compute(
                    functools.partial(_tail_from_head_partials, held, partials)
                )
                job.add_time("tail", time.monotonic() - started)
                job.local_span(self.device_id, "tail", started, time.monotonic())
            elif position == len(segments) - 1 and pooled_tail:
                pooled = pooled_outputs(outputs, held.spec.tail_units[0].in_shape)
                job.add_time("gather", time.monotonic() - started)
                started = time.monotonic()
                logits = await self._leader_step(
                    job, functools.partial(_tail_from_pooled, held, layout.last + 1, pooled)
                )
                job.add_time("tail", time.monotonic() - started)
                job.local_span(self.device_id, "tail", started, time.monotonic())
            else:
                x = stitch_outputs(layout, outputs)
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

    async def _leader_step(self, job: Job, function: Callable[[], T]) -> T:
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

    def _success(
        self, job: Job, held: HeldModel, plan: Plan, logits: npt.NDArray[Any]
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

    def _predicted_trace(self, job: Job, held: HeldModel, plan: Plan) -> tuple[JobSpan, ...]:
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


# --- the tail (torch: on the compute thread) --------------------------------------------


def _tail_from_head_partials(
    held: HeldModel, partials: list[npt.NDArray[np.float32]]
) -> npt.NDArray[np.float64]:
    """Compute thread: the tail from the last tiles' shares of the head's first layer."""
    logits: npt.NDArray[np.float64] = tail_from_head_partials(held.model, partials).double().numpy()
    return logits


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
