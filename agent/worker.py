"""The worker: runs the tile tasks the leader sends to this device.

Every task is validated before any work starts (epoch, model and architecture
digest, geometry, tensor shape and dtype; finiteness on the compute thread) and a
task that fails is answered with a `TileFailed` that says why: the leader is
waiting for it. Valid tasks wait in a bounded queue; a flood beyond it is refused
with `TileFailed` at once instead of being buffered without limit.

Each accepted tile is one coroutine that drives `edgedi.models.tiling.run_tile`
step by step on the device's single compute thread (a `ThreadPoolExecutor` with
one worker: the device computes one thing at a time, and the event loop never runs
torch). At an attention gate the tile publishes its partial sums and awaits the
combined gate value; meanwhile other tiles may use the compute thread, so two jobs
whose tiles wait for each other's gates cannot deadlock a device. Every wait is
bounded by the task's deadline; `CancelJob`, a deadline or a newer leader epoch
drops a job's tile state.

On the direct data plane a tile without attention gates may start before its
input is complete: once the rows its own device made are in, it computes the output
rows those determine (its interior), and the rest when the halo from its
neighbours has come, where the device's measured unit costs say splitting pays
(`edgedi.models.interior`).

`compute.slowdown` emulates a slower device (`edgedi.agent.pacing`): each compute
step takes `slowdown` times the CPU it used, so the device stays busy as a slower
one would, and the reported compute seconds include it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch

from edgedi.agent.clock import local_deadline
from edgedi.agent.layout import LayoutError, SegmentLayout, segment_layout
from edgedi.agent.model_store import HeldModel, ModelNotHeld, ModelStore
from edgedi.agent.pacing import paced
from edgedi.broker.errors import BrokerError
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import (
    WIRE_INT_MAX,
    CancelJob,
    GateValue,
    ReductionPartial,
    TileFailed,
    TileResult,
    TileRows,
    TileTask,
    TileTrace,
    TraceSpan,
)
from edgedi.broker.ratelimit import RateLimitedLog
from edgedi.broker.tensors import Tensor
from edgedi.models.channel_split import run_channel_tile
from edgedi.models.head_split import head_partial
from edgedi.models.interior import UnitCosts, interior_to_compute, part_geometry
from edgedi.models.reduce import CoverageError, combine
from edgedi.models.tiling import GatePartial, TileRunner, run_tile
from edgedi.models.units import Rows, TileGeometry, Unit, splittable_head

__all__ = ["Worker", "WorkerLinks", "WorkerStatistics"]

logger = logging.getLogger(__name__)

_TILE_DTYPES = ("float32", "float16")
_GATE_DTYPES = ("float32", "float64", "float16")
# A flood of bad tasks must not flood the journal: one line per reason this often.
_REFUSAL_LOG_INTERVAL_S = 10.0
# Remember this many cancelled job ids, so late tasks of a cancelled job are dropped.
_CANCELLED_MEMORY = 1024
# Direct data plane: rows that arrive before their task, and peers' gate partials, are
# kept this many (oldest dropped first): enough for every job in flight, bounded
# against a flood.
_EARLY_ROWS_MEMORY = 512
_PARTIALS_MEMORY = 2048
# ... and at most this many bytes of them: a channel tile's partial is a whole map
# (hundreds of KB), so a count alone does not bound the memory a flood can take.
_PARTIALS_BYTES = 256 * 2**20


class WorkerLinks(Protocol):
    """Where a worker's messages go (the broker, or straight to a local coordinator)."""

    async def send_partial(self, message: ReductionPartial) -> None: ...

    async def send_tile_outcome(self, message: TileResult | TileFailed | TileTrace) -> None: ...

    async def send_peer_partial(self, message: ReductionPartial) -> None:
        """Once, for every other holder of the segment (they all read it)."""
        ...

    async def send_peer(self, device: str, message: TileRows | ReductionPartial) -> None:
        """Direct data plane: to another device, or to this one's own worker."""
        ...


class _TileRefused(Exception):
    """A task that cannot be run; the message is the `TileFailed` reason."""


@dataclass
class WorkerStatistics:
    accepted: int = 0
    refused: int = 0
    stale_epoch: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    unanswered: int = 0
    busy_seconds: float = 0.0
    gate_rounds: int = 0
    """Attention gates this device's tiles waited at (one partial out, one value back)."""
    early_parts: int = 0
    """Direct tiles whose interior was computed before their halo arrived."""


@dataclass
class _Tile:
    task: TileTask
    held: HeldModel
    layout: SegmentLayout
    rows: TileGeometry
    columns: TileGeometry
    runner: asyncio.Task[None] | None = None
    compute_seconds: float = 0.0
    gates: dict[tuple[int, int], asyncio.Future[npt.NDArray[Any]]] = field(default_factory=dict)
    input: npt.NDArray[Any] | None = None
    """Direct task: the input assembled from the peers' `TileRows`."""
    received: npt.NDArray[np.bool_] | None = None
    """Direct task: which input rows have arrived (None: the task carried them)."""
    queued: bool = False
    deadline: float = float("inf")
    """The task's deadline on this device's monotonic clock."""
    accepted_at: float = 0.0
    """Wall time the task arrived (traced tiles: the start of their timeline)."""
    ready_at: float = 0.0
    """Wall time its input was complete."""
    spans: list[TraceSpan] = field(default_factory=list)
    """The timeline of a traced task (`TileTask.trace`)."""
    early_queued: bool = False
    """Its interior is queued (or was) to run before its halo arrives (`models.interior`)."""
    early_task: asyncio.Task[None] | None = None
    early: tuple[Rows, npt.NDArray[Any]] | None = None
    """The interior computed ahead: its output rows and their values."""

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(self.held.spec.units[self.task.first_unit : self.task.last_unit + 1])

    @property
    def may_start_early(self) -> bool:
        """A direct row tile with no gates: its output rows may be computed in parts."""
        layout = self.layout
        return (
            self.received is not None
            and not layout.gates
            and layout.channel_parts is None
            and layout.column_parts is None
        )

    def span(
        self, what: Literal["rows", "queue", "compute", "gate"], start: float, end: float
    ) -> None:
        if self.task.trace:
            self.spans.append(TraceSpan(what=what, start=start, end=max(start, end)))

    @property
    def waiting_for_rows(self) -> bool:
        return self.received is not None and not bool(self.received.all())


