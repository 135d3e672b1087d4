"""A worker holds a bounded amount of state, whatever its peers send.

A real `Worker` (real model, its single compute thread) with its outgoing messages
kept in lists instead of a broker: the gate values it keeps for its tiles, the
cancelled jobs it remembers and the refusals it still has to send each stay under
a fixed bound under a flood, and a gate value outlives neither its tile nor its job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from edgedi.agent import worker as worker_module
from edgedi.agent.layout import segment_layout
from edgedi.agent.model_store import ModelStore
from edgedi.agent.worker import Worker
from edgedi.broker.messages import GateValue, ReductionPartial, TileFailed, TileResult, TileTask
from edgedi.broker.tensors import Tensor
from edgedi.models.specs import get_spec

MODEL = "tiny-edgedi"
INPUT_SIZE = 48
DEVICE = "worker-1"
EPOCH = 1
LAST_UNIT = 3  # units 0..3 of tiny-edgedi: one segment with one attention gate


class Outbox:
    """The worker's links: what it would publish, kept in order."""

    def __init__(self) -> None:
        self.partials: list[ReductionPartial] = []
        self.outcomes: list[TileResult | TileFailed] = []
        self.changed = asyncio.Event()

    async def send_partial(self, message: ReductionPartial) -> None:
        self.partials.append(message)
        self.changed.set()

    async def send_tile_outcome(self, message: TileResult | TileFailed) -> None:
        self.outcomes.append(message)
        self.changed.set()

    async def wait_for(self, what: str, count: int = 1) -> None:
        async with asyncio.timeout(10):
            while len(getattr(self, what)) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(scope="module")
def store() -> ModelStore:
    held = ModelStore([MODEL], INPUT_SIZE)
    held.load_all()
    return held


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute-test")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest_asyncio.fixture
async def running(
    store: ModelStore, executor: ThreadPoolExecutor
) -> AsyncIterator[tuple[Worker, Outbox]]:
    outbox = Outbox()
    worker = Worker(DEVICE, store, executor, outbox, accepts_epoch=lambda epoch: epoch >= EPOCH)
    task = asyncio.create_task(worker.run(), name="worker")
    try:
        yield worker, outbox
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def tile_task(job_id: str, *, device: str = DEVICE) -> TileTask:
    """A whole-map task of the gated segment: it stops at its gate for the leader's value."""
    spec = get_spec(MODEL, INPUT_SIZE)
    height = spec.units[LAST_UNIT].out_shape[1]
    layout = segment_layout(spec, 0, LAST_UNIT, [(0, height)])
    _, channels, rows, columns = layout.input_shape(0)
    return TileTask(
        sender="leader",
        job_id=job_id,  # type: ignore[arg-type]
        epoch=EPOCH,
        plan_id="plan",
        device=device,  # type: ignore[arg-type]
        model=MODEL,
        model_digest=spec.digest(),
        input_size=INPUT_SIZE,
        segment=0,
        first_unit=0,
        last_unit=LAST_UNIT,
        row_parts=((0, height),),
        tile=0,
        input_rows=(0, rows),
        output_rows=(0, height),
        tensor=Tensor(np.zeros((1, channels, rows, columns), dtype=np.float32)),
        deadline=time.time() + 30,
    )


def gate_value(job_id: str, gate: int, *, segment: int = 0, channels: int = 0) -> GateValue:
    if not channels:
        spec = get_spec(MODEL, INPUT_SIZE)
        height = spec.units[LAST_UNIT].out_shape[1]
        layout = segment_layout(spec, 0, LAST_UNIT, [(0, height)])
        channels = layout.gates[0].out_channels
    return GateValue(
        sender="leader",
        job_id=job_id,  # type: ignore[arg-type]
        epoch=EPOCH,
        segment=segment,
        gate=gate,
        vector=Tensor(np.full((1, channels), 0.5)),
    )


def held_gate_values(worker: Worker) -> dict[tuple[str, int, int], Any]:
    # White-box on purpose: the bound under test is the size of this private table.
    values: dict[tuple[str, int, int], Any] = worker._gate_values
    return values


async def test_gate_values_stay_bounded_and_leave_with_their_tile(
    running: tuple[Worker, Outbox],
) -> None:
    worker, outbox = running
    worker.accept(tile_task("job-a"))
    await outbox.wait_for("partials")  # the tile waits at its gate now

    # A flood: values for jobs with no tile here, gates the segment does not have,
    # other segments, and the same valid gate over and over.
    for number in range(2000):
        worker.on_gate(gate_value(f"elsewhere-{number}", 0))
        worker.on_gate(gate_value("job-a", 1 + number))
        worker.on_gate(gate_value("job-a", 0, segment=1 + number))
        worker.on_gate(gate_value("job-a", 0))
    # The first valid value went to the waiting tile; at most one copy waits for a
    # second tile of the job (a value can arrive both directly and via the broker).
    assert len(held_gate_values(worker)) <= 1

    await outbox.wait_for("outcomes")
    assert isinstance(outbox.outcomes[0], TileResult), outbox.outcomes[0]
    assert held_gate_values(worker) == {}  # nothing kept once the job has no tile here
    worker.on_gate(gate_value("job-a", 0))  # a late copy of a finished job's value
    assert held_gate_values(worker) == {}


async def test_gate_values_of_a_cancelled_job_are_dropped(running: tuple[Worker, Outbox]) -> None:
    worker, outbox = running
    worker.accept(tile_task("job-b"))
    await outbox.wait_for("partials")
    worker.on_gate(gate_value("job-b", 0))
    worker.on_gate(gate_value("job-b", 0))  # the tile took the first; this one is kept
    worker.drop_job("job-b", "cancelled by the test")
    async with asyncio.timeout(10):  # the cancelled tile ends on a later loop iteration
        while worker.busy_tiles:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.01)
    assert held_gate_values(worker) == {}
    worker.on_gate(gate_value("job-b", 0))  # late: the job has no tile here any more
    assert held_gate_values(worker) == {}
    assert outbox.outcomes == []  # a cancelled tile answers nobody


async def test_the_cancelled_job_memory_is_bounded(running: tuple[Worker, Outbox]) -> None:
    worker, _ = running
    bound = worker_module._CANCELLED_MEMORY
    for number in range(3 * bound):
        worker.drop_job(f"job-{number}", "flood")
    assert len(worker._cancelled) == bound
    # The newest are remembered: a late task of a job cancelled last is still ignored.
    worker.accept(tile_task(f"job-{3 * bound - 1}"))
    assert worker.busy_tiles == 0


async def test_refusals_waiting_to_be_sent_are_bounded(
    store: ModelStore, executor: ThreadPoolExecutor
) -> None:
    # Not running: nothing drains the refusals (as if the broker were unreachable).
    worker = Worker(DEVICE, store, executor, Outbox(), accepts_epoch=lambda epoch: True)
    flood = 1000
    for number in range(flood):
        worker.accept(tile_task(f"misaddressed-{number}", device="someone-else"))
    assert worker.statistics.refused == flood
    assert worker._refusals.qsize() == worker._refusals.maxsize < flood
