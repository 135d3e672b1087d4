"""Tile tasks and gate values that decode fine but are wrong: a real worker survives them.

A real `Worker` with a real `ModelStore` (tiny, tiny-edgedi at 48 px) and a
one-thread compute executor, as an agent runs it; its links record what it sends
(the leader's side of the conversation is played by the test). Every hostile task
gets exactly one `TileFailed` that says why, or is ignored where the design says so
(a deposed leader's epoch, a cancelled job); nothing escapes `accept`, and after
each hostile input the same worker still computes a good tile exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgedi.agent.layout import SegmentLayout, segment_layout
from edgedi.agent.model_store import ModelStore
from edgedi.agent.worker import Worker
from edgedi.broker.messages import (
    CancelJob,
    GateValue,
    ReductionPartial,
    TileFailed,
    TileResult,
    TileRows,
    TileTask,
    TileTrace,
)
from edgedi.broker.tensors import Tensor

SIZE = 48
EPOCH = 5
DEVICE = "pi-1"
LAST_UNIT = 3  # units 0..3 are the spatial ones of both tiny models; tiny-edgedi's gate is in 2
# Bounds only a hang (a lost answer): never an assertion about speed.
ANSWER_TIMEOUT_S = 30.0
# The worker is shared by the examples on purpose: hostile input must not wear it down.
SHARED_WORKER = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_JOB_NUMBERS = itertools.count()


def new_job_id(label: str) -> str:
    return f"{label}-{next(_JOB_NUMBERS)}"


@pytest.fixture(scope="module")
def store() -> ModelStore:
    store = ModelStore(["tiny", "tiny-edgedi"], SIZE)
    store.load_all()
    return store


@pytest.fixture(scope="module")
def image() -> npt.NDArray[np.float32]:
    """A normalised input map (1, 1, 48, 48), as the coordinator cuts tiles from."""
    return np.random.default_rng(7).standard_normal((1, 1, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(store: ModelStore, image: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
    """Units 0..3 of each model on the whole map, in one plain forward (no tiles)."""
    outputs = {}
    with torch.inference_mode():
        for name in ("tiny", "tiny-edgedi"):
            model = store.get(name).model
            outputs[name] = model.run_units(torch.from_numpy(image), 0, LAST_UNIT + 1).numpy()
    return outputs


@dataclass
class Outbox:
    """The worker's links: records what it sends to the leader and to its peers."""

    partials: asyncio.Queue[ReductionPartial] = field(default_factory=asyncio.Queue)
    outcomes: asyncio.Queue[TileResult | TileFailed] = field(default_factory=asyncio.Queue)
    peer_messages: list[TileRows | ReductionPartial] = field(default_factory=list)

    async def send_partial(self, message: ReductionPartial) -> None:
        self.partials.put_nowait(message)

    async def send_tile_outcome(self, message: TileResult | TileFailed | TileTrace) -> None:
        self.outcomes.put_nowait(message)

    async def send_peer_partial(self, message: ReductionPartial) -> None:
        self.peer_messages.append(message)

    async def send_peer(self, device: str, message: TileRows | ReductionPartial) -> None:
        self.peer_messages.append(message)

    async def outcome(self) -> TileResult | TileFailed:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            return await self.outcomes.get()

    async def partial(self) -> ReductionPartial:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            return await self.partials.get()


@dataclass(repr=False)
class Running:
    worker: Worker
    outbox: Outbox
    image: npt.NDArray[np.float32]
    reference: dict[str, npt.NDArray[Any]]
    store: ModelStore


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hostile-compute") as pool:
        yield pool


@pytest_asyncio.fixture
async def running(
    store: ModelStore,
    executor: ThreadPoolExecutor,
    image: npt.NDArray[np.float32],
    reference: dict[str, npt.NDArray[Any]],
) -> AsyncIterator[Running]:
    outbox = Outbox()
    worker = Worker(
        DEVICE, store, executor, outbox, accepts_epoch=lambda epoch: epoch >= EPOCH, max_queued=4
    )
    task = asyncio.create_task(worker.run(), name="hostile-worker")
    try:
        yield Running(worker, outbox, image, reference, store)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled(), "the worker's run() ended on its own"


def layout_of(store: ModelStore, model: str, parts: tuple[tuple[int, int], ...]) -> SegmentLayout:
    return segment_layout(store.get(model).spec, 0, LAST_UNIT, parts)