def _key(task: TileTask) -> tuple[str, int, int]:
    return (task.job_id, task.segment, task.tile)


def _version(task: TileTask) -> tuple[int, int, int]:
    """Which of two tasks of one tile is newer: a later leader's (epoch), a later run of
    the job, then a later attempt. A new leader that takes a job over starts again at
    attempt 0, and its task must not be taken for a redelivery of the old leader's
    attempt 2 still waiting here for rows that will never come."""
    return (task.epoch, task.run, task.attempt)


class Worker:
    """Executes tile tasks; see the module docstring."""

    def __init__(
        self,
        device_id: str,
        store: ModelStore,
        executor: Executor,
        links: WorkerLinks,
        *,
        accepts_epoch: Callable[[int], bool],
        slowdown: float = 1.0,
        max_active: int = 8,
        max_queued: int = 32,
        wire_dtype: str = "float32",
        unit_costs: Callable[[str], UnitCosts | None] = lambda digest: None,
    ) -> None:
        self.device_id = DeviceId(device_id)
        self.store = store
        self.executor = executor
        self.links = links
        self.accepts_epoch = accepts_epoch
        self.slowdown = slowdown
        self.max_active = max_active
        self.wire_dtype = np.dtype(wire_dtype)
        # This device's measured unit costs by model digest: they say whether a
        # tile's interior is worth computing ahead (`models.interior.split_pays`).
        self.unit_costs = unit_costs
        self.statistics = WorkerStatistics()
        self._queue: asyncio.Queue[_Tile | _Interior] = asyncio.Queue(maxsize=max_queued)
        self._refusals: asyncio.Queue[TileFailed] = asyncio.Queue(maxsize=max(64, max_queued))
        self._tiles: dict[tuple[str, int, int], _Tile] = {}
        self._gate_values: dict[tuple[str, int, int], npt.NDArray[Any]] = {}
        self._early_rows: OrderedDict[tuple[str, int, int], list[TileRows]] = OrderedDict()
        self._partials = _PartialStore(_PARTIALS_MEMORY, _PARTIALS_BYTES)
        # job id -> (epoch, leader) of the newest cancel: tasks of older epochs and that
        # leader's own are dropped; a later leader's, which took the job over, are not,
        # nor those of a rival that claimed the same epoch and won.
        # job id -> (epoch, leader, run) of its cancellation (see `drop_job`)
        self._cancelled: OrderedDict[str, tuple[int, str, int]] = OrderedDict()
        self._slots = asyncio.Semaphore(max_active)
        self._accepting = True
        self._group: asyncio.TaskGroup | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._log = RateLimitedLog(logger, _REFUSAL_LOG_INTERVAL_S)

    # --- state ----------------------------------------------------------------------

    @property
    def busy_tiles(self) -> int:
        """Tiles queued or running on this device (the heartbeat reports it)."""
        return len(self._tiles)

    def stop_accepting(self) -> None:
        """Refuse new tasks from now on (a graceful stop drains the ones in hand)."""
        self._accepting = False

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a deadline
        """Wait until no tile is queued or running; False when `timeout` ran out first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # --- incoming -------------------------------------------------------------------

    def accept(self, task: TileTask) -> None:
        """Take a task from the leader (never blocks; refusals are answered)."""
        if task.device != self.device_id:
            self._refuse(task, f"task addressed to {task.device}, not {self.device_id}")
            return
        if not self.accepts_epoch(task.epoch):
            self.statistics.stale_epoch += 1
            logger.debug("ignored task of %s from stale epoch %d", task.job_id, task.epoch)
            return
        if self._is_cancelled(task):
            logger.debug("ignored task of cancelled job %s", task.job_id)
            return
        if task.job_id in self._cancelled:
            # A later run of a job id cancelled before (resubmitted after an error):
            # its rows and partials must not be taken for the old run's.
            del self._cancelled[task.job_id]
        key = _key(task)
        existing = self._tiles.get(key)
        if existing is not None and _version(existing.task) >= _version(task):
            logger.debug("ignored duplicate task %s", key)  # a QoS 1 redelivery
            return
        if not self._accepting:
            self._refuse(task, "the device is shutting down")
            return
        # The leader's deadline as time left, on our own clock (see edgedi.agent.clock).
        now = time.monotonic()
        deadline = local_deadline(task.deadline, task.deadline_in_s, now=now, wall_now=time.time())
        if deadline <= now:
            self._refuse(task, "the task's deadline has already passed")
            return
        try:
            tile = self._prepare(task)
            tile.deadline = deadline
        except _TileRefused as refusal:
            self._refuse(task, str(refusal))
            return
        self._expire_waiting()
        if not tile.waiting_for_rows:
            try:
                self._queue.put_nowait(tile)
            except asyncio.QueueFull:
                self._refuse(
                    task, f"the device is overloaded ({self._queue.maxsize} tiles already queued)"
                )
                return
            tile.queued = True
        # Only a valid newer attempt replaces the tile in hand: a refused one must not
        # cancel work the leader is still waiting for. (A queued one is skipped.)
        if existing is not None:
            if existing.early_task is not None:
                existing.early_task.cancel()
            if existing.runner is not None:
                existing.runner.cancel()
        self._tiles[key] = tile
        self._idle.clear()
        self.statistics.accepted += 1
        if tile.waiting_for_rows:
            for rows in self._early_rows.pop(key, []):
                self.on_rows(rows)

    def _prepare(self, task: TileTask) -> _Tile:
        try:
            held = self.store.get(task.model, task.input_size)
        except ModelNotHeld as error:
            raise _TileRefused(str(error)) from None
        if task.model_digest != held.digest:
            raise _TileRefused(
                f"model {task.model} architecture differs: task digest {task.model_digest}, "
                f"this device has {held.digest}"
            )
        try:
            layout = segment_layout(
                held.spec,
                task.first_unit,
                task.last_unit,
                task.row_parts,
                task.column_parts,
                task.channel_parts,
            )
            rows, columns = layout.tile(task.tile)
        except LayoutError as error:
            raise _TileRefused(f"bad tile description: {error}") from None
        if task.local_gates and layout.count != 1:
            # Local means over part of the map are the EdgeDI approximation, not exact.
            raise _TileRefused(
                f"local gates asked for tile {task.tile} of {layout.count}: only a tile "
                "that is the whole map may compute its gates alone"
            )
        expected_shape = layout.input_shape(task.tile)
        if task.direct and (layout.column_parts is not None):
            raise _TileRefused("the direct data plane takes row strips only")
        if task.tensor is not None and task.tensor.shape != expected_shape:
            raise _TileRefused(
                f"input tensor has shape {list(task.tensor.shape)}, the tile needs "
                f"{list(expected_shape)}"
            )
        if task.tensor is not None and task.tensor.dtype not in _TILE_DTYPES:
            raise _TileRefused(
                f"input tensor dtype {task.tensor.dtype} is not one of {', '.join(_TILE_DTYPES)}"
            )
        geometry_rows = (rows.in_rows.start, rows.in_rows.stop)
        geometry_columns = (columns.in_rows.start, columns.in_rows.stop)
        if tuple(task.input_rows) != geometry_rows or (
            task.input_columns is not None and tuple(task.input_columns) != geometry_columns
        ):
            raise _TileRefused(
                f"input rows/columns {task.input_rows}/{task.input_columns} disagree with the "
                f"geometry {geometry_rows}/{geometry_columns}"
            )
        if tuple(task.output_rows) != (rows.out_rows.start, rows.out_rows.stop):
            raise _TileRefused(
                f"output rows {task.output_rows} disagree with the geometry {rows.out_rows}"
            )
        if task.head_partial and (
            task.forward
            or layout.column_parts is not None
            or layout.channel_parts is not None
            or splittable_head(held.spec) != task.last_unit + 1
        ):
            raise _TileRefused(
                "a head partial needs the last segment's row strip of a model whose head "
                "starts with a linear layer on the whole map"
            )
        for forward in task.forward:
            if not rows.out_rows.start <= forward.rows[0] < forward.rows[1] <= rows.out_rows.stop:
                raise _TileRefused(
                    f"forwards rows {forward.rows} that the tile does not produce ({rows.out_rows})"
                )
        tile = _Tile(task, held, layout, rows, columns)
        tile.accepted_at = tile.ready_at = time.time()
        if task.tensor is None:
            tile.input = np.zeros(expected_shape, dtype=np.float32)
            tile.received = np.zeros(expected_shape[2], dtype=np.bool_)
        return tile

    def on_gate(self, message: GateValue) -> None:
        """A combined gate value; only tiles of that job and segment on this device care.

        A value that cannot be the gate's (another shape, a gate the segment does not
        have, NaN) is ignored with a warning: handed to the tile it would fail it, and
        the leader's real value may still come.
        """
        if not self.accepts_epoch(message.epoch):
            return
        key = (message.job_id, message.segment, message.gate)
        tiles = [
            tile
            for tile in self._tiles.values()
            if tile.task.job_id == message.job_id and tile.task.segment == message.segment
        ]
        if not tiles:
            return  # a gate of a job with no tile here (every worker hears every gate)
        problem = _gate_problem(tiles[0].layout, message)
        if problem is not None:
            self._log.warning(
                "gate", "ignored gate value %s of job %s: %s", message.gate, message.job_id, problem
            )
            return
        value = message.vector.array
        delivered = False
        for tile in tiles:
            future = tile.gates.get((message.segment, message.gate))
            if future is not None and not future.done():
                future.set_result(value)
                delivered = True
        if not delivered:
            # Arrived before the tile asked (e.g. the coordinator re-sent it): keep it.
            self._gate_values[key] = value

    def on_rows(self, message: TileRows) -> None:
        """Direct data plane: input rows of a tile here, from the device that made them.

        Rows that come before their task are kept (bounded) until it arrives; rows
        that do not fit the tile (other rows, shape, dtype, NaN) are dropped with a
        warning: the tile then never starts and the leader's deadline handles it.
        """
        if not self.accepts_epoch(message.epoch):
            return
        key = (message.job_id, message.segment, message.tile)
        tile = self._tiles.get(key)
        if tile is not None and message.epoch != tile.task.epoch:
            if message.epoch < tile.task.epoch:
                return  # a deposed leader's plan's rows
            # A new leader took the job over (same id) and its task for this tile is
            # still on its way: the rows wait for it, the old tile must not spend them.
            tile = None
        if tile is None:
            if self._is_cancelled_job(message.job_id, message.epoch):
                return
            self._early_rows.setdefault(key, []).append(message)
            self._early_rows.move_to_end(key)
            while len(self._early_rows) > _EARLY_ROWS_MEMORY:
                self._early_rows.popitem(last=False)
            return
        if tile.received is None or tile.input is None or message.attempt != tile.task.attempt:
            return  # the task carried its input, or the rows are of another attempt
        problem = _rows_problem(tile, message)
        if problem is not None:
            self._log.warning(
                "rows", "dropped rows for tile %s from %s: %s", key, message.device, problem
            )
            return
        start = message.rows[0] - tile.rows.in_rows.start
        stop = message.rows[1] - tile.rows.in_rows.start
        columns = tile.columns.in_rows
        tile.input[:, :, start:stop, :] = message.tensor.array[
            :, :, :, columns.start : columns.stop
        ]
        tile.received[start:stop] = True
        if tile.queued:
            return
        if tile.waiting_for_rows:
            self._maybe_start_early(tile)
            return
        tile.ready_at = time.time()
        tile.span("rows", tile.accepted_at, tile.ready_at)
        try:
            self._queue.put_nowait(tile)
        except asyncio.QueueFull:
            self._drop(key, tile)
            self._refuse(
                tile.task, f"the device is overloaded ({self._queue.maxsize} tiles already queued)"
            )
            return
        tile.queued = True

    def _interior(self, tile: _Tile) -> Rows | None:
        """The output rows of `tile` to compute now, before the rest of its input is
        in: as many as its input allows, if splitting the tile pays."""
        if not tile.may_start_early or tile.received is None:
            return None
        costs = self.unit_costs(tile.held.digest)
        if costs is None:
            return None  # not measured: no way to tell whether splitting pays
        return interior_to_compute(tile.units, tile.rows, tile.received, costs)

    def _maybe_start_early(self, tile: _Tile) -> None:
        """Queue the tile's interior when enough of its input is in (`models.interior`)."""
        if tile.early_queued or self._interior(tile) is None:
            return
        try:
            self._queue.put_nowait(_Interior(tile))
        except asyncio.QueueFull:
            return  # the whole tile runs when its rows are in, as without
        tile.early_queued = True

    def _expire_waiting(self) -> None:
        """Direct tiles whose rows never came (their job moved on): gone at the deadline."""
        now = time.monotonic()
        for key, tile in list(self._tiles.items()):
            if tile.waiting_for_rows and tile.deadline <= now:
                logger.info("tile %s: its input rows did not come before the deadline", key)
                self._drop(key, tile)

    def on_peer_partial(self, message: ReductionPartial) -> None:
        """Direct data plane: a peer's (or a local tile's) partial sums for a gate.

        Every holder of the segment gets every tile's partial and combines them in
        tile order, so all holders compute bit-identical gate values.
        """
        if not self.accepts_epoch(message.epoch):
            return
        # By epoch too: a job taken over by a new leader keeps its id, and its old
        # plan's partials (other tiles, other areas) may still be here when the new
        # plan's come, if the new tasks outran the new leader's record.
        key = (message.job_id, message.segment, message.gate, message.epoch)
        collected = self._partials.get(key)
        if collected is None:
            if self._is_cancelled_job(message.job_id, message.epoch):
                return
            mine = [t.task.segment for t in self._tiles.values() if t.task.job_id == key[0]]
            if mine and message.segment not in mine:
                return  # every device reads every partial: not a segment held here
        self._partials.add(key, message)  # copies of one tile sum alike: the first stays
        self._combine(key)

    def _combine(self, key: _PartialKey) -> None:
        """Deliver the gate's mean to the tiles here once every tile's partial is in."""
        job_id, segment, gate, epoch = key
        waiting = [
            tile
            for tile in self._tiles.values()
            if tile.task.job_id == job_id
            and tile.task.segment == segment
            and tile.task.epoch == epoch
            and tile.task.direct
        ]
        collected = self._partials.get(key)
        if not waiting or collected is None:
            return
        layout = waiting[0].layout
        if gate >= len(layout.gates) or len(collected) < layout.count:
            return
        shape = layout.partial_shape(gate)
        for index in range(layout.count):
            partial = collected.get(index)
            if (
                partial is None
                or partial.sums.shape != shape
                or (partial.positions != layout.gate_positions(index, gate))
                or not partial.sums.is_finite()
            ):
                bad = self._partials.discard(key, index)
                if bad is not None:
                    self._log.warning(
                        "partial",
                        "dropped a malformed partial of tile %d of job %s from %s",
                        index,
                        job_id,
                        bad.device,
                    )
                return
        try:
            value = combine(
                # Tile order: every holder of the segment computes the same value.
                (
                    (collected[index].sums.array, collected[index].positions)
                    for index in range(layout.count)
                ),
                shape,
                layout.partial_total(gate),
                "sum" if layout.sums else "mean",
            )
        except CoverageError:
            self._log.warning("partial", "partials of job %s cover the wrong area", job_id)
            return
        self._partials.pop(key)
        delivered = False
        for tile in waiting:
            future = tile.gates.get((segment, gate))
            if future is not None and not future.done():
                future.set_result(value)
                delivered = True
        if not delivered:
            # The gate's value is the whole map's, whatever the plan: kept by gate only.
            self._gate_values[job_id, segment, gate] = value

    def _is_cancelled_job(self, job_id: str, epoch: int) -> bool:
        cancel = self._cancelled.get(job_id)
        return cancel is not None and epoch <= cancel[0]

    def cancel_job(self, message: CancelJob) -> None:
        if not self.accepts_epoch(message.epoch):
            return
        self.drop_job(
            message.job_id,
            f"cancelled: {message.reason or 'no reason given'}",
            epoch=message.epoch,
            leader=message.sender,
            run=message.run,
        )

    def on_epoch(self, epoch: int) -> None:
        """A newer leader took over: tiles of older epochs can never complete."""
        stale = {tile.task.job_id for tile in self._tiles.values() if tile.task.epoch < epoch}
        for job_id in stale:
            self.drop_job(job_id, f"leader epoch {epoch} superseded the task's", epoch=epoch - 1)

    def drop_job(
        self,
        job_id: str,
        why: str,
        epoch: int | None = None,
        leader: str = "",
        run: int = WIRE_INT_MAX,
    ) -> None:
        """Stop and forget a job's tiles, and ignore its later tasks: those of epochs
        before `epoch`, and of `epoch` itself from `leader` (from anyone when "") up to
        run `run` (a resubmitted job's next run is taken). Without an epoch, all of them."""
        cancel = (WIRE_INT_MAX, "", WIRE_INT_MAX) if epoch is None else (epoch, leader, run)
        known = self._cancelled.get(job_id)
        if known is not None and known[0] == cancel[0]:
            # Two leaders of one epoch cancelled it: from anyone.
            who = cancel[1] if known[1] == cancel[1] else ""
            cancel = (cancel[0], who, max(known[2], cancel[2]))
        elif known is not None and known[0] > cancel[0]:
            cancel = known
        self._cancelled[job_id] = cancel
        self._cancelled.move_to_end(job_id)
        while len(self._cancelled) > _CANCELLED_MEMORY:
            self._cancelled.popitem(last=False)
        for key, tile in list(self._tiles.items()):
            if key[0] != job_id or not self._is_cancelled(tile.task):
                continue
            self.statistics.cancelled += 1
            logger.debug("dropping tile %s: %s", key, why)
            if tile.early_task is not None:
                tile.early_task.cancel()
            if tile.runner is not None:
                tile.runner.cancel()
            else:  # still queued: the dispatcher skips it
                self._drop(key, tile)
        if any(k[0] == job_id and not self._is_cancelled(t.task) for k, t in self._tiles.items()):
            return  # a rival leader's tiles of the job still need their gate values
        self._forget_job(job_id)

    def _forget_job(self, job_id: str) -> None:
        """Gate values, partials and early rows of a job with no tile here any more."""
        for store in (self._gate_values, self._early_rows):
            for key in [k for k in store if k[0] == job_id]:
                del store[key]
        self._partials.forget_job(job_id)

    def _is_cancelled(self, task: TileTask) -> bool:
        cancel = self._cancelled.get(task.job_id)
        if cancel is None:
            return False
        epoch, leader, run = cancel
        return task.epoch < epoch or (
            task.epoch == epoch and leader in ("", task.sender) and task.run <= run
        )

    def _drop(self, key: tuple[str, int, int], tile: _Tile) -> None:
        if self._tiles.get(key) is tile:
            del self._tiles[key]
        job_id = key[0]
        if not any(other[0] == job_id for other in self._tiles):
            # Gate values that arrived twice (direct and via the broker), partials of
            # gates passed: nothing here needs them any more. (Direct rows for a later
            # segment are kept: their task may still be on its way.)
            for gate_key in [k for k in self._gate_values if k[0] == job_id]:
                del self._gate_values[gate_key]
            self._partials.forget_job(job_id)
        if not self._tiles:
            self._idle.set()

    def _refuse(self, task: TileTask, reason: str) -> None:
        self.statistics.refused += 1
        self._log.warning(
            "refused:" + reason.split(":", 1)[0][:30],
            "refused tile %s of job %s: %s",
            task.tile,
            task.job_id,
            reason,
        )
        try:
            self._refusals.put_nowait(self._failure(task, reason))
        except asyncio.QueueFull:
            self.statistics.unanswered += 1
            self._log.warning("unanswered", "refusal queue full; not answering %s", task.job_id)

    # --- running --------------------------------------------------------------------

    async def run(self) -> None:
        """Run tiles until cancelled."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._send_refusals(), name=f"worker-refusals-{self.device_id}")
            while True:
                await self._slots.acquire()
                queued = await self._queue.get()
                tile = queued.tile if isinstance(queued, _Interior) else queued
                key = _key(tile.task)
                if self._tiles.get(key) is not tile:  # cancelled or replaced while queued
                    self._slots.release()
                    continue
                name = f"{tile.task.job_id}-{key[1]}-{key[2]}"
                if isinstance(queued, _Interior):
                    tile.early_task = group.create_task(
                        self._run_interior(tile), name=f"interior-{name}"
                    )
                else:
                    tile.runner = group.create_task(self._run_tile(tile), name=f"tile-{name}")

    async def _run_interior(self, tile: _Tile) -> None:
        """The tile's interior, while its halo is still on the way; its edges are
        computed with the rest (`_compute`). Holds a slot like a tile."""
        try:
            if not tile.waiting_for_rows:
                return  # all its rows came meanwhile: the tile runs whole
            interior = self._interior(tile)
            if interior is None:
                return
            geometry = part_geometry(tile.units, interior)
            x = self._part_input(tile, geometry)
            output, seconds = await self._step(
                tile, functools.partial(self._run_part, tile, geometry, x)
            )
            tile.compute_seconds += seconds
            self.statistics.busy_seconds += seconds
            tile.early = (interior, output)
            self.statistics.early_parts += 1
        except asyncio.CancelledError:
            raise
        except _TileRefused:
            pass  # bad input rows: the whole tile refuses them, with the reason
        except Exception:  # the whole tile still runs once its rows are in
            logger.exception("interior of tile %s failed", _key(tile.task))
        finally:
            self._slots.release()

    def _part_input(self, tile: _Tile, geometry: TileGeometry) -> npt.NDArray[np.float32]:
        """A copy of the input rows of part `geometry` (the tile's input may still be
        written to by later rows)."""
        assert tile.input is not None
        first = tile.rows.in_rows.start
        rows = tile.input[:, :, geometry.in_rows.start - first : geometry.in_rows.stop - first]
        return np.array(rows, dtype=np.float32, copy=True)

    def _run_part(
        self, tile: _Tile, geometry: TileGeometry, x: npt.NDArray[np.float32]
    ) -> npt.NDArray[Any]:
        """On the compute thread: output rows of one part of a gate-free tile."""
        if not np.isfinite(x).all():
            raise _TileRefused("input tensor holds NaN or infinite values")
        runner = run_tile(tile.held.model, geometry, torch.from_numpy(x), columns=tile.columns)
        output = _advance(runner, None, self.wire_dtype)
        assert not isinstance(output, GatePartial)  # a tile with gates has no parts
        return output

    async def _send_refusals(self) -> None:
        while True:
            failure = await self._refusals.get()
            try:
                await self.links.send_tile_outcome(failure)
            except BrokerError as error:
                logger.warning("could not send a refusal for %s: %s", failure.job_id, error)

    async def _run_tile(self, tile: _Tile) -> None:
        task = tile.task
        key = _key(task)
        outcome: TileResult | TileFailed | None = None
        tile.span("queue", tile.ready_at, time.time())
        try:
            remaining = tile.deadline - time.monotonic()
            async with asyncio.timeout(max(0.0, remaining)):
                outcome = await self._compute(tile)
        except TimeoutError:
            outcome = self._failure(tile.task, "deadline exceeded while computing the tile")
        except asyncio.CancelledError:
            raise  # cancelled job or shutdown: nobody waits for an answer
        except Exception as error:  # a tile must never take the worker down
            logger.exception("tile %s failed", key)
            outcome = self._failure(tile.task, f"{type(error).__name__}: {error}")
        finally:
            self._drop(key, tile)
            self._slots.release()
        if isinstance(outcome, TileFailed):
            self.statistics.failed += 1
        else:
            self.statistics.completed += 1
        if task.trace:
            await self._send_trace(tile)
        if outcome is None:
            return  # its rows went to the next segment's devices
        try:
            await self.links.send_tile_outcome(outcome)
        except BrokerError as error:
            logger.warning("could not send the outcome of tile %s: %s", key, error)

    async def _send_trace(self, tile: _Tile) -> None:
        """Before the outcome, on the same topic: the leader has it when the job ends."""
        task = tile.task
        trace = TileTrace(
            sender=self.device_id,
            job_id=task.job_id,
            epoch=task.epoch,
            segment=task.segment,
            tile=task.tile,
            device=self.device_id,
            attempt=task.attempt,
            spans=tuple(tile.spans[-256:]),
        )
        try:
            await self.links.send_tile_outcome(trace)
        except BrokerError as error:
            logger.warning("could not send the trace of %s: %s", _key(task), error)

    def _failure(self, task: TileTask, reason: str) -> TileFailed:
        return TileFailed(
            sender=self.device_id,
            job_id=task.job_id,
            epoch=task.epoch,
            segment=task.segment,
            tile=task.tile,
            device=self.device_id,
            reason=reason[:2000],
            attempt=task.attempt,
        )

    async def _step(self, tile: _Tile, function: Callable[[], Any]) -> tuple[Any, float]:
        loop = asyncio.get_running_loop()
        result, seconds, wall = await loop.run_in_executor(self.executor, self._timed, function)
        tile.span("compute", wall, wall + seconds)
        return result, seconds

    def _timed(self, function: Callable[[], Any]) -> tuple[Any, float, float]:
        """Runs on the compute thread: the step, then the emulated slowdown."""
        wall = time.time()
        result, seconds = paced(function, self.slowdown)
        return result, seconds, wall

    async def _compute(self, tile: _Tile) -> TileResult | TileFailed | None:
        """The tile's outcome for the leader; None when its rows went to its peers."""
        task = tile.task
        runner_holder: list[TileRunner] = []
        if tile.early_task is not None:
            await asyncio.wait([tile.early_task])  # on the compute thread before us, or done
        early = tile.early

        def edges() -> npt.NDArray[Any]:
            """The rows around the interior computed ahead, stitched to it."""
            assert early is not None
            interior, inside = early
            out = tile.rows.out_rows
            pieces = []
            for part in (Rows(out.start, interior.start), interior, Rows(interior.stop, out.stop)):
                if part == interior:
                    pieces.append(inside)
                elif not part.empty:
                    geometry = part_geometry(tile.units, part)
                    pieces.append(self._run_part(tile, geometry, self._part_input(tile, geometry)))
            return np.ascontiguousarray(np.concatenate(pieces, axis=2))

        out_rows = (tile.rows.out_rows.start, tile.rows.out_rows.stop)

        def finished(step: GatePartial | npt.NDArray[Any]) -> GatePartial | npt.NDArray[Any]:
            """The output, and the tile's block of the head's first layer where it has one,
            in the same trip to the compute thread: a trip back through the event loop
            between them cost a quota-limited device up to 9 ms on the critical path."""
            if isinstance(step, GatePartial) or not task.head_partial:
                return step
            return head_partial(tile.held.model, out_rows, torch.from_numpy(step))

        def advance(value: npt.NDArray[Any]) -> GatePartial | npt.NDArray[Any]:
            return finished(_advance(runner_holder[0], value, self.wire_dtype))

        def start() -> GatePartial | npt.NDArray[Any]:
            if early is not None:
                return edges()
            array = tile.input if task.tensor is None else task.tensor.array
            assert array is not None
            if not np.isfinite(array).all():
                raise _TileRefused("input tensor holds NaN or infinite values")
            x = torch.from_numpy(array.astype(np.float32, copy=True))
            channels = tile.layout.channel_parts
            if channels is not None:
                units = tile.held.spec.units[task.first_unit : task.last_unit + 1]
                runner = run_channel_tile(
                    tile.held.model,
                    units,
                    channels[task.tile],
                    x,
                    tile.rows.out_rows,
                    alone=task.local_gates,
                )
            else:
                # A tile that is the whole map has every position of each gate's mean:
                # it computes the mean itself instead of a round trip per gate.
                runner = run_tile(
                    tile.held.model,
                    tile.rows,
                    x,
                    columns=tile.columns,
                    gate_mode="local" if task.local_gates else "exact",
                )
            runner_holder.append(runner)
            return _advance(runner, None, self.wire_dtype)

        try:
            step, seconds = await self._step(tile, lambda: finished(start()))
        except _TileRefused as refusal:
            return self._failure(tile.task, str(refusal))
        tile.compute_seconds += seconds
        self.statistics.busy_seconds += seconds
        while isinstance(step, GatePartial):
            await self._publish_partial(tile, step)
            waited = time.time()
            value = await self._gate_value(tile, step.index)
            tile.span("gate", waited, time.time())
            self.statistics.gate_rounds += 1
            step, seconds = await self._step(tile, functools.partial(advance, value))
            tile.compute_seconds += seconds
            self.statistics.busy_seconds += seconds
        output = step
        if task.forward:
            await self._forward(tile, output)
            return None
        columns = tile.columns.out_rows
        return TileResult(
            sender=self.device_id,
            job_id=task.job_id,
            epoch=task.epoch,
            segment=task.segment,
            tile=task.tile,
            device=self.device_id,
            output_rows=out_rows,
            output_columns=(columns.start, columns.stop),
            tensor=Tensor(output),
            compute_seconds=tile.compute_seconds,
            attempt=task.attempt,
            head_partial=task.head_partial,
        )

    async def _forward(self, tile: _Tile, output: npt.NDArray[Any]) -> None:
        """Direct data plane: each next-segment tile gets the rows it needs, from here."""
        task = tile.task
        first = tile.rows.out_rows.start
        messages = [
            (
                forward.device,
                TileRows(
                    sender=self.device_id,
                    job_id=task.job_id,
                    epoch=task.epoch,
                    segment=task.segment + 1,
                    tile=forward.tile,
                    device=self.device_id,
                    rows=forward.rows,
                    tensor=Tensor(
                        np.ascontiguousarray(
                            output[:, :, forward.rows[0] - first : forward.rows[1] - first, :]
                        )
                    ),
                    attempt=task.attempt,
                ),
            )
            for forward in task.forward
        ]
        for device, message in messages:
            self._send_soon(device, message)

    async def _publish_partial(self, tile: _Tile, partial: GatePartial) -> None:
        task = tile.task
        message = ReductionPartial(
            sender=self.device_id,
            job_id=task.job_id,
            epoch=task.epoch,
            segment=task.segment,
            tile=task.tile,
            gate=partial.index,
            device=self.device_id,
            # A channel tile's partial is a whole map: float32 halves it (every holder
            # then sums the same float32 values, in tile order, in float64).
            sums=Tensor(
                np.ascontiguousarray(
                    partial.sums, dtype=np.float32 if partial.reduce == "sum" else np.float64
                )
            ),
            positions=partial.count,
        )
        if task.peers is None:
            await self.links.send_partial(message)
            return
        if set(task.peers) - {self.device_id}:
            group = self._group
            if group is None:
                raise RuntimeError("the worker is not running")
            group.create_task(self._send_partial_to_peers(message), name="peer-partial")
        self.on_peer_partial(message)  # the tiles here, this one included

    def _send_soon(self, device: str, message: TileRows | ReductionPartial) -> None:
        """Send to a peer without holding the tile up for the broker's acknowledgement.

        The session re-sends an unacknowledged QoS 1 message itself; a send that fails
        for good leaves its receiver waiting, which the leader's deadline handles.
        """
        group = self._group
        if group is None:
            raise RuntimeError("the worker is not running")
        group.create_task(self._send_peer(device, message), name=f"peer-{device}")

    async def _send_peer(self, device: str, message: TileRows | ReductionPartial) -> None:
        try:
            await self.links.send_peer(device, message)
        except BrokerError as error:
            self._log.warning(
                "peer",
                "could not send a %s of job %s to %s: %s",
                message.kind,
                message.job_id,
                device,
                error,
            )

    async def _send_partial_to_peers(self, message: ReductionPartial) -> None:
        try:
            await self.links.send_peer_partial(message)
        except BrokerError as error:
            self._log.warning(
                "peer", "could not send a partial of job %s: %s", message.job_id, error
            )

    async def _gate_value(self, tile: _Tile, gate: int) -> npt.NDArray[Any]:
        task = tile.task
        key = (task.job_id, task.segment, gate)
        early = self._gate_values.pop(key, None)
        if early is not None:
            return early
        future: asyncio.Future[npt.NDArray[Any]] = asyncio.get_running_loop().create_future()
        tile.gates[(task.segment, gate)] = future
        try:
            return await future  # bounded by the tile's deadline (see _run_tile)
        finally:
            tile.gates.pop((task.segment, gate), None)


