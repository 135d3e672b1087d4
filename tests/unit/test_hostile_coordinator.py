"""Hostile jobs and worker messages at a real coordinator: explicit errors, no corruption.

A real `Coordinator` leads two real `Worker`s (devices a and b) in one process, as
an agent's links connect them when the broker is not needed: tasks, gates and
cancellations go straight to the workers, partials and results straight back to
`Coordinator.route`, torch work to one compute thread. The links record the
results and, while a good tiny-edgedi job runs, put hostile copies of the workers'
own messages next to the real ones (before and after): stale epochs, unknown
jobs, wrong shapes or dtypes, NaN, out-of-range tiles, gates or segments. Hostile
submissions (unknown model, bad image shape, dtype or values, unknown strategy,
a duplicate of the good job's id) arrive at the same time.

Each hostile job gets exactly one error result that says what was wrong; the good
job's probabilities equal a single-process forward of the same model.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgedi.agent.config import JobSettings
from edgedi.agent.coordinator import Coordinator
from edgedi.agent.model_store import TORCH_RNG_LOCK, ModelStore
from edgedi.agent.planning import Planning
from edgedi.agent.worker import Worker
from edgedi.broker.messages import (
    CancelJob,
    DeviceBirth,
    DeviceCapabilities,
    GateValue,
    JobResult,
    JobSubmit,
    LinkEstimate,
    ReductionPartial,
    TileFailed,
    TileResult,
    TileTask,
    TileTrace,
)
from edgedi.broker.tensors import Tensor
from edgedi.models.checkpoints import load_model
from edgedi.models.data import generate_image
from edgedi.models.training import normalize

T = TypeVar("T")

SIZE = 48
EPOCH = 7
MODEL = "tiny-edgedi"  # two row strips with an attention gate under "equal"
DEVICES = ("a", "b")
# Bounds only a hang (a result never published): never an assertion about speed.
RESULT_TIMEOUT_S = 60.0
SHARED_CLUSTER = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_NUMBERS = itertools.count()


def new_job_id(label: str) -> str:
    return f"{label}-{next(_NUMBERS)}"


@pytest.fixture(scope="module")
def store() -> ModelStore:
    store = ModelStore(["tiny", MODEL], SIZE)
    store.load_all()
    return store


@pytest.fixture(scope="module")
def image() -> npt.NDArray[np.uint8]:
    return generate_image(3, 11, SIZE, 0)


@pytest.fixture(scope="module")
def reference(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """A plain single-process forward of the same model and weights."""
    with TORCH_RNG_LOCK:
        model, _ = load_model(MODEL, SIZE)
    with torch.inference_mode():
        logits = model(normalize(np.array(image)[None])).double()
    probabilities: npt.NDArray[np.float64] = torch.softmax(logits, dim=1).numpy().reshape(-1)
    return probabilities


def birth(device: str) -> DeviceBirth:
    profile = {
        name: (1e-10, 3e-6)
        for name in ("conv1x1", "conv3x3", "convkxk", "depthwise", "pool", "gate", "fc")
    }
    return DeviceBirth(
        sender=device,
        device=device,
        session=1,
        candidate=True,
        capabilities=DeviceCapabilities(
            cores=1,
            memory_bytes=2**30,
            machine="test",
            software_version="test",
            models=("tiny", MODEL),
        ),
        profile=profile,
        link=LinkEstimate(bandwidth_bytes_per_second=1.25e8, latency_seconds=1e-4),
    )


Inbound = ReductionPartial | TileResult | TileFailed
# Hostile copies of one real worker message, sent to the coordinator beside it.
Mutation = Callable[[Inbound], list[Inbound]]


@dataclass
class Cluster:
    """The coordinator's and the workers' links, wired as an agent wires them locally."""

    executor: ThreadPoolExecutor
    results: list[JobResult] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    workers: dict[str, Worker] = field(default_factory=dict)
    coordinator: Coordinator | None = None
    # While set: the good job's id and what to send before / after each real message.
    target: str | None = None
    before: list[Mutation] = field(default_factory=list)
    after: list[Mutation] = field(default_factory=list)
    injected: int = 0
    # What went over the links: every task sent, every cancellation, every real answer.
    tasks: list[TileTask] = field(default_factory=list)
    cancels: list[tuple[str, CancelJob]] = field(default_factory=list)
    answers: list[TileResult | TileFailed] = field(default_factory=list)

    # -- coordinator side
    # A device that is not here (a name a hostile message made up) hears nothing,
    # as on the broker.
    async def send_task(self, task: TileTask) -> None:
        self.tasks.append(task)
        if task.device in self.workers:
            self.workers[task.device].accept(task)

    async def send_gate(self, message: GateValue, devices: Collection[str]) -> None:
        for device in devices:
            if device in self.workers:
                self.workers[device].on_gate(message)

    async def send_cancel(self, device: str, message: CancelJob) -> None:
        self.cancels.append((device, message))
        if device in self.workers:
            self.workers[device].cancel_job(message)

    async def send_result(self, result: JobResult) -> None:
        self.results.append(result)
        self.arrived.set()

    async def compute(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function)

    # -- worker side
    async def send_partial(self, message: ReductionPartial) -> None:
        self._forward(message)

    async def send_tile_outcome(self, message: TileResult | TileFailed | TileTrace) -> None:
        self.answers.append(message)
        self._forward(message)

    def _forward(self, message: Inbound) -> None:
        coordinator = self.coordinator
        assert coordinator is not None
        hostile = message.job_id == self.target
        for mutation in self.before if hostile else ():
            self._inject(coordinator, mutation(message))
        coordinator.route(message)
        for mutation in self.after if hostile else ():
            self._inject(coordinator, mutation(message))

    def _inject(self, coordinator: Coordinator, messages: list[Inbound]) -> None:
        for message in messages:
            coordinator.route(message)  # never raises, whatever it carries
            self.injected += 1

    def unanswered(self, job_id: str) -> set[tuple[str, int, int, int]]:
        """(device, segment, tile, attempt) of the job's copies that sent no answer yet."""
        sent = {
            (str(t.device), t.segment, t.tile, t.attempt) for t in self.tasks if t.job_id == job_id
        }
        answered = {
            (str(a.device), a.segment, a.tile, a.attempt)
            for a in self.answers
            if a.job_id == job_id
        }
        return sent - answered

    def forget(self, job_id: str) -> None:
        """Drop what is left of a finished job on the workers, whatever the coordinator did."""
        for worker in self.workers.values():
            worker.drop_job(job_id, "test: job over")

    async def result_of(self, job_id: str) -> JobResult:
        async with asyncio.timeout(RESULT_TIMEOUT_S):
            while True:
                for result in self.results:
                    if result.job_id == job_id:
                        return result
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hostile-leader") as pool:
        yield pool