def good_task(
    running: Running,
    job_id: str,
    *,
    model: str = "tiny",
    tile: int = 0,
    split: bool = True,
    attempt: int = 0,
) -> TileTask:
    """A valid task for tile `tile` of units 0..3 cut in two row strips (or one)."""
    spec = running.store.get(model).spec
    height = spec.units[LAST_UNIT].out_shape[1]
    parts = ((0, height // 2), (height // 2, height)) if split else ((0, height),)
    layout = layout_of(running.store, model, parts)
    rows, columns = layout.tile(tile)
    block = running.image[:, :, rows.in_rows.start : rows.in_rows.stop, :]
    return TileTask(
        sender="leader",
        job_id=job_id,  # type: ignore[arg-type]
        epoch=EPOCH,
        plan_id="plan-1",
        device=DEVICE,  # type: ignore[arg-type]
        model=model,
        model_digest=running.store.get(model).digest,
        input_size=SIZE,
        segment=0,
        first_unit=0,
        last_unit=LAST_UNIT,
        row_parts=parts,
        tile=tile,
        input_rows=(rows.in_rows.start, rows.in_rows.stop),
        input_columns=(columns.in_rows.start, columns.in_rows.stop),
        output_rows=(rows.out_rows.start, rows.out_rows.stop),
        output_columns=(columns.out_rows.start, columns.out_rows.stop),
        tensor=Tensor(np.ascontiguousarray(block)),
        deadline=time.time() + 60,
        attempt=attempt,
    )


def assert_exact(running: Running, result: TileResult, model: str) -> None:
    start, stop = result.output_rows
    expected = running.reference[model][:, :, start:stop, :]
    np.testing.assert_allclose(result.tensor.array, expected, rtol=0, atol=1e-5)


async def assert_still_serves(running: Running) -> None:
    """A good tile right after: it completes, exactly, and nothing is left behind."""
    job_id = new_job_id("good")
    running.worker.accept(good_task(running, job_id, tile=1))
    outcome = await running.outbox.outcome()
    assert isinstance(outcome, TileResult), outcome
    assert outcome.job_id == job_id and outcome.attempt == 0
    assert_exact(running, outcome, "tiny")
    assert running.worker.busy_tiles == 0


async def answer_gate(running: Running, partial: ReductionPartial) -> None:
    """The leader's part for a single whole-map tile: its partial is the whole sum."""
    running.worker.on_gate(gate_value(partial, partial.sums.array / partial.positions))


def gate_value(partial: ReductionPartial, vector: npt.NDArray[Any], **changes: Any) -> GateValue:
    fields: dict[str, Any] = {
        "sender": "leader",
        "job_id": partial.job_id,
        "epoch": partial.epoch,
        "segment": partial.segment,
        "gate": partial.gate,
        "vector": Tensor(np.ascontiguousarray(vector)),
    }
    fields.update(changes)
    return GateValue(**fields)


# --- hostile tasks ------------------------------------------------------------------------

ALLOWED_REASONS = (
    "bad tile description",
    "input tensor has shape",
    "input rows/columns",
    "output rows",
)


@st.composite
def hostile_tasks(draw: st.DrawFn, running: Running) -> tuple[str, TileTask]:
    """A task with one thing wrong, and what the refusal must say (or "ignored")."""
    job_id = new_job_id("hostile")
    task = good_task(running, job_id, tile=draw(st.integers(0, 1)))
    shape = task.tensor.shape
    what = draw(
        st.sampled_from(
            [
                "shape",
                "dtype",
                "model",
                "digest",
                "input_size",
                "geometry",
                "device",
                "deadline",
                "non-finite",
                "stale",
                "cancelled",
            ]
        )
    )
    if what == "shape":
        wrong = draw(
            st.lists(st.integers(0, 30), min_size=1, max_size=5)
            .map(tuple)
            .filter(lambda candidate: candidate != shape)
        )
        tensor = Tensor(np.zeros(wrong, dtype=np.float32))
        return "input tensor has shape", task.model_copy(update={"tensor": tensor})
    if what == "dtype":
        dtype = draw(st.sampled_from(["uint8", "int64", "float64"]))
        tensor = Tensor(task.tensor.array.astype(dtype))
        return f"input tensor dtype {dtype} is not one of", task.model_copy(
            update={"tensor": tensor}
        )
    if what == "model":
        name = draw(st.text(min_size=1, max_size=30).filter(lambda n: n not in ("tiny",)))
        expected = "is not held by this device" if name != "tiny-edgedi" else "architecture"
        return expected, task.model_copy(update={"model": name})
    if what == "digest":
        digest = draw(st.text(min_size=1, max_size=30).filter(lambda d: d != task.model_digest))
        return "architecture differs", task.model_copy(update={"model_digest": digest})
    if what == "input_size":
        size = draw(st.integers(1, 2**53 - 1).filter(lambda s: s != SIZE))
        return f"is held for {SIZE} px inputs, not {size} px", task.model_copy(
            update={"input_size": size}
        )
    if what == "geometry":
        interval = st.tuples(st.integers(0, 60), st.integers(0, 60)).map(
            lambda pair: (min(pair), max(pair))
        )
        changes: dict[str, Any] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "first_unit": st.integers(0, 8),
                    "last_unit": st.integers(0, 8),
                    "row_parts": st.lists(interval, min_size=1, max_size=4).map(tuple),
                    "column_parts": st.none()
                    | st.lists(interval, min_size=1, max_size=3).map(tuple),
                    "tile": st.integers(0, 6),
                    "input_rows": interval,
                    "input_columns": st.none() | interval,
                    "output_rows": interval,
                },
            ).filter(bool)
        )
        return "geometry", task.model_copy(update=changes)
    if what == "device":
        return "task addressed to pi-2, not pi-1", task.model_copy(update={"device": "pi-2"})
    if what == "deadline":
        ago = draw(st.floats(1.0, 1e9))  # relative: a drawn bound must not move with the clock
        deadline = time.time() - ago
        return "deadline has already passed", task.model_copy(update={"deadline": deadline})
    if what == "non-finite":
        array = task.tensor.writable_array()
        flat = array.reshape(-1)
        spots = draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=5))
        flat[spots] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return "input tensor holds NaN or infinite values", task.model_copy(
            update={"tensor": Tensor(array)}
        )
    if what == "stale":
        return "ignored: stale", task.model_copy(update={"epoch": draw(st.integers(0, EPOCH - 1))})
    return "ignored: cancelled", task


