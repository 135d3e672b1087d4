"""The pure pieces behind failover and stragglers: the job journal, the result cache,
and the planner learning device speeds from measured tiles."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from edgedi.agent.config import JobSettings
from edgedi.agent.job_intake import CoordinatorStatistics, Job
from edgedi.agent.journal import JobJournal, remember_result
from edgedi.agent.planning import REPLAN_DRIFT, REPLAN_MIN_INTERVAL_S, Planning
from edgedi.agent.segments import SegmentRunner
from edgedi.agent.tile_tracker import TileRecord, TileTracker
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import (
    DeviceBirth,
    DeviceCapabilities,
    JobResult,
    JobSubmit,
    LinkEstimate,
)
from edgedi.broker.plan import Plan
from edgedi.broker.tensors import Tensor


def _submit(job_id: str, deadline_s: float | None = None) -> JobSubmit:
    return JobSubmit(
        sender="client",
        job_id=job_id,  # type: ignore[arg-type]
        model="tiny-edgedi",
        image=Tensor(np.zeros((1, 8, 8), dtype=np.uint8)),
        client="client",
        submitted_at=time.time(),
        deadline_seconds=deadline_s,
    )


def _result(job_id: str, status: str = "ok") -> JobResult:
    if status == "ok":
        return JobResult(sender="leader", job_id=job_id, status="ok")  # type: ignore[arg-type]
    return JobResult(
        sender="leader",
        job_id=job_id,  # type: ignore[arg-type]
        status="error",
        error="no workers",
        retryable=True,
    )


def test_the_journal_keeps_unanswered_jobs_in_order() -> None:
    journal = JobJournal(capacity=10, default_deadline_s=30.0)
    for number in range(4):
        journal.submitted(_submit(f"job-{number}"), now=100.0 + number)
    journal.answered("job-1")
    journal.answered("never-submitted")  # a result of a job this device never heard of
    pending = journal.pending(now=110.0)
    assert [entry.submit.job_id for entry in pending] == ["job-0", "job-2", "job-3"]
    assert pending[0].received_at == 100.0
    assert pending[0].deadline == 130.0


def test_a_resubmission_moves_a_job_to_the_back_with_its_new_deadline() -> None:
    journal = JobJournal(capacity=10, default_deadline_s=30.0)
    journal.submitted(_submit("a", deadline_s=5.0), now=0.0)
    journal.submitted(_submit("b", deadline_s=5.0), now=1.0)
    journal.submitted(_submit("a", deadline_s=4.0), now=3.0)
    pending = journal.pending(now=5.5)  # b's deadline (6.0) and a's new one (7.0) hold
    assert [entry.submit.job_id for entry in pending] == ["b", "a"]
    assert pending[1].deadline == 7.0


def test_the_journal_forgets_expired_jobs_and_is_bounded() -> None:
    journal = JobJournal(capacity=3, default_deadline_s=10.0)
    for number in range(5):
        journal.submitted(_submit(f"job-{number}"), now=float(number))
    assert len(journal) == 3 and journal.dropped == 2
    assert "job-0" not in journal and "job-4" in journal
    assert [e.submit.job_id for e in journal.pending(now=12.5)] == ["job-3", "job-4"]
    assert journal.pending(now=100.0) == [] and len(journal) == 0


def test_the_result_cache_is_a_bounded_lru() -> None:
    cache: OrderedDict[str, JobResult] = OrderedDict()
    for number in range(5):
        remember_result(cache, _result(f"job-{number}"), capacity=3)
    remember_result(cache, _result("job-2", "error"), capacity=3)
    assert list(cache) == ["job-3", "job-4", "job-2"]
    assert cache["job-2"].retryable


def test_an_ok_result_is_never_retryable() -> None:
    with pytest.raises(ValueError, match="not retryable"):
        JobResult(sender="x", job_id="j", status="ok", retryable=True)  # type: ignore[arg-type]


def _birth(device: str, session: int = 1) -> DeviceBirth:
    return DeviceBirth(
        sender=device,
        device=device,  # type: ignore[arg-type]
        session=session,
        candidate=True,
        capabilities=DeviceCapabilities(
            cores=1,
            memory_bytes=2**30,
            machine="Linux-aarch64",
            software_version="0.1",
            models=("tiny-edgedi",),
        ),
        profile={"conv3x3": (1e-9, 1e-5), "conv1x1": (1e-9, 1e-5), "gate": (1e-9, 1e-5)},
        link=LinkEstimate(bandwidth_bytes_per_second=1e9, latency_seconds=0.0),
    )


def _rows(plan: Plan, device: str) -> int:
    """Output rows the plan gives `device` over all segments (weighted by segment)."""
    return sum(
        part.rows[1] - part.rows[0]
        for segment in plan.segments
        for part in segment.parts
        if part.device == device
    )


async def test_measured_tiles_slow_a_device_down_and_trigger_a_new_plan() -> None:
    changes: list[int] = []
    planning = Planning("pi-1", 200, "proportional", on_change=lambda: changes.append(1))
    births = {device: _birth(device) for device in ("pi-1", "pi-2", "pi-3")}
    planning.update(births, births, epoch=1)
    before = await planning.plan_for("tiny-edgedi")
    assert abs(_rows(before, "pi-3") - _rows(before, "pi-2")) <= 2  # rounding of equal shares

    # pi-3 takes 3× its prediction: the factor moves by 30 % of the gap per tile, and
    # the plans change once it has drifted past REPLAN_DRIFT.
    for _ in range(10):
        if planning.observe_compute("pi-3", predicted_s=0.010, measured_s=0.030):
            break
    assert changes == [1]
    assert planning.speed_factor("pi-3") > REPLAN_DRIFT
    assert planning.speed_factor("pi-2") == 1.0
    after = await planning.plan_for("tiny-edgedi")
    assert after.plan_id != before.plan_id
    assert _rows(after, "pi-3") < _rows(before, "pi-3")
    assert _rows(after, "pi-2") > _rows(before, "pi-2")

    # Measurements that agree with the new plan leave it alone...
    planned = planning.speed_factor("pi-3")
    for _ in range(5):
        assert not planning.observe_compute("pi-3", predicted_s=0.010, measured_s=0.0101)
    assert await planning.plan_for("tiny-edgedi") is after
    assert planning.speed_factor("pi-3") == pytest.approx(planned, rel=0.02)
    # ...and a restart (new session) forgets what was learnt: it is a new device.
    births["pi-3"] = _birth("pi-3", session=2)
    planning.update(births, births, epoch=1)
    assert planning.speed_factor("pi-3") == 1.0


async def test_a_tile_of_an_older_plan_is_judged_by_the_factor_that_plan_assumed() -> None:
    planning = Planning("pi-1", 200, "proportional")
    births = {device: _birth(device) for device in ("pi-1", "pi-2", "pi-3")}
    planning.update(births, births, epoch=1)
    before = await planning.plan_for("tiny-edgedi")  # made with pi-3 at 1.0
    for _ in range(10):
        if planning.observe_compute("pi-3", 0.010, 0.030, plan_id=before.plan_id):
            break
    learnt = planning.speed_factor("pi-3")
    assert learnt > REPLAN_DRIFT
    after = await planning.plan_for("tiny-edgedi")  # made with the learnt factor
    # Tiles of jobs still running the old plan still take 3× the old prediction: that
    # says pi-3 is 3× its profile, not 3× the new factor, nor (judged by the new plan's
    # factor) faster than learnt...
    for _ in range(20):
        planning.observe_compute("pi-3", 0.010, 0.030, plan_id=before.plan_id)
    assert planning.speed_factor("pi-3") == pytest.approx(3.0, rel=0.01)
    # ...and the new plan's tiles (predicted with the factor learnt then) confirm it.
    for _ in range(5):
        planning.observe_compute("pi-3", 0.010 * learnt, 0.030, plan_id=after.plan_id)
    assert planning.speed_factor("pi-3") == pytest.approx(3.0, rel=0.01)


async def test_a_job_runs_the_replaced_plan_while_its_successor_is_made() -> None:
    changes: list[int] = []
    planning = Planning("pi-1", 200, "proportional", on_change=lambda: changes.append(1))
    births = {device: _birth(device) for device in ("pi-1", "pi-2", "pi-3")}
    planning.update(births, births, epoch=1)
    first = await planning.plan_for("tiny-edgedi", stale_ok=True)
    assert planning.take_wanted() == []
    for _ in range(10):
        if planning.observe_compute("pi-3", 0.010, 0.030, plan_id=first.plan_id):
            break
    changes.clear()
    # A job does not wait for the re-plan: it runs the plan being replaced, and asks
    # (once) for its successor to be made in the background.
    assert await planning.plan_for("tiny-edgedi", stale_ok=True) is first
    assert await planning.plan_for("tiny-edgedi", stale_ok=True) is first
    assert changes == [1]
    assert planning.take_wanted() == [("tiny-edgedi", "proportional")]
    successor = await planning.plan_for("tiny-edgedi")  # what the background run does
    assert successor.plan_id != first.plan_id
    assert await planning.plan_for("tiny-edgedi", stale_ok=True) is successor
    assert planning.take_wanted() == []

    # A membership change is acted on at once: no plan naming a departed device, and
    # a newcomer in the very next job's plan.
    for _ in range(10):
        if planning.observe_compute("pi-2", 0.010, 0.030, plan_id=successor.plan_id):
            break
    del births["pi-3"]
    planning.update(births, births, epoch=1)
    after_leave = await planning.plan_for("tiny-edgedi", stale_ok=True)
    assert "pi-3" not in after_leave.devices_used
    births["pi-4"] = _birth("pi-4")
    planning.update(births, births, epoch=1)
    assert "pi-4" in (await planning.plan_for("tiny-edgedi", stale_ok=True)).devices_used
    assert planning.take_wanted() == []


def _overtaken_tile(planned: str, by: str, predicted_s: float, waited_s: float) -> TileRecord:
    """A tile of `planned` that a speculative copy on `by` answered after `waited_s`."""
    now = time.monotonic()
    return TileRecord(
        segment=0,
        index=0,
        task=cast(Any, None),  # not read when learning
        expected_s=predicted_s,
        compute_s=predicted_s,
        planned_device=planned,
        first_sent_at=now - waited_s,
        sent_at=now - waited_s,
        overdue_at=now,
        running={0: planned, 1: by},
        sent={0: planned, 1: by},
    )


async def test_a_wait_is_learnt_as_slowness_only_when_the_device_had_nothing_else() -> None:
    planning = Planning("pi-1", 200, "proportional")
    births = {device: _birth(device) for device in ("pi-1", "pi-2", "pi-3")}
    planning.update(births, births, epoch=1)
    settings = JobSettings()
    jobs: dict[str, Any] = {}
    runner = SegmentRunner(
        DeviceId("pi-1"),
        1,
        planning,
        cast(Any, None),  # no messages are sent when learning
        settings,
        CoordinatorStatistics(),
        TileTracker(settings),
        alive_devices=lambda: list(births),
        jobs=jobs,
    )
    job = Job(submit=cast(Any, None), received_at=0.0, deadline=0.0, inbox=asyncio.Queue())
    copy_answer = cast(Any, SimpleNamespace(device="pi-2", attempt=1, compute_seconds=0.01))
    # pi-3 also holds another job's tile (a copy it took for a slow peer, say): its
    # 5x wait may have gone on that, so it is not taken as its speed.
    tile = _overtaken_tile("pi-3", "pi-2", 0.010, 0.050)
    job.tiles[(0, 0)] = tile
    jobs["this"] = job
    jobs["other"] = SimpleNamespace(tiles={(0, 0): _overtaken_tile("pi-3", "pi-1", 0.01, 0.0)})
    runner._learn_speed(job, tile, copy_answer)
    assert job.compute_times == {}
    # With nothing else on it, the wait is a lower bound of its compute time.
    del jobs["other"]
    runner._learn_speed(job, tile, copy_answer)
    predicted, waited = job.compute_times["pi-3"]
    assert predicted == 0.010 and waited >= 0.050


def test_noise_and_unknown_devices_are_not_learnt() -> None:
    planning = Planning("pi-1", 200, "proportional")
    births = {"pi-1": _birth("pi-1")}
    planning.update(births, births, epoch=1)
    assert not planning.observe_compute("pi-9", predicted_s=0.01, measured_s=1.0)
    assert not planning.observe_compute("pi-1", predicted_s=1e-4, measured_s=1.0)  # below noise
    assert not planning.observe_compute("pi-1", predicted_s=0.01, measured_s=0.0)
    assert planning.speed_factor("pi-1") == 1.0
    # One pathological tile (a swap storm) among tiles as predicted moves nothing: the
    # factor is the median of the last few.
    for measured in (0.01, 0.01, 100.0, 0.01, 0.01):
        planning.observe_compute("pi-1", predicted_s=0.01, measured_s=measured)
    assert planning.speed_factor("pi-1") == 1.0


def test_a_storm_of_late_tiles_replans_once_and_stays_bounded() -> None:
    # During a broker outage every tile is late: the factors learn, but plans are
    # remade at most every REPLAN_MIN_INTERVAL_S and no device runs away to 100x.
    changes: list[int] = []
    planning = Planning("pi-1", 200, "proportional", on_change=lambda: changes.append(1))
    births = {device: _birth(device) for device in ("pi-1", "pi-2")}
    planning.update(births, births, epoch=1)
    replans = [
        planning.observe_compute(
            "pi-2", predicted_s=0.01, measured_s=1.0, now=100.0 + REPLAN_MIN_INTERVAL_S * n / 400
        )
        for n in range(300)  # all within one interval
    ]
    assert sum(replans) == 1 and changes == [1]
    assert REPLAN_DRIFT < planning.speed_factor("pi-2") <= 20.0
    assert planning.observe_compute("pi-2", 0.01, 1.0, now=100.0 + REPLAN_MIN_INTERVAL_S + 3.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process nice values are POSIX")
async def test_plans_are_made_in_another_process_at_the_lowest_cpu_priority() -> None:
    planning = Planning("pi-1", 200, "proportional")
    births = {device: _birth(device) for device in ("pi-1", "pi-2")}
    planning.update(births, births, epoch=1)
    try:
        await planning.plan_for("tiny-edgedi")
        # Not a thread of this process: it would hold the GIL against the compute thread.
        assert await planning._worker.run(os.getpid) != os.getpid()
        assert await planning._worker.run(os.getpriority, os.PRIO_PROCESS, 0) == 19
    finally:
        planning.close()