@pytest_asyncio.fixture
async def cluster(store: ModelStore, executor: ThreadPoolExecutor) -> AsyncIterator[Cluster]:
    cluster = Cluster(executor)
    planning = Planning("a", SIZE, "equal")
    planning.update({device: birth(device) for device in DEVICES}, DEVICES, EPOCH)
    for device in DEVICES:
        cluster.workers[device] = Worker(
            device, store, executor, cluster, accepts_epoch=lambda epoch: epoch >= EPOCH
        )
    coordinator = Coordinator(
        "a",
        EPOCH,
        store,
        planning,
        cluster,
        # The relayed path: these tests forge what workers send the leader on it.
        JobSettings(deadline_s=RESULT_TIMEOUT_S, direct=False),
        alive_devices=lambda: DEVICES,
    )
    cluster.coordinator = coordinator
    tasks = [
        asyncio.create_task(worker.run(), name=f"worker-{device}")
        for device, worker in cluster.workers.items()
    ]
    tasks.append(asyncio.create_task(coordinator.run(), name="coordinator"))
    try:
        yield cluster
    finally:
        coordinator.stop()
        async with asyncio.timeout(RESULT_TIMEOUT_S):
            await tasks[-1]  # the coordinator ends on its own after stop()
        for task in tasks[:-1]:
            task.cancel()
        await asyncio.gather(*tasks[:-1], return_exceptions=True)
    assert all(task.cancelled() for task in tasks[:-1]), "a worker's run() ended on its own"