_PartialKey = tuple[str, int, int, int]  # job, segment, gate, epoch


@dataclass(frozen=True)
class _Interior:
    """In the queue: the interior of `tile`, to compute before its halo arrives."""

    tile: _Tile


class _PartialStore:
    """Peers' partials by (job, segment, gate, epoch), then tile: bounded in keys and bytes.

    The oldest gate's partials go first when either bound is passed (a flood of
    partials for jobs that never come, or of whole-map channel partials).
    """

    def __init__(self, max_keys: int, max_bytes: int) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.bytes = 0
        self._store: OrderedDict[_PartialKey, dict[int, ReductionPartial]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: object) -> bool:
        return key in self._store

    def get(self, key: _PartialKey) -> dict[int, ReductionPartial] | None:
        return self._store.get(key)

    def add(self, key: _PartialKey, message: ReductionPartial) -> None:
        collected = self._store.setdefault(key, {})
        if message.tile in collected:
            return
        collected[message.tile] = message
        self.bytes += message.sums.nbytes
        while len(self._store) > self.max_keys or (
            self.bytes > self.max_bytes and len(self._store) > 1
        ):
            self.pop(next(iter(self._store)))

    def discard(self, key: _PartialKey, tile: int) -> ReductionPartial | None:
        collected = self._store.get(key)
        message = None if collected is None else collected.pop(tile, None)
        if message is not None:
            self.bytes -= message.sums.nbytes
        return message

    def pop(self, key: _PartialKey) -> None:
        collected = self._store.pop(key, None)
        if collected:
            self.bytes -= sum(message.sums.nbytes for message in collected.values())

    def forget_job(self, job_id: str) -> None:
        for key in [k for k in self._store if k[0] == job_id]:
            self.pop(key)


