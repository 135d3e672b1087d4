"""Running a plan's segments: relayed through the leader, or on the direct plane.

`SegmentRunner.run_direct` sends every device all of its tasks of a row-strip plan
at once (`edgedi.agent.direct`): devices exchange gate partials and segment
boundaries among themselves, and only the last segment's results come back. It
is not used (None) while a device of the plan is gone, suspect or on probation (its
trial tile is relayed, where its time is measured), and gives up (None) when a
tile failed, a device left or the job is overdue; the job is then relayed from
the first segment.

`SegmentRunner.run_segment` runs one segment relayed: it scatters one `TileTask`
per tile, gathers each gate's `ReductionPartial`s and publishes the exact combined
value as a `GateValue` (`edgedi.models.reduce`), and gathers the `TileResult`s.
A copy that fails, or whose device leaves, is re-sent elsewhere; an overdue tile
(a straggler) gets a speculative copy (see `edgedi.agent.tile_tracker`), and the
first valid result wins. `stitch_outputs` and `pooled_outputs` turn a segment's
tiles into the next input, or into the global average pool's mean.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgedi.agent.config import JobSettings
from edgedi.agent.direct import direct_tasks, task_batches
from edgedi.agent.job_intake import CoordinatorStatistics, DeviceLost, Inbound, Job, Reconnected
from edgedi.agent.layout import SegmentLayout, TileAssignment
from edgedi.agent.model_store import HeldModel
from edgedi.agent.planning import Planning
from edgedi.agent.result_checks import JobFailed, check_head_partial, check_output
from edgedi.agent.tile_tracker import TileRecord, TileTracker, from_a_copy
from edgedi.agent.transport import CoordinatorLinks
from edgedi.broker.errors import BrokerError
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import (
    GateValue,
    ReductionPartial,
    TileFailed,
    TileResult,
    TileTask,
    TileTaskBatch,
    new_message_id,
)
from edgedi.broker.plan import Plan
from edgedi.broker.tensors import Tensor
from edgedi.models.reduce import CoverageError, combine, pooled_mean, stitch_grid
from edgedi.models.units import splittable_head

__all__ = ["SegmentRunner", "pooled_outputs", "stitch_outputs"]

logger = logging.getLogger(__name__)


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


class SegmentRunner:
    """Runs the segments of the coordinator's jobs; see the module docstring."""

    def __init__(
        self,
        device_id: DeviceId,
        epoch: int,
        planning: Planning,
        links: CoordinatorLinks,
        settings: JobSettings,
        statistics: CoordinatorStatistics,
        tracker: TileTracker,
        *,
        alive_devices: Callable[[], Collection[str]],
        jobs: Mapping[str, Job],
        takes_batches: Callable[[str], bool] = lambda device: False,
    ) -> None:
        self.device_id = device_id
        self.epoch = epoch
        self.planning = planning
        self.links = links
        self.settings = settings
        self.statistics = statistics
        self.tracker = tracker
        self.alive_devices = alive_devices
        self.takes_batches = takes_batches
        """Does this device read `TileTaskBatch` (`edgedi.agent.direct.takes_task_batches`)?"""
        self.jobs = jobs
        """The coordinator's jobs in progress (speculative copies are bounded over all)."""

    def splits_head(
        self, held: HeldModel, segments: list[tuple[SegmentLayout, tuple[TileAssignment, ...]]]
    ) -> bool:
        """Direct runs: the last tiles send their share of the head's first layer."""
        unit = splittable_head(held.spec)
        return self.settings.split_head and unit is not None and segments[-1][0].last + 1 == unit

    async def run_direct(
        self,
        job: Job,
        held: HeldModel,
        plan: Plan,
        segments: list[tuple[SegmentLayout, tuple[TileAssignment, ...]]],
        x: npt.NDArray[np.float32],
    ) -> dict[int, npt.NDArray[np.float32]] | None:
        """Run the job on the direct data plane (see `edgedi.agent.direct`).

        Returns the last segment's outputs, or None when the job must be run
        through the leader: a device of the plan is gone, suspect or on probation,
        a tile failed, a device left, or the job is overdue (a straggler, lost
        messages). The relayed path then sends what is needed, with copies and
        re-dispatch, and times every tile.
        """
        used = {a.device for _, assignments in segments for a in assignments}
        alive = set(self.alive_devices())
        unusable = sorted((used - alive) | (used & self.tracker.suspects()))
        if unusable:
            logger.info("job %s: not direct, %s gone or not answering", job.job_id, unusable)
            return None
        # A newcomer's trial tile goes through the leader, which times it: on the
        # direct plane an overrun names no device, so a slow newcomer would never be
        # learnt, only relayed around.
        newcomers = sorted(self.tracker.unproven(used))
        if newcomers:
            logger.info("job %s: not direct, %s on probation", job.job_id, newcomers)
            return None
        started = time.monotonic()
        template = self._tile_task(
            job, held, plan, 0, segments[0][0], segments[0][1][0], x
        ).model_copy(update={"tensor": None})
        tasks = direct_tasks(
            template, segments, x, self.settings.wire_dtype, self.splits_head(held, segments)
        )
        job.direct_devices = used
        job.devices |= used
        if not await self._send_tasks(job, self._direct_sends(tasks)):
            return None
        job.add_time("scatter", time.monotonic() - started)
        job.local_span(self.device_id, "scatter", started, time.monotonic())
        last_layout, last_assignments = segments[-1]
        owners = {a.index: a.device for a in last_assignments}
        overdue_s = self.tracker.overdue_after(plan.predicted_latency_s)
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
            if isinstance(item, DeviceLost):
                reason = f"device {item.device} left"
                break
            if isinstance(item, Reconnected):
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
                check_head_partial(held, last_layout, item)
                if item.head_partial
                else check_output(last_layout, item)
            )
            if problem is not None:
                reason = f"bad result from {item.device}: {problem}"
                break
            outputs[item.tile] = item.tensor.array.astype(np.float32, copy=False)
            worker_compute = max(worker_compute, item.compute_seconds)
        job.direct_devices = set()
        if reason:
            self.statistics.direct_fallbacks += 1
            job.direct_failed = used
            logger.warning("job %s: direct plane gave up (%s); relaying", job.job_id, reason)
            return None
        job.add_time("compute", time.monotonic() - started - job.timings.get("scatter", 0.0) / 1000)
        job.add_time("worker_compute", worker_compute)
        return outputs

    async def run_segment(
        self,
        job: Job,
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
            if task.device not in alive or task.device in self.tracker.suspects():
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
                overdue_at=started + self.tracker.overdue_after(assignment.expected_s),
                attempt=job.attempt_base,
                running={job.attempt_base: task.device},
                sent={job.attempt_base: task.device},
                first_attempt=job.attempt_base,
            )
            job.tiles[(position, task.tile)] = record
            job.devices.add(task.device)
            self.tracker.on_trial(task.device)
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
            if isinstance(item, Reconnected):
                continue  # meant for a direct run that has given up already
            if isinstance(item, DeviceLost):
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
            if not from_a_copy(record, item):
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
                problem = check_output(layout, item)
                if problem is not None:
                    why = f"bad result from {item.device}: {problem}"
                    await self._copy_failed(job, record, item.attempt, why)
                    continue
                state.outputs[item.tile] = item.tensor.array.astype(np.float32, copy=False)
                record.done = True
                state.worker_compute = max(state.worker_compute, item.compute_seconds)
                self._learn_speed(job, record, item)
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

    async def _late_message(self, job: Job, item: Inbound) -> None:
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

    def _learn_speed(self, job: Job, record: TileRecord, result: TileResult) -> None:
        """Add the planned device's measured tile time to the job's (learnt at its end).

        When a copy beat the plan's own, that device's answer never comes (its tile
        is cancelled with the job); the time it had already taken is a lower bound
        of its compute time and is reported instead, unless the device holds other
        tiles too: then it may have spent that time on them (a copy of another
        device's tile, another job's), and the wait says nothing of its speed.
        """
        if record.compute_s <= 0:
            return
        first = record.first_attempt
        if result.attempt == first and result.compute_seconds > 0:
            job.add_compute(result.device, record.compute_s, result.compute_seconds)
        elif record.running.get(first) == record.planned_device and not self._holds_others(
            record.planned_device, record
        ):
            waited = time.monotonic() - record.first_sent_at
            job.add_compute(record.planned_device, record.compute_s, waited)

    def _holds_others(self, device: str, record: TileRecord) -> bool:
        """Does `device` hold an unanswered copy of a tile other than `record`'s?"""
        return any(
            other is not record and device in other.devices
            for job in self.jobs.values()
            for other in job.tiles.values()
        )

    def _tile_task(
        self,
        job: Job,
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
            channel_parts=_channel_parts(layout),
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

    def _direct_sends(self, tasks: list[TileTask]) -> list[TileTask | TileTaskBatch]:
        """A direct job's tasks as messages: one batch per device that reads them.

        In segment order, this device's own first (taking them costs the loop
        nothing); `_send_tasks` puts each segment's on the wire before it encodes the
        next one's. Sent all at once, the first segment's tasks went out only after
        every task of the job was encoded, some 30 ms at a 0.4-core loop for
        resnet34's 72 tasks, and no device (the leader neither) started before that.
        A batch goes where its device's first task would.
        """
        by_device: dict[str, list[TileTask]] = {}
        sends: list[TileTask | TileTaskBatch] = []
        for task in tasks:
            if task.device == self.device_id or not self.takes_batches(task.device):
                sends.append(task)
            else:
                by_device.setdefault(task.device, []).append(task)
        for device_tasks in by_device.values():
            sends.extend(task_batches(device_tasks))

        def order(item: TileTask | TileTaskBatch) -> tuple[int, bool]:
            first = item.tasks[0] if isinstance(item, TileTaskBatch) else item
            return first.segment, first.device != self.device_id

        return sorted(sends, key=order)

    async def _send_tasks(self, job: Job, items: Sequence[TileTask | TileTaskBatch]) -> bool:
        """Publish tasks concurrently (the PUBACK round trips overlap); False if any failed.

        Where the segment changes, and after a batch, the loop gets two turns before
        the next message is encoded: one for the publishes to queue their packets,
        one for its writer callback to put them on the socket (the MQTT client only
        writes from there).

        A task that could not be sent (the broker is away) is not fatal: its tile
        turns overdue and is sent again.
        """
        sends: list[asyncio.Future[None]] = []
        try:
            for index, item in enumerate(items):
                if isinstance(item, TileTaskBatch):
                    sends.append(asyncio.ensure_future(self.links.send_batch(item)))
                else:
                    sends.append(asyncio.ensure_future(self.links.send_task(item)))
                following = items[index + 1] if index + 1 < len(items) else None
                if following is not None and (
                    isinstance(item, TileTaskBatch)
                    or isinstance(following, TileTaskBatch)
                    or following.segment != item.segment
                ):
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
            outcomes = await asyncio.gather(*sends, return_exceptions=True)
        except BaseException:
            for send in sends:
                send.cancel()
            raise
        sent = True
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, BrokerError):
                tiles = (
                    [task.tile for task in item.tasks]
                    if isinstance(item, TileTaskBatch)
                    else [item.tile]
                )
                logger.warning(
                    "job %s: could not send tiles %s to %s: %s",
                    job.job_id,
                    tiles,
                    item.device,
                    outcome,
                )
                sent = False
            elif isinstance(outcome, BaseException):
                raise outcome
        return sent

    async def _send_gate(
        self, job: Job, state: _SegmentState, gate: int, devices: set[str]
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
        self, job: Job, state: _SegmentState, record: TileRecord, partial: ReductionPartial
    ) -> None:
        layout = state.layout
        if not 0 <= partial.gate < len(layout.gates):
            logger.warning("job %s: partial for unknown gate %d", job.job_id, partial.gate)
            return
        shape = layout.partial_shape(partial.gate)
        share = layout.gate_positions(partial.tile, partial.gate)
        if (
            partial.sums.shape != shape
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
        try:
            value = combine(
                # Tile order: every holder sums alike.
                (
                    (collected[index].sums.array, collected[index].positions)
                    for index in sorted(collected)
                ),
                shape,
                layout.partial_total(partial.gate),
                "sum" if layout.sums else "mean",
            )
        except CoverageError as error:
            raise JobFailed(f"gate {partial.gate} of segment {state.position}: {error}") from None
        state.gates[partial.gate] = GateValue(
            sender=self.device_id,
            job_id=job.submit.job_id,
            epoch=self.epoch,
            segment=state.position,
            gate=partial.gate,
            vector=Tensor(value),
        )
        devices = {
            device
            for (segment, _), other in job.tiles.items()
            if segment == state.position
            for device in other.devices
        }
        await self._send_gate(job, state, partial.gate, devices)

    async def _chase_stragglers(
        self, job: Job, state: _SegmentState, records: list[TileRecord]
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
            record.overdue_at = now + self.tracker.overdue_after(record.expected_s)
            if pending is not None and record.index in state.partials[pending]:
                continue
            if record.copies >= self.settings.speculative_copies:
                continue
            out = (other for job_out in self.jobs.values() for other in job_out.tiles.values())
            if self.tracker.copies_out(out, now) >= max(1, len(self.alive_devices())):
                # Everything is late (an overloaded cluster, predictions too optimistic):
                # more copies would only add load. The measurements correct the plans.
                self.statistics.speculation_held += 1
                continue
            waited = now - record.sent_at
            why = f"overdue: no answer from {record.device} after {waited:.2f} s"
            for device in record.devices:
                self.tracker.suspect(device, now)
            if await self._send_copy(job, record, why, speculative=True):
                record.copies += 1
                self.statistics.speculative += 1

    async def _device_lost(self, job: Job, record: TileRecord, device: str) -> None:
        for attempt, holder in list(record.running.items()):
            if holder == device:
                await self._copy_failed(job, record, attempt, f"device {device} left")

    async def _copy_failed(self, job: Job, record: TileRecord, attempt: int, reason: str) -> None:
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
        self, job: Job, avoid: Collection[str], exclude: Collection[str]
    ) -> str | None:
        """The alive device holding the job's model with the fewest unfinished tiles of it.

        Devices in `exclude` are never chosen, those in `avoid` only when nothing else is
        left.
        """
        holders = {birth.device for birth in self.planning.devices_for(job.submit.model)}
        suspects = self.tracker.suspects()
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
        self, job: Job, record: TileRecord, reason: str, *, speculative: bool
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
        record.overdue_at = now + self.tracker.overdue_after(record.expected_s)
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
        self.tracker.on_trial(device)
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


def stitch_outputs(
    layout: SegmentLayout, outputs: dict[int, npt.NDArray[np.float32]]
) -> npt.NDArray[np.float32]:
    """The segment's output map from its tiles (row-major grid)."""
    tiles = [outputs[index] for index in range(len(layout.row_tiles) * len(layout.column_tiles))]
    stitched = stitch_grid(tiles, len(layout.row_tiles), len(layout.column_tiles), _concatenate)
    return np.ascontiguousarray(stitched)


def _concatenate(pieces: list[npt.NDArray[np.float32]], axis: int) -> npt.NDArray[np.float32]:
    return np.concatenate(pieces, axis=axis)


def pooled_outputs(
    outputs: dict[int, npt.NDArray[np.float32]], shape: tuple[int, int, int]
) -> npt.NDArray[np.float64]:
    """The global average pool of the whole map from its disjoint tiles, exactly."""
    try:
        return pooled_mean(outputs.values(), shape)
    except CoverageError as error:
        raise JobFailed(
            f"the last segment's tiles cover {error.covered} of {error.expected} positions"
        ) from None


def _channel_parts(layout: SegmentLayout) -> tuple[tuple[int, int], ...] | None:
    """A task's `channel_parts`: the layout's hidden-channel partition, if it has one."""
    if layout.channel_parts is None:
        return None
    return tuple((part.start, part.stop) for part in layout.channel_parts)