def submission(job_id: str, image: npt.NDArray[Any], model: str = MODEL, **extra: Any) -> JobSubmit:
    return JobSubmit(
        sender="client",
        job_id=job_id,  # type: ignore[arg-type]
        model=model,
        image=Tensor(np.ascontiguousarray(image)),
        client="client",
        submitted_at=time.time(),
        **extra,
    )


# --- hostile worker messages -----------------------------------------------------------


def _garbage_like(tensor: Tensor) -> Tensor:
    """Same shape and dtype, different values: corrupts the job if ever used."""
    return Tensor(np.full(tensor.shape, 1e3, dtype=tensor.dtype))


PARTIAL_MUTATIONS = ("epoch", "job", "shape", "non-finite", "gate", "tile", "segment")
RESULT_MUTATIONS: tuple[str, ...] = ("epoch", "job", "shape", "non-finite", "dtype", "rows")
RESULT_MUTATIONS += ("tile", "attempt", "failed")


@dataclass(frozen=True)
class PartialForgery:
    """Copies of a worker's partial with one checked thing wrong (and garbage sums)."""

    what: str
    offset: int

    def __call__(self, message: Inbound) -> list[Inbound]:
        what, offset = self.what, self.offset
        if not isinstance(message, ReductionPartial):
            return []
        garbage = _garbage_like(message.sums)
        if what == "epoch":
            epoch = EPOCH - 1 if offset % 2 else EPOCH + offset
            return [message.model_copy(update={"epoch": epoch, "sums": garbage})]
        if what == "job":
            return [message.model_copy(update={"job_id": new_job_id("ghost"), "sums": garbage})]
        if what == "shape":
            shape = (1, message.sums.shape[1] + offset % 5 + 1) if offset % 3 else (offset % 7,)
            return [message.model_copy(update={"sums": Tensor(np.ones(shape))})]
        if what == "non-finite":
            sums = message.sums.writable_array()
            sums.reshape(-1)[offset % sums.size] = math.nan if offset % 2 else math.inf
            return [message.model_copy(update={"sums": Tensor(sums)})]
        if what == "gate":
            return [message.model_copy(update={"gate": message.gate + offset, "sums": garbage})]
        if what == "tile":
            return [message.model_copy(update={"tile": message.tile + 2 + offset, "sums": garbage})]
        return [message.model_copy(update={"segment": message.segment + offset, "sums": garbage})]


@dataclass(frozen=True)
class ResultForgery:
    """Copies of a worker's result with one checked thing wrong, or a failure."""

    what: str
    offset: int

    def __call__(self, message: Inbound) -> list[Inbound]:
        what, offset = self.what, self.offset
        if not isinstance(message, TileResult):
            return []
        tensor = message.tensor
        garbage = _garbage_like(tensor)
        if what == "epoch":
            return [message.model_copy(update={"epoch": EPOCH - 1, "tensor": garbage})]
        if what == "job":
            return [message.model_copy(update={"job_id": new_job_id("ghost"), "tensor": garbage})]
        if what == "shape":
            shape = (*tensor.shape[:3], tensor.shape[3] + offset % 4 + 1)
            return [message.model_copy(update={"tensor": Tensor(np.ones(shape, np.float32))})]
        if what == "non-finite":
            array = tensor.writable_array()
            array.reshape(-1)[offset % array.size] = math.nan
            return [message.model_copy(update={"tensor": Tensor(array)})]
        if what == "dtype":
            dtype = np.uint8 if offset % 2 else np.float64
            return [message.model_copy(update={"tensor": Tensor(tensor.array.astype(dtype))})]
        if what == "rows":
            start, stop = message.output_rows
            rows = (start + 1, stop + 1)
            return [message.model_copy(update={"output_rows": rows, "tensor": garbage})]
        if what == "tile":
            return [message.model_copy(update={"tile": message.tile + 2 + offset})]
        if what == "attempt":  # a bad result of an attempt that was never sent
            shape = (*tensor.shape[:3], tensor.shape[3] + 1)
            tensor = Tensor(np.ones(shape, np.float32))
            return [message.model_copy(update={"attempt": 50 + offset, "tensor": tensor})]
        failed = TileFailed(
            sender=message.sender,
            job_id=message.job_id,
            epoch=message.epoch,
            segment=message.segment,
            tile=message.tile + (2 + offset if offset % 2 else 0),  # out of range, or the tile
            device=message.device,
            reason="hostile failure",
            attempt=message.attempt,
        )
        return [failed]