def _rows_problem(tile: _Tile, message: TileRows) -> str | None:
    """Why `message` cannot be input rows of `tile`, or None when it can."""
    in_rows = tile.rows.in_rows
    start, stop = message.rows
    if not in_rows.start <= start < stop <= in_rows.stop:
        return f"rows {list(message.rows)} are not within the tile's input {in_rows}"
    expected = tile.layout.input_shape(tile.task.tile)
    # Rows come at the map's full width; a tile may read fewer columns (a 2x2 pool
    # leaves an odd last column unread).
    width = tile.columns.units[0].unit.in_shape[2]
    shape = (expected[0], expected[1], stop - start, width)
    if message.tensor.shape != shape:
        return f"shape {list(message.tensor.shape)}, expected {list(shape)}"
    if message.tensor.dtype not in _TILE_DTYPES:
        return f"dtype {message.tensor.dtype}"
    return None


def _gate_problem(layout: SegmentLayout, message: GateValue) -> str | None:
    """Why `message` cannot be a value of its gate in `layout`, or None when it can."""
    if message.gate >= len(layout.gates):
        return f"the segment has {len(layout.gates)} gate(s)"
    vector = message.vector
    if vector.dtype not in _GATE_DTYPES:
        return f"dtype {vector.dtype} is not one of {', '.join(_GATE_DTYPES)}"
    shape = layout.partial_shape(message.gate)
    if layout.sums and vector.shape != shape:
        return f"shape {list(vector.shape)}, the summed partial has {list(shape)}"
    if not layout.sums and vector.shape not in (shape, shape[1:]):
        return f"shape {list(vector.shape)}, the gate has {shape[1]} channels"
    if not vector.is_finite():
        return "it holds NaN or infinite values"
    return None


def _advance(
    runner: TileRunner, value: npt.NDArray[Any] | None, wire_dtype: np.dtype[Any]
) -> GatePartial | npt.NDArray[Any]:
    """One step of a tile on the compute thread: to the next gate, or to the output.

    The output leaves as a contiguous numpy array in the wire dtype, converted here
    so that the event loop never touches torch.
    """
    try:
        if value is None:
            return next(runner)
        return runner.send(np.array(value, dtype=np.float64))
    except StopIteration as done:
        output: torch.Tensor = done.value
        return np.ascontiguousarray(output.numpy(), dtype=wire_dtype)