@SHARED_WORKER
@given(data=st.data())
async def test_hostile_tasks_get_one_clear_refusal_and_the_worker_keeps_serving(
    running: Running, data: st.DataObject
) -> None:
    expected, task = data.draw(hostile_tasks(running))
    statistics = running.worker.statistics
    refused, stale = statistics.refused, statistics.stale_epoch
    if expected == "ignored: cancelled":
        running.worker.cancel_job(CancelJob(sender="leader", job_id=task.job_id, epoch=EPOCH))
    running.worker.accept(task)  # never raises, never blocks
    try:
        await _check_answer(running, expected, task, refused, stale)
    finally:
        running.worker.drop_job(task.job_id, "example over")  # a failure must not leak on
    await assert_still_serves(running)


async def _check_answer(
    running: Running, expected: str, task: TileTask, refused: int, stale: int
) -> None:
    statistics = running.worker.statistics
    if expected.startswith("ignored"):
        # Ignored at once: nothing queued, nothing refused; a sentinel refusal shows
        # that the refusal queue held nothing of it.
        assert running.worker.busy_tiles == 0 and statistics.refused == refused
        assert statistics.stale_epoch == stale + (expected == "ignored: stale")
        sentinel = task.model_copy(update={"device": "pi-9", "job_id": new_job_id("sentinel")})
        running.worker.accept(sentinel)
        answer = await running.outbox.outcome()
        assert answer.job_id == sentinel.job_id
    else:
        answer = await running.outbox.outcome()
        assert answer.job_id == task.job_id and answer.attempt == task.attempt
        if isinstance(answer, TileFailed):
            assert answer.device == DEVICE and answer.tile == task.tile
            if expected == "geometry":
                assert answer.reason.startswith(ALLOWED_REASONS), answer.reason
            else:
                assert expected in answer.reason, (expected, answer.reason)
        else:
            # Only a geometry change can still describe a computable tile.
            assert expected == "geometry"
            layout = layout_of(running.store, task.model, task.row_parts)
            assert answer.tensor.shape[:2] == (1, layout.out_channels)
            assert answer.tensor.is_finite()