offsets = st.integers(1, 1000)
mutations = st.one_of(
    st.builds(PartialForgery, st.sampled_from(PARTIAL_MUTATIONS), offsets),
    st.builds(ResultForgery, st.sampled_from(RESULT_MUTATIONS), offsets),
)


def hostile_jobs(image: npt.NDArray[np.uint8]) -> st.SearchStrategy[tuple[JobSubmit, str]]:
    """A submission that cannot run, and what its error must say."""
    unknown_model = st.text(min_size=1, max_size=40).filter(lambda m: m not in ("tiny", MODEL))
    bad_shape = st.lists(st.integers(0, 60), min_size=1, max_size=3).filter(
        lambda shape: tuple(s for s in shape if s != 1) != (SIZE, SIZE)
    )
    non_finite = st.tuples(
        st.integers(0, SIZE * SIZE - 1), st.sampled_from([math.nan, math.inf, -math.inf])
    )

    def nan_image(spot: tuple[int, float]) -> tuple[JobSubmit, str]:
        values = image.astype(np.float32)
        values.reshape(-1)[spot[0]] = spot[1]
        return submission(new_job_id("nan"), values[None]), "bad image: it holds NaN or infinite"

    return st.one_of(
        unknown_model.map(
            lambda m: (submission(new_job_id("model"), image[None], model=m), "unknown model")
        ),
        bad_shape.map(
            lambda shape: (
                submission(new_job_id("shape"), np.zeros(shape, np.uint8)),
                "bad image: shape",
            )
        ),
        st.sampled_from(["float16", "int64"]).map(
            lambda dtype: (
                submission(new_job_id("dtype"), image[None].astype(dtype)),
                f"bad image: dtype {dtype}",
            )
        ),
        non_finite.map(nan_image),
        st.builds(
            lambda: (
                submission(new_job_id("strategy"), image[None], strategy="no-such-strategy"),
                "no-such-strategy",
            )
        ),
        st.floats(1e-12, 1e-6).map(
            lambda seconds: (
                submission(new_job_id("late"), image[None], deadline_seconds=seconds),
                "deadline exceeded",
            )
        ),
    )


@SHARED_CLUSTER
@given(
    before=st.lists(mutations, max_size=4),
    after=st.lists(mutations, max_size=3),
    data=st.data(),
)
async def test_hostile_input_never_corrupts_a_running_job(
    cluster: Cluster,
    image: npt.NDArray[np.uint8],
    reference: npt.NDArray[np.float64],
    before: list[Mutation],
    after: list[Mutation],
    data: st.DataObject,
) -> None:
    coordinator = cluster.coordinator
    assert coordinator is not None
    hostile = data.draw(st.lists(hostile_jobs(image), max_size=3), label="hostile jobs")
    good = submission(new_job_id("good"), image[None])
    cluster.target, cluster.before, cluster.after = good.job_id, before, after
    try:
        coordinator.submit(good)
        # The same job id with another image while it runs: a duplicate, not a new job.
        coordinator.submit(submission(good.job_id, 255 - image[None]))
        for message, _ in hostile:
            coordinator.submit(message)
        result = await cluster.result_of(good.job_id)
        errors = [await cluster.result_of(message.job_id) for message, _ in hostile]
    finally:
        cluster.target = None
        # A failed example must not leave copies on the workers for the next one.
        cluster.forget(good.job_id)
    assert result.status == "ok", result.error
    np.testing.assert_allclose(result.probabilities, reference, rtol=0, atol=1e-5)
    for (message, expected), error in zip(hostile, errors, strict=True):
        assert error.status == "error" and error.error is not None
        assert expected in error.error, (expected, error.error)
        assert error.model == message.model
    # Exactly one result per job so far (a late second one would show up here or in
    # the next example, whose results share the list).
    counts = Counter(r.job_id for r in cluster.results)
    assert max(counts.values()) == 1, [job for job, n in counts.items() if n > 1]


