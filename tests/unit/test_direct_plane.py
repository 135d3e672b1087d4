"""The direct data plane at a real coordinator and real workers, wired in one process.

Three workers (a, b, c) and the coordinator on device a, linked the way an agent
links them (`AgentTransport.send_peer` and friends) but without a broker: tasks go to the
workers, rows and gate partials go straight from worker to worker, results back to
`Coordinator.route`. Checked: the result equals one plain forward pass for every
zoo-like model shape we ship tiny versions of; no segment boundary or gate goes
through the leader; a successful job sends no message to any device at its end;
a device that leaves mid-job, or a peer message that never arrives, makes the job
fall back to the relayed path and it still completes exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import torch

from edgedi.agent.config import JobSettings
from edgedi.agent.coordinator import Coordinator
from edgedi.agent.direct import forwards, takes_task_batches, task_batches
from edgedi.agent.layout import segment_layout
from edgedi.agent.model_store import TORCH_RNG_LOCK, ModelStore
from edgedi.agent.planning import Planning
from edgedi.agent.worker import Worker
from edgedi.broker.messages import (
    MAX_TASKS_PER_BATCH,
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
    TileRows,
    TileTask,
    TileTaskBatch,
    TileTrace,
)
from edgedi.broker.tensors import Tensor
from edgedi.models.checkpoints import load_model
from edgedi.models.data import generate_image
from edgedi.models.interior import UnitCosts
from edgedi.models.specs import get_spec
from edgedi.models.training import normalize

T = TypeVar("T")

SIZE = 48
EPOCH = 3
MODELS = ("tiny", "tiny-edgedi")
DEVICES = ("a", "b", "c")
RESULT_TIMEOUT_S = 60.0  # bounds a hang only
# Unit costs the workers go by: 1 ns per multiply-add, no fixed cost per op, so any
# interior that leaves a few rows of edges pays.
MAC_COSTS = tuple((1e-9, 0.0) for _ in range(64))
_NUMBERS = itertools.count()


def birth(device: str, models: tuple[str, ...] = MODELS) -> DeviceBirth:
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
            cores=1, memory_bytes=2**30, machine="test", software_version="test", models=models
        ),
        profile=profile,
        link=LinkEstimate(bandwidth_bytes_per_second=1.25e8, latency_seconds=1e-4),
    )


@dataclass
class Links:
    """What an agent's links do locally, recording every message by kind."""

    executor: ThreadPoolExecutor
    workers: dict[str, Worker] = field(default_factory=dict)
    coordinator: Coordinator | None = None
    results: list[JobResult] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[TileTask] = field(default_factory=list)
    batches: list[TileTaskBatch] = field(default_factory=list)
    cancels: list[tuple[str, CancelJob]] = field(default_factory=list)
    gates: list[GateValue] = field(default_factory=list)
    peer: list[tuple[str, TileRows | ReductionPartial]] = field(default_factory=list)
    to_leader: list[ReductionPartial | TileResult | TileFailed] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)
    drop_peer: Callable[[TileRows | ReductionPartial], bool] = lambda message: False
    peer_delay_s: float = 0.0
    """How long a message between two devices takes (one to itself: nothing)."""

    async def send_task(self, task: TileTask) -> None:
        self.tasks.append(task)
        if task.device in self.workers and task.device not in self.gone:
            self.workers[task.device].accept(task)

    async def send_batch(self, batch: TileTaskBatch) -> None:
        self.batches.append(batch)
        if batch.device in self.workers and batch.device not in self.gone:
            for task in batch.tasks:
                self.workers[batch.device].accept(task)

    async def send_gate(self, message: GateValue, devices: Collection[str]) -> None:
        self.gates.append(message)
        for device in devices:
            if device in self.workers and device not in self.gone:
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

    async def send_partial(self, message: ReductionPartial) -> None:
        await self._to_leader(message)

    async def send_tile_outcome(self, message: TileResult | TileFailed | TileTrace) -> None:
        await self._to_leader(message)

    async def _to_leader(self, message: ReductionPartial | TileResult | TileFailed) -> None:
        if message.device in self.gone:
            return
        self.to_leader.append(message)
        assert self.coordinator is not None
        self.coordinator.route(message)

    def peer_link(self, sender: str) -> Callable[[str, TileRows | ReductionPartial], Any]:
        async def send_peer(device: str, message: TileRows | ReductionPartial) -> None:
            if sender in self.gone or device in self.gone or self.drop_peer(message):
                return
            if device != sender:
                self.peer.append((device, message))
                await asyncio.sleep(self.peer_delay_s)
            worker = self.workers[device]
            if isinstance(message, TileRows):
                worker.on_rows(message)
            else:
                worker.on_peer_partial(message)

        return send_peer

    async def result_of(self, job_id: str) -> JobResult:
        async with asyncio.timeout(RESULT_TIMEOUT_S):
            while True:
                for result in self.results:
                    if result.job_id == job_id:
                        return result
                self.arrived.clear()
                await self.arrived.wait()


