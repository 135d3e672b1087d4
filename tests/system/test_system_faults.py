"""Fault injection on real agent processes and a real broker: nothing lost, nothing doubled.

- 60 jobs while a worker is killed with SIGKILL every 10 jobs (and restarted, as
  systemd would): 60 ok results equal to single-process inference, one answer each.
- The leader killed with SIGKILL mid-stream: every job answered, by the successor
  for the ones the dead leader held; the failover time is printed (`pytest -s`).
- A device that joins mid-stream is in the plan and computes from then on.
- A worker frozen with SIGSTOP (a hung board, a silent network loss): its tiles turn
  overdue and are copied to the others, it is dropped from the plan once its
  heartbeats stop, and after SIGCONT it rejoins and is used again.
- A hung device replaced by a new process with the same id (its heartbeats have
  stopped, so the id is free): the broker drops the hung connection at its keepalive
  and publishes the old session's Will *after* the new session's birth; the session
  counter keeps that late Will from evicting the live device.

Times are printed, not asserted: the machines are shared and noisy.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import numpy as np
from fault_support import (
    MODEL,
    ResultLog,
    fault_cluster,
    observed,
    picture,
    reference,
    wait_for_plan,
)

from edgedi.agent.client import InferenceClient
from edgedi.broker.messages import JobResult

SEEDS = 6  # distinct images, cycled (references computed once)
IN_FLIGHT = 3


async def _stream(
    client: InferenceClient,
    count: int,
    *,
    on_done: dict[int, asyncio.Event] | None = None,
    first: int = 0,
    strategy: str | None = "equal",
    timeout: float = 90.0,  # noqa: ASYNC109 - each job's own patience
) -> list[tuple[int, JobResult, float]]:
    """`count` jobs numbered from `first`, `IN_FLIGHT` at a time; (number, result, latency).

    `equal` plans give every device a share of every job, so a fault always hits work.
    """
    slots = asyncio.Semaphore(IN_FLIGHT)
    done = 0

    async def one(number: int) -> tuple[int, JobResult, float]:
        nonlocal done
        async with slots:
            started = time.monotonic()
            result = await client.infer(
                picture(number % SEEDS), MODEL, strategy=strategy, timeout=timeout
            )
            done += 1
            if on_done is not None and done in on_done:
                on_done[done].set()
            return number, result, time.monotonic() - started

    return list(await asyncio.gather(*(one(number) for number in range(first, first + count))))


def _check_answers(
    outcomes: list[tuple[int, JobResult, float]], log: ResultLog, references: list[np.ndarray]
) -> None:
    job_ids = [result.job_id for _, result, _ in outcomes]
    assert len(set(job_ids)) == len(outcomes)
    assert sorted(number for number, _, _ in outcomes) == list(range(len(outcomes)))
    for number, result, _ in outcomes:
        assert result.status == "ok", f"job {number}: {result.error}"
        np.testing.assert_allclose(result.probabilities, references[number % SEEDS], atol=1e-4)
        # Every message on results/ for the job carries the one answer (a client's
        # re-submission may re-publish the cached result, never a second computation).
        assert log.distinct_answers(result.job_id) == 1, log.results[result.job_id]
    unknown = set(log.results) - set(job_ids)
    assert not unknown, f"results for jobs nobody submitted: {unknown}"


def _latencies(outcomes: list[tuple[int, JobResult, float]]) -> str:
    values = [latency for _, _, latency in outcomes]
    return (
        f"median {statistics.median(values):.2f} s, max {max(values):.2f} s over {len(values)} jobs"
    )


async def test_sixty_jobs_while_a_worker_is_killed_every_ten(tmp_path: Path) -> None:
    references = [reference(seed) for seed in range(SEEDS)]
    devices = {"fault-a": 0, "fault-b": 1, "fault-c": 2}
    async with fault_cluster(tmp_path, devices) as cluster, observed(cluster) as (client, log):
        await wait_for_plan(client, set(devices))
        kills = {10 * k: asyncio.Event() for k in range(1, 6)}
        stream = asyncio.create_task(_stream(client, 60, on_done=kills))
        victims = ["fault-b", "fault-c"]
        for turn, (_, event) in enumerate(sorted(kills.items())):
            await event.wait()
            victim = victims[turn % 2]
            cluster.kill(victim)  # mid-stream: jobs are in flight on it
            await asyncio.sleep(0.5)
            cluster.start(victim, devices[victim])
        outcomes = await stream
        _check_answers(outcomes, log, references)
        assert len(outcomes) == 60
        assert cluster.starts["fault-b"] + cluster.starts["fault-c"] == 2 + 5
        print(f"\n60 jobs, a worker SIGKILLed every 10: {_latencies(outcomes)}")


async def test_the_leader_killed_mid_stream_every_job_is_answered(tmp_path: Path) -> None:
    references = [reference(seed) for seed in range(SEEDS)]
    devices = {"lead-a": 0, "lead-b": 1, "lead-c": 2}
    async with fault_cluster(tmp_path, devices) as cluster, observed(cluster) as (client, log):
        await wait_for_plan(client, set(devices))
        first = log.leader()
        # Usually lead-a (the first to settle); on a loaded machine another may settle
        # first and lead: whichever leads is the one killed.
        assert first is not None and first.device in devices
        halfway = {8: asyncio.Event()}
        stream = asyncio.create_task(_stream(client, 20, on_done=halfway))
        await halfway[8].wait()
        killed_at = time.monotonic()
        cluster.kill(first.device)
        outcomes = await stream
        _check_answers(outcomes, log, references)
        successor = log.leader()
        assert successor is not None and successor.device != first.device
        assert successor.epoch > first.epoch
        takeover = next(moment for moment, record in log.leaders if record.epoch == successor.epoch)
        answered_after = [result for _, result, _ in outcomes if result.epoch == successor.epoch]
        assert answered_after, "the successor answered none of the jobs"
        print(
            f"\nleader SIGKILL: new leader {successor.device} (epoch {successor.epoch}) "
            f"{takeover - killed_at:.2f} s after the kill; {len(answered_after)} of 20 jobs "
            f"answered by it; {_latencies(outcomes)}"
        )


async def test_a_device_joining_mid_stream_is_used(tmp_path: Path) -> None:
    references = [reference(seed) for seed in range(SEEDS)]
    devices = {"join-a": 0, "join-b": 1}
    async with fault_cluster(tmp_path, devices) as cluster, observed(cluster) as (client, log):
        await wait_for_plan(client, set(devices))
        outcomes: list[tuple[int, JobResult, float]] = []
        stop = asyncio.Event()
        progressed = asyncio.Event()

        async def keep_submitting() -> None:
            number = 0
            while not stop.is_set():
                batch = await _stream(client, IN_FLIGHT, first=number, strategy="equal")
                outcomes.extend(batch)
                number += IN_FLIGHT
                progressed.set()

        async def answered(count: int) -> None:
            while len(outcomes) < count:
                progressed.clear()
                await progressed.wait()

        stream = asyncio.create_task(keep_submitting())
        await answered(6)
        joined_at = time.monotonic()
        before_join = len(outcomes)
        cluster.start("join-c", 2)
        in_plan = await wait_for_plan(client, {"join-a", "join-b", "join-c"})
        planned = len(outcomes)
        await answered(planned + 9)
        stop.set()
        await stream
        _check_answers(outcomes, log, references)
        users = [number for number, result, _ in outcomes if "join-c" in result.devices]
        assert users, "no job used the device that joined"
        assert min(users) >= before_join  # it was not there for the first jobs
        print(
            f"\njoin mid-stream: in the plan {in_plan:.2f} s after it was started; "
            f"{len(outcomes)} jobs, {planned - before_join} while it joined, "
            f"{len(users)} used it; {time.monotonic() - joined_at:.1f} s in all"
        )


async def test_a_frozen_worker_is_worked_around_and_rejoins(tmp_path: Path) -> None:
    references = [reference(seed) for seed in range(SEEDS)]
    devices = {"stall-a": 0, "stall-b": 1, "stall-c": 2}
    async with fault_cluster(tmp_path, devices) as cluster, observed(cluster) as (client, log):
        await wait_for_plan(client, set(devices))
        before = await _stream(client, 6)
        cluster.freeze("stall-c")
        frozen_at = time.monotonic()
        during = await _stream(client, 9, first=6)
        await wait_for_plan(client, {"stall-a", "stall-b"})
        out_of_plan = time.monotonic() - frozen_at
        after_gone = await _stream(client, 3, first=15)
        cluster.thaw("stall-c")
        back = await wait_for_plan(client, set(devices))
        rejoined = await _stream(client, 3, first=18)
        outcomes = before + during + after_gone + rejoined
        _check_answers(outcomes, log, references)
        assert all("stall-c" in result.devices for _, result, _ in rejoined)
        print(
            f"\nSIGSTOP worker: jobs while frozen {_latencies(during)} (before: "
            f"{_latencies(before)}); out of the plan {out_of_plan:.1f} s after the freeze; "
            f"back in the plan {back:.2f} s after SIGCONT"
        )


async def test_a_late_will_of_a_replaced_session_does_not_evict_its_successor(
    tmp_path: Path,
) -> None:
    references = [reference(seed) for seed in range(SEEDS)]
    devices = {"swap-a": 0, "swap-b": 1, "swap-c": 2}
    async with fault_cluster(tmp_path, devices) as cluster, observed(cluster) as (client, log):
        await wait_for_plan(client, set(devices))
        before = await _stream(client, 3)
        cluster.freeze("swap-c")  # hung, its connection still open
        old = cluster.processes["swap-c"]
        cluster.start("swap-c", devices["swap-c"])  # the replacement takes the id over
        # The old process is frozen and cannot leave (nor heartbeat: the replacement
        # finds the id free). The broker drops it at its keepalive and publishes its
        # Will (offline, old session), possibly after the new session's birth.
        after = await _stream(client, 9, first=3)
        outcomes = before + after
        _check_answers(outcomes, log, references)
        assert old.poll() is None  # still frozen: the Will came from the broker
        await wait_for_plan(client, set(devices))
        # The new session computes (a fresh process's first, slow tiles may make it a
        # suspect for a while, so not necessarily in every job).
        assert any("swap-c" in result.devices for _, result, _ in after), [
            result.devices for _, result, _ in after
        ]
        print(f"\nreplaced session: {_latencies(after)}; the new swap-c computes")