async def test_a_refused_newer_attempt_does_not_cancel_the_tile_in_hand(
    running: Running,
) -> None:
    # A bad copy with a higher attempt used to cancel the running tile before it was
    # validated: the leader then waited for that tile until the job's deadline.
    job_id = new_job_id("in-hand")
    task = good_task(running, job_id, model="tiny-edgedi", split=False)
    running.worker.accept(task)
    partial = await running.outbox.partial()  # the tile now waits for its gate
    bad = task.model_copy(update={"attempt": 1, "tensor": Tensor(np.zeros(3, np.float32))})
    running.worker.accept(bad)
    refusal = await running.outbox.outcome()
    assert isinstance(refusal, TileFailed) and refusal.attempt == 1
    assert "input tensor has shape" in refusal.reason
    await answer_gate(running, partial)
    result = await running.outbox.outcome()
    assert isinstance(result, TileResult) and result.attempt == 0
    assert_exact(running, result, "tiny-edgedi")
    await assert_still_serves(running)


async def test_a_valid_newer_attempt_replaces_the_tile_in_hand(running: Running) -> None:
    job_id = new_job_id("replaced")
    task = good_task(running, job_id, model="tiny-edgedi", split=False)
    running.worker.accept(task)
    await running.outbox.partial()
    running.worker.accept(task.model_copy(update={"attempt": 2}))
    partial = await running.outbox.partial()  # the new attempt's
    await answer_gate(running, partial)
    result = await running.outbox.outcome()
    assert isinstance(result, TileResult) and result.attempt == 2
    assert_exact(running, result, "tiny-edgedi")
    assert running.worker.busy_tiles == 0 and running.outbox.outcomes.empty()


async def test_a_new_leaders_first_attempt_replaces_the_old_leaders_later_one(
    running: Running,
) -> None:
    """A job taken over by the next leader starts again at attempt 0: that task is not
    a redelivery of the old leader's attempt 2, which still waits for its gate here."""
    job_id = new_job_id("taken-over")
    task = good_task(running, job_id, model="tiny-edgedi", split=False, attempt=2)
    running.worker.accept(task)
    await running.outbox.partial()  # the old leader's tile waits at its gate, forever
    running.worker.accept(task.model_copy(update={"epoch": EPOCH + 1, "attempt": 0}))
    partial = await running.outbox.partial()  # the new leader's task runs
    assert partial.epoch == EPOCH + 1
    await answer_gate(running, partial)
    result = await running.outbox.outcome()
    assert isinstance(result, TileResult) and result.epoch == EPOCH + 1
    assert_exact(running, result, "tiny-edgedi")


# --- hostile gate values and cancellations -----------------------------------------------


Hostile = Callable[[ReductionPartial], GateValue | CancelJob]


def _not(shape: tuple[int, ...], channels: int) -> tuple[int, ...]:
    # No filter: a rejected draw would abandon an example with its tile in hand.
    return (*shape, 1) if shape in ((channels,), (1, channels)) else shape


@st.composite
def hostile_gates(draw: st.DrawFn, channels: int) -> Hostile:
    """A message for the tile's job that must not reach (or fail) the waiting tile."""
    what = draw(
        st.sampled_from(
            ["shape", "dtype", "non-finite", "gate", "segment", "job", "stale", "stale-cancel"]
        )
    )
    if what == "shape":
        shape = _not(
            draw(st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple)), channels
        )
        return lambda partial: gate_value(partial, np.ones(shape, dtype=np.float32))
    if what == "dtype":
        dtype = draw(st.sampled_from(["uint8", "int64"]))
        return lambda partial: gate_value(partial, np.ones((1, channels), dtype=dtype))
    if what == "non-finite":
        spot = draw(st.integers(0, channels - 1))
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))

        def non_finite(partial: ReductionPartial) -> GateValue:
            vector = partial.sums.array / partial.positions
            vector[0, spot] = bad
            return gate_value(partial, vector)

        return non_finite
    zeros = np.zeros((1, channels))
    if what == "gate":
        gate = draw(st.integers(1, 2**53 - 1))
        return lambda partial: gate_value(partial, zeros, gate=gate)
    if what == "segment":
        segment = draw(st.integers(1, 100))
        return lambda partial: gate_value(partial, zeros, segment=segment)
    if what == "job":
        return lambda partial: gate_value(partial, zeros, job_id=new_job_id("other"))
    if what == "stale":
        return lambda partial: gate_value(partial, zeros, epoch=EPOCH - 1)
    return lambda partial: CancelJob(sender="leader", job_id=partial.job_id, epoch=EPOCH - 1)