class _WorkerLinks:
    """A worker's own view of the links: peer messages leave as that device."""

    def __init__(self, links: Links, device: str) -> None:
        self.links = links
        self.send_peer = links.peer_link(device)

    async def send_partial(self, message: ReductionPartial) -> None:
        await self.links.send_partial(message)

    async def send_tile_outcome(self, message: TileResult | TileFailed | TileTrace) -> None:
        await self.links.send_tile_outcome(message)

    async def send_peer_partial(self, message: ReductionPartial) -> None:
        # Published once; the broker gives it to every other device.
        for device in self.links.workers:
            if device != message.device:
                await self.send_peer(device, message)


@pytest.fixture(scope="module")
def store() -> ModelStore:
    store = ModelStore(list(MODELS), SIZE)
    store.load_all()
    return store


@pytest.fixture(scope="module")
def image() -> npt.NDArray[np.uint8]:
    return generate_image(2, 5, SIZE, 0)


def reference(model_name: str, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    with TORCH_RNG_LOCK:
        model, _ = load_model(model_name, SIZE)
    with torch.inference_mode():
        logits = model(normalize(np.array(image)[None])).double()
    probabilities: npt.NDArray[np.float64] = torch.softmax(logits, dim=1).numpy().reshape(-1)
    return probabilities


@pytest_asyncio.fixture
async def links(store: ModelStore) -> AsyncIterator[Links]:
    async with _wired(store, SIZE) as links:
        yield links


@contextlib.asynccontextmanager
async def _wired(
    store: ModelStore,
    size: int,
    settings: JobSettings | None = None,
    models: tuple[str, ...] = MODELS,
    proven: tuple[str, ...] = DEVICES,
    takes_batches: Callable[[str], bool] = lambda device: False,
    unit_costs: Callable[[str], UnitCosts | None] = lambda digest: MAC_COSTS,
) -> AsyncIterator[Links]:
    """Workers and a leader wired in memory; `proven` are the devices the leader has
    seen answer before (the others are on probation: their first job is relayed)."""
    settings = settings or JobSettings(deadline_s=RESULT_TIMEOUT_S, straggler_min_s=2.0)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-test") as executor:
        links = Links(executor)
        planning = Planning("a", size, "equal")
        planning.update({device: birth(device, models) for device in DEVICES}, DEVICES, EPOCH)
        for device in DEVICES:
            links.workers[device] = Worker(
                device,
                store,
                executor,
                _WorkerLinks(links, device),
                accepts_epoch=lambda epoch: epoch >= EPOCH,
                unit_costs=unit_costs,
            )
        coordinator = Coordinator(
            "a",
            EPOCH,
            store,
            planning,
            links,
            settings,
            alive_devices=lambda: [d for d in DEVICES if d not in links.gone],
            proven=proven,
            takes_batches=takes_batches,
        )
        links.coordinator = coordinator
        tasks = [asyncio.create_task(w.run()) for w in links.workers.values()]
        tasks.append(asyncio.create_task(coordinator.run()))
        try:
            yield links
        finally:
            coordinator.stop()
            async with asyncio.timeout(RESULT_TIMEOUT_S):
                await tasks[-1]
            for task in tasks[:-1]:
                task.cancel()
            await asyncio.gather(*tasks[:-1], return_exceptions=True)


def submit(links: Links, model: str, image: npt.NDArray[np.uint8], strategy: str) -> str:
    job_id = f"direct-{next(_NUMBERS)}"
    assert links.coordinator is not None
    links.coordinator.submit(
        JobSubmit(
            sender="client",
            job_id=job_id,
            model=model,
            image=Tensor(np.array(image)),
            client="client",
            submitted_at=0.0,
            strategy=strategy,
        )
    )
    return job_id


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("strategy", ["equal", "edgeld", "single"])
async def test_direct_jobs_equal_the_whole_forward_pass(
    links: Links, image: npt.NDArray[np.uint8], model: str, strategy: str
) -> None:
    job_id = submit(links, model, image, strategy)
    result = await links.result_of(job_id)
    assert result.status == "ok", result.error
    np.testing.assert_allclose(result.probabilities, reference(model, image), atol=1e-5)
    # Every task went out at the start, and none twice: the job never fell back.
    assert links.coordinator is not None
    assert links.coordinator.statistics.direct_fallbacks == 0
    assert all(task.direct and task.attempt == 0 for task in links.tasks)
    # The leader relayed nothing: no gate values, and the only worker messages it got
    # are the last segment's results.
    last = max(task.segment for task in links.tasks)
    assert not links.gates
    assert all(isinstance(m, TileResult) and m.segment == last for m in links.to_leader)
    # A successful job ends without a message to any device.
    assert not links.cancels


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batched", [("b", "c"), ("c",)], ids=["all", "mixed"])
async def test_a_direct_job_goes_out_as_one_batch_per_device_that_reads_them(
    store: ModelStore, image: npt.NDArray[np.uint8], model: str, batched: tuple[str, ...]
) -> None:
    # Devices of a release that reads batches get one message a job; an older
    # device ("mixed": b) still gets one message per task, in the same job.
    async with _wired(store, SIZE, takes_batches=lambda device: device in batched) as links:
        result = await links.result_of(submit(links, model, image, "equal"))
        assert result.status == "ok", result.error
        np.testing.assert_allclose(result.probabilities, reference(model, image), atol=1e-5)
        assert links.coordinator is not None
        assert links.coordinator.statistics.direct_fallbacks == 0
        assert sorted(batch.device for batch in links.batches) == sorted(batched)
        assert {task.device for task in links.tasks} == set(DEVICES) - set(batched)
        for batch in links.batches:
            segments = [task.segment for task in batch.tasks]
            assert segments == sorted(segments) and len(set(segments)) == len(segments)
            assert all(task.direct and task.attempt == 0 for task in batch.tasks)
        segments_in_plan = 1 + max(
            task.segment for task in [*links.tasks, *(t for b in links.batches for t in b.tasks)]
        )
        assert len(links.tasks) == segments_in_plan * (len(DEVICES) - len(batched))
        assert not links.gates and not links.cancels


async def test_a_newcomers_first_job_is_relayed_and_timed_then_direct(
    store: ModelStore, image: npt.NDArray[np.uint8]
) -> None:
    # No device has answered this leader yet: each gets a relayed trial tile, whose
    # time the leader measures (an overrun on the direct plane names no device).
    async with _wired(store, SIZE, proven=()) as links:
        first = await links.result_of(submit(links, "tiny-edgedi", image, "equal"))
        assert first.status == "ok", first.error
        assert not any(task.direct for task in links.tasks)
        assert links.gates  # gate values went through the leader
        links.tasks.clear()
        second = await links.result_of(submit(links, "tiny-edgedi", image, "equal"))
        assert second.status == "ok", second.error
        assert links.tasks and all(task.direct for task in links.tasks)
        np.testing.assert_array_equal(first.probabilities, second.probabilities)


async def test_gates_and_rows_travel_between_devices(
    links: Links, image: npt.NDArray[np.uint8]
) -> None:
    job_id = submit(links, "tiny-edgedi", image, "equal")
    result = await links.result_of(job_id)
    assert result.status == "ok", result.error
    kinds = {type(message).__name__ for _, message in links.peer}
    assert "ReductionPartial" in kinds  # gates all-gathered among the holders
    plan_segments = max(task.segment for task in links.tasks) + 1
    if plan_segments > 1:
        assert "TileRows" in kinds  # segment boundaries device to device
    # Every holder combined the same partials, so every tile of a segment got the
    # same gate value: the result is exact (checked above in general).
    np.testing.assert_allclose(result.probabilities, reference("tiny-edgedi", image), atol=1e-5)


async def test_a_lost_peer_message_falls_back_to_the_relayed_path(
    links: Links, image: npt.NDArray[np.uint8]
) -> None:
    # Rows sent to device b never arrive (a broker that lost them): the direct run
    # is overdue, and the relayed path recomputes the job.
    links.drop_peer = lambda message: isinstance(message, TileRows | ReductionPartial)
    job_id = submit(links, "tiny-edgedi", image, "equal")
    result = await links.result_of(job_id)
    assert result.status == "ok", result.error
    np.testing.assert_allclose(result.probabilities, reference("tiny-edgedi", image), atol=1e-5)
    assert links.coordinator is not None
    assert links.coordinator.statistics.direct_fallbacks == 1
    assert any(task.attempt >= 1 and not task.direct for task in links.tasks)
    assert [r.job_id for r in links.results].count(job_id) == 1
    # The devices that held direct tasks of the run that gave up are told to stop.
    assert {device for device, _ in links.cancels} >= {"b", "c"}


async def test_a_device_that_leaves_mid_job_is_worked_around(
    links: Links, image: npt.NDArray[np.uint8]
) -> None:
    # Device c stops answering anything once the job is under way, then leaves.
    job_id = submit(links, "tiny", image, "equal")
    await asyncio.sleep(0)
    links.gone.add("c")
    assert links.coordinator is not None
    links.coordinator.devices_left(["c"])
    result = await links.result_of(job_id)
    assert result.status == "ok", result.error
    np.testing.assert_allclose(result.probabilities, reference("tiny", image), atol=1e-5)
    assert [r.job_id for r in links.results].count(job_id) == 1


@pytest.mark.parametrize("model", ["vgg16-edgedi", "resnet34", "resnet18-edgedi"])
def test_forwards_cover_every_input_row_of_the_next_segment_exactly(model: str) -> None:
    spec = get_spec(model, 200)
    spatial = spec.spatial_units
    rng = np.random.default_rng(len(model))
    for _ in range(20):
        cut = int(rng.integers(0, len(spatial) - 1))
        first = segment_layout(spec, 0, cut, _parts(rng, spatial[cut].out_shape[1]))
        second = segment_layout(
            spec, cut + 1, len(spatial) - 1, _parts(rng, spatial[-1].out_shape[1])
        )
        devices = [f"d{j}" for j in range(second.count)]
        sent = forwards(first, second, devices)
        for target in range(second.count):
            wanted = second.row_tiles[target].in_rows
            got = sorted(f.rows for per_tile in sent for f in per_tile if f.tile == target)
            covered = [row for start, stop in got for row in range(start, stop)]
            assert covered == list(range(wanted.start, wanted.stop))
            assert all(f.device == devices[f.tile] for per_tile in sent for f in per_tile)


def _parts(rng: np.random.Generator, height: int) -> list[tuple[int, int]]:
    count = int(rng.integers(1, min(4, height) + 1))
    edges = sorted(rng.choice(np.arange(1, height), size=count - 1, replace=False).tolist())
    bounds = [0, *edges, height]
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


# VGG-16's head reads the whole last map: at 64 px that map has two rows.
HEAD_SIZE = 64


@pytest.fixture(scope="module")
def vgg_store() -> ModelStore:
    store = ModelStore(["vgg16"], HEAD_SIZE)
    store.load_all()
    return store


@pytest.mark.parametrize("split_head", [True, False])
async def test_the_head_split_over_the_last_tiles_equals_the_whole_forward_pass(
    vgg_store: ModelStore, split_head: bool
) -> None:
    image = generate_image(1, 7, HEAD_SIZE, 0)
    settings = JobSettings(deadline_s=RESULT_TIMEOUT_S, straggler_min_s=2.0, split_head=split_head)
    with TORCH_RNG_LOCK:
        model, _ = load_model("vgg16", HEAD_SIZE)
    with torch.inference_mode():
        logits = model(normalize(np.array(image)[None])).double()
    expected = torch.softmax(logits, dim=1).numpy().reshape(-1)
    async with _wired(vgg_store, HEAD_SIZE, settings, ("vgg16",)) as links:
        job_id = submit(links, "vgg16", image, "equal")
        result = await links.result_of(job_id)
    assert result.status == "ok", result.error
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    assert links.coordinator is not None
    assert links.coordinator.statistics.direct_fallbacks == 0
    answers = [m for m in links.to_leader if isinstance(m, TileResult)]
    last = max(task.segment for task in links.tasks)
    rows_of_last = sum(
        1 for t in links.tasks if t.segment == last and t.output_rows[1] > t.output_rows[0]
    )
    assert rows_of_last >= 2  # the head really is split over several tiles
    width = model.spec.units[-1].main[0].out_channels
    if split_head:
        # Each last tile sent its 4096 partial sums, never its rows.
        assert all(m.head_partial and m.tensor.shape == (1, width) for m in answers)
    else:
        assert not any(m.head_partial for m in answers)


async def test_a_head_partial_for_a_model_without_a_linear_head_is_refused(
    store: ModelStore, links: Links, image: npt.NDArray[np.uint8]
) -> None:
    await links.result_of(submit(links, "tiny", image, "single"))
    task = next(t for t in links.tasks if t.forward == ())
    worker = links.workers[task.device]
    before = worker.statistics.accepted
    worker.accept(task.model_copy(update={"head_partial": True, "attempt": 5}))
    assert worker.statistics.accepted == before  # refused: tiny's head starts with a pool


async def test_a_resubmitted_job_runs_again_where_its_last_run_was_cancelled(
    links: Links, image: npt.NDArray[np.uint8]
) -> None:
    # A job that ends in a retryable error is cancelled on every device it used; the
    # client resubmits it under the same id, the leader (same epoch) runs it again,
    # and the devices must take the new run's tasks, not ignore them as cancelled.
    await links.result_of(submit(links, "tiny", image, "equal"))
    task = next(t for t in links.tasks if t.device != "a")
    worker = links.workers[task.device]
    worker.cancel_job(
        CancelJob(sender="a", job_id=task.job_id, epoch=EPOCH, reason="test", run=task.run)
    )
    assert task.run == 0
    before = worker.statistics.accepted
    worker.accept(task.model_copy(update={"attempt": task.attempt + 1}))
    assert worker.statistics.accepted == before  # the cancelled run stays cancelled
    worker.accept(task.model_copy(update={"run": 1}))
    assert worker.statistics.accepted == before + 1  # the next run is taken


@pytest.mark.parametrize(
    ("version", "reads"),
    [
        ("0.2.0", True),
        ("0.2", True),
        ("0.10.1", True),
        ("1.0.0rc1", True),
        ("0.1.0", False),
        ("0+unknown", False),  # a source checkout: taken for an old device
        ("test", False),
        (None, False),
        (3, False),
    ],
)
def test_which_releases_read_task_batches(version: object, reads: bool) -> None:
    assert takes_task_batches(version) is reads


def test_a_long_task_list_is_split_into_bounded_batches_in_order() -> None:
    template = TileTask(
        sender="a",
        job_id="j-1",
        epoch=EPOCH,
        plan_id="p",
        device="b",
        model="tiny",
        model_digest="d",
        input_size=SIZE,
        segment=0,
        first_unit=0,
        last_unit=0,
        row_parts=((0, 4),),
        tile=0,
        input_rows=(0, 4),
        output_rows=(0, 4),
        tensor=Tensor(np.zeros((1, 1, 4, 4), dtype=np.float32)),
        deadline=0.0,
    )
    tasks = [template.model_copy(update={"segment": n}) for n in range(MAX_TASKS_PER_BATCH + 3)]
    batches = task_batches(tasks)
    assert [len(batch.tasks) for batch in batches] == [MAX_TASKS_PER_BATCH, 3]
    assert [task.segment for batch in batches for task in batch.tasks] == list(range(len(tasks)))
    assert all((b.job_id, b.epoch, b.device, b.sender) == ("j-1", EPOCH, "b", "a") for b in batches)
    assert task_batches([]) == []


async def test_tiles_compute_their_interior_before_their_halo_and_stay_exact() -> None:
    # Each tile's own rows come from its own device the moment its previous tile
    # ends; the halo comes from the neighbours' later. "tiny" has no gates: a
    # later-segment tile may start on its interior (at 96 px its strips are tall
    # enough for one that pays).
    size = 96
    store = ModelStore(["tiny"], size)
    store.load_all()
    picture = generate_image(2, 5, size, 0)
    with TORCH_RNG_LOCK:
        model, _ = load_model("tiny", size)
    with torch.inference_mode():
        expected = torch.softmax(model(normalize(np.array(picture)[None])).double(), dim=1)
    async with _wired(store, size, models=("tiny",)) as links:
        links.peer_delay_s = 0.05  # the halo comes well after a device's own rows
        for _ in range(3):
            job_id = submit(links, "tiny", picture, "equal")
            result = await links.result_of(job_id)
            assert result.status == "ok", result.error
            np.testing.assert_allclose(result.probabilities, expected.numpy()[0], atol=1e-5)
        early = sum(worker.statistics.early_parts for worker in links.workers.values())
        assert early > 0
        assert links.coordinator is not None
        assert links.coordinator.statistics.direct_fallbacks == 0


async def test_no_interior_ahead_where_the_ops_fixed_costs_make_splitting_dear(
    store: ModelStore, image: npt.NDArray[np.uint8]
) -> None:
    dear = tuple((1e-9, 1.0) for _ in range(64))  # a second per op invocation
    for costs in (lambda digest: dear, lambda digest: None):  # dear, and not measured
        async with _wired(store, SIZE, unit_costs=costs) as links:
            job_id = submit(links, "tiny", image, "equal")
            result = await links.result_of(job_id)
            assert result.status == "ok", result.error
            assert not any(w.statistics.early_parts for w in links.workers.values())