async def test_a_resubmitted_id_gets_the_first_result_again(
    cluster: Cluster, image: npt.NDArray[np.uint8], reference: npt.NDArray[np.float64]
) -> None:
    coordinator = cluster.coordinator
    assert coordinator is not None
    good = submission(new_job_id("good"), image[None])
    coordinator.submit(good)
    first = await cluster.result_of(good.job_id)
    coordinator.submit(submission(good.job_id, 255 - image[None]))  # same id, other image
    async with asyncio.timeout(RESULT_TIMEOUT_S):
        while len([r for r in cluster.results if r.job_id == good.job_id]) < 2:
            cluster.arrived.clear()
            await cluster.arrived.wait()
    again = [r for r in cluster.results if r.job_id == good.job_id][1]
    assert again == first
    np.testing.assert_allclose(again.probabilities, reference, rtol=0, atol=1e-5)


# --- plausible forgeries: a copy never sent, a foreign partial, a wrong count ------------


def _never_sent_attempt(message: Inbound) -> list[Inbound]:
    if not isinstance(message, TileResult):
        return []
    # Well-formed output of an attempt the coordinator never sent: it is stitched in.
    update = {"attempt": message.attempt + 40, "tensor": _garbage_like(message.tensor)}
    return [message.model_copy(update=update)]


def _foreign_partial(message: Inbound) -> list[Inbound]:
    if not isinstance(message, ReductionPartial):
        return []
    # Sums for a real tile from a device that holds no copy of it: they replace the
    # real ones while the gate is still being collected.
    update = {"device": "mallory", "sender": "mallory", "sums": _garbage_like(message.sums)}
    return [message.model_copy(update=update)]


def _miscounted_partial(message: Inbound) -> list[Inbound]:
    if not isinstance(message, ReductionPartial):
        return []
    # The tile's own share is known from the layout; a partial that claims another
    # count fails the whole job when the gate is combined.
    return [message.model_copy(update={"positions": message.positions + 1})]


@pytest.mark.parametrize(
    ("forgery", "when"),
    [
        (_never_sent_attempt, "before"),  # after the real result it is ignored
        (_foreign_partial, "after"),  # before the real partial it is overwritten
        (_miscounted_partial, "after"),
    ],
    ids=[
        "result-of-an-attempt-never-sent",
        "partial-from-a-device-without-the-tile",
        "partial-with-another-count",
    ],
)
async def test_forged_worker_messages_are_refused(
    cluster: Cluster,
    image: npt.NDArray[np.uint8],
    reference: npt.NDArray[np.float64],
    forgery: Mutation,
    when: str,
) -> None:
    coordinator = cluster.coordinator
    assert coordinator is not None
    good = submission(new_job_id("good"), image[None])
    cluster.target = good.job_id
    setattr(cluster, when, [forgery])
    coordinator.submit(good)
    result = await cluster.result_of(good.job_id)
    assert cluster.injected > 0
    assert result.status == "ok", result.error
    np.testing.assert_allclose(result.probabilities, reference, rtol=0, atol=1e-5)


async def test_copies_left_running_are_cancelled_when_the_job_ends(
    cluster: Cluster, image: npt.NDArray[np.uint8], reference: npt.NDArray[np.float64]
) -> None:
    # A forged bad result makes the coordinator re-send every tile; the real results
    # then win. Copies still running when the job ends (re-sent or speculative) must
    # be cancelled, or those of a gated segment hold a worker slot until the job's
    # deadline, waiting for a gate of a segment the coordinator has left behind.
    coordinator = cluster.coordinator
    assert coordinator is not None
    good = submission(new_job_id("good"), image[None])
    cluster.target, cluster.before = good.job_id, [ResultForgery("shape", 1)]
    coordinator.submit(good)
    result = await cluster.result_of(good.job_id)
    cluster.target = None
    assert result.status == "ok", result.error
    np.testing.assert_allclose(result.probabilities, reference, rtol=0, atol=1e-5)
    unanswered = cluster.unanswered(good.job_id)
    cancelled = {device for device, cancel in cluster.cancels if cancel.job_id == good.job_id}
    try:
        # The coordinator cancels before it publishes the result: no wait is needed.
        assert {copy[0] for copy in unanswered} <= cancelled, (unanswered, cancelled)
    finally:
        cluster.forget(good.job_id)