@SHARED_WORKER
@given(data=st.data())
async def test_hostile_gate_values_are_ignored_and_the_tile_still_completes(
    running: Running, data: st.DataObject
) -> None:
    task = good_task(running, new_job_id("gated"), model="tiny-edgedi", split=False)
    channels = layout_of(running.store, "tiny-edgedi", task.row_parts).gates[0].out_channels
    hostile = data.draw(st.lists(hostile_gates(channels), min_size=1, max_size=4))
    running.worker.accept(task)
    try:
        partial = await running.outbox.partial()
        assert partial.sums.shape == (1, channels)
        for make in hostile:
            message = make(partial)
            if isinstance(message, CancelJob):
                running.worker.cancel_job(message)
            else:
                running.worker.on_gate(message)
        await answer_gate(running, partial)
        result = await running.outbox.outcome()  # a hostile value that reached it failed it
        assert isinstance(result, TileResult), result
        assert_exact(running, result, "tiny-edgedi")
        assert running.worker.busy_tiles == 0
    finally:
        running.worker.drop_job(task.job_id, "example over")  # a failure must not leak on


async def test_an_ignored_gate_value_is_logged_with_its_reason(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    task = good_task(running, new_job_id("logged"), model="tiny-edgedi", split=False)
    running.worker.accept(task)
    partial = await running.outbox.partial()
    channels = partial.sums.shape[1]
    with caplog.at_level(logging.WARNING, logger="edgedi.agent.worker"):
        running.worker.on_gate(gate_value(partial, np.ones(channels + 1)))
    assert [record.getMessage() for record in caplog.records] == [
        f"ignored gate value 0 of job {task.job_id}: shape [{channels + 1}], "
        f"the gate has {channels} channels"
    ]
    await answer_gate(running, partial)
    result = await running.outbox.outcome()
    assert isinstance(result, TileResult)
    assert_exact(running, result, "tiny-edgedi")


async def test_a_cancel_from_an_old_leader_does_not_block_the_job_under_a_new_one(
    running: Running,
) -> None:
    # A leader that hands a job over cancels its tiles; the successor (a higher epoch)
    # sends the same job's tiles again, and they must run.
    job_id = new_job_id("handed-over")
    running.worker.accept(good_task(running, job_id))
    running.worker.cancel_job(
        CancelJob(sender="leader", job_id=job_id, epoch=EPOCH, reason="left to the next leader")  # type: ignore[arg-type]
    )
    running.worker.accept(good_task(running, job_id))  # the old leader's late duplicate
    assert running.worker.busy_tiles == 0
    successor = good_task(running, job_id).model_copy(update={"epoch": EPOCH + 1})
    running.worker.accept(successor)
    result = await running.outbox.outcome()
    assert isinstance(result, TileResult) and result.epoch == EPOCH + 1, result
    assert_exact(running, result, "tiny")


async def test_an_old_plans_partials_do_not_block_a_taken_over_jobs_gate(
    running: Running,
) -> None:
    # A new leader takes a job over under the same id with a plan of other tiles, and
    # its tasks reach this device before its leader record does (seen in CI: the job
    # stalled until its overdue limit). The old plan's partials of the job's gate are
    # still here: they must not stand in for the new plan's tiles.
    worker = running.worker
    # The peer's partial of the new plan's tile 1: computed here, as a relayed tile.
    helper = good_task(running, new_job_id("helper"), model="tiny-edgedi", tile=1)
    worker.accept(helper)
    peers_partial = await running.outbox.partial()
    await answer_gate(running, peers_partial)
    await running.outbox.outcome()
    job_id = new_job_id("taken-over")
    height = running.store.get("tiny-edgedi").spec.units[LAST_UNIT].out_shape[1]
    third = height // 3
    old = layout_of(
        running.store, "tiny-edgedi", ((0, third), (third, 2 * third), (2 * third, height))
    )
    for tile in range(old.count):
        worker.on_peer_partial(
            ReductionPartial(
                sender="old-peer",
                job_id=job_id,  # type: ignore[arg-type]
                epoch=EPOCH,
                segment=0,
                tile=tile,
                gate=0,
                device="old-peer",  # type: ignore[arg-type]
                sums=Tensor(np.zeros(old.partial_shape(0), dtype=np.float64)),
                positions=old.gate_positions(tile, 0),
            )
        )
    task = good_task(running, job_id, model="tiny-edgedi", tile=0)
    worker.accept(task.model_copy(update={"epoch": EPOCH + 1, "peers": (DEVICE, "peer")}))
    worker.on_peer_partial(
        peers_partial.model_copy(
            update={"job_id": job_id, "epoch": EPOCH + 1, "sender": "peer", "device": "peer"}
        )
    )
    outcome = await running.outbox.outcome()
    assert isinstance(outcome, TileResult) and outcome.epoch == EPOCH + 1, outcome
    assert_exact(running, outcome, "tiny-edgedi")


async def test_rows_for_a_taken_over_jobs_tile_wait_for_its_new_task(running: Running) -> None:
    # The same race with rows: a tile of the old leader's plan still waits here for
    # its rows when a producer under the new leader sends the rows for the new task
    # of that tile, which has not come yet. The rows must wait for the new task, not
    # be taken by the old one (the new tile would then wait for rows already spent).
    worker = running.worker
    job_id = new_job_id("taken-over-rows")
    waiting = good_task(running, job_id, tile=0).model_copy(
        update={"tensor": None, "peers": (DEVICE, "peer")}
    )
    worker.accept(waiting)  # epoch EPOCH: waits for rows that will never come
    assert worker.busy_tiles == 1
    start, stop = waiting.input_rows
    worker.on_rows(
        TileRows(
            sender="peer",
            job_id=job_id,  # type: ignore[arg-type]
            epoch=EPOCH + 1,
            segment=0,
            tile=0,
            device="peer",  # type: ignore[arg-type]
            rows=(start, stop),
            tensor=Tensor(np.ascontiguousarray(running.image[:, :, start:stop, :])),
        )
    )
    worker.accept(waiting.model_copy(update={"epoch": EPOCH + 1}))
    outcome = await running.outbox.outcome()
    assert isinstance(outcome, TileResult) and outcome.epoch == EPOCH + 1, outcome
    assert_exact(running, outcome, "tiny")
    assert running.outbox.outcomes.empty()  # the old tile never ran


async def test_a_whole_map_tile_with_local_gates_needs_no_round_trip(running: Running) -> None:
    task = good_task(running, new_job_id("local"), model="tiny-edgedi", split=False)
    running.worker.accept(task.model_copy(update={"local_gates": True}))
    result = await running.outbox.outcome()  # no partial, no gate value: straight to the end
    assert isinstance(result, TileResult), result
    assert running.outbox.partials.empty()
    assert_exact(running, result, "tiny-edgedi")


async def test_local_gates_on_part_of_the_map_are_refused(running: Running) -> None:
    task = good_task(running, new_job_id("not-local"), model="tiny-edgedi", split=True)
    running.worker.accept(task.model_copy(update={"local_gates": True}))
    refusal = await running.outbox.outcome()
    assert isinstance(refusal, TileFailed), refusal
    assert "only a tile that is the whole map" in refusal.reason
    await assert_still_serves(running)


async def test_a_rival_leaders_cancel_of_the_same_epoch_spares_the_winners_tiles(
    running: Running,
) -> None:
    # Two candidates claimed the same epoch; the loser cancels the job as it stands
    # down, and the winner's tasks for that job (same epoch, other sender) must run.
    job_id = new_job_id("rivals")
    running.worker.cancel_job(
        CancelJob(sender="loser", job_id=job_id, epoch=EPOCH, reason="stood down")  # type: ignore[arg-type]
    )
    running.worker.accept(good_task(running, job_id).model_copy(update={"sender": "loser"}))
    assert running.worker.busy_tiles == 0  # the loser's own late task is dropped
    running.worker.accept(good_task(running, job_id).model_copy(update={"sender": "winner"}))
    result = await running.outbox.outcome()
    assert isinstance(result, TileResult), result
    assert_exact(running, result, "tiny")


async def test_a_flood_of_whole_map_partials_stays_within_the_byte_bound(
    running: Running,
) -> None:
    """Partials for jobs that never come are kept (their tasks may be on the way), but
    not without limit: whole-map partials are bounded in bytes, oldest dropped first."""
    from edgedi.agent import worker as worker_module

    worker = running.worker
    bound = worker._partials.max_bytes
    big = np.zeros((1, 512, 32, 32), dtype=np.float32)  # 2 MiB, a channel partial's shape
    for number in range(2 * bound // big.nbytes):
        worker.on_peer_partial(
            ReductionPartial(
                sender="mallory",
                job_id=f"flood-{number}",
                epoch=EPOCH,
                segment=0,
                tile=0,
                gate=0,
                device="mallory",
                sums=Tensor(big),
                positions=1,
            )
        )
    assert worker._partials.bytes <= bound
    assert 0 < len(worker._partials) <= worker_module._PARTIALS_MEMORY
    assert ("flood-0", 0, 0, EPOCH) not in worker._partials  # the oldest went first
    await assert_still_serves(running)
