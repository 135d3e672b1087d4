"""Devices join, straggle and die while jobs run; every job still gets its one answer.

In-process agents on a real broker: a device that joins is used by the next plan;
a device that is much slower than it announced has its tiles copied to others
(first result wins) and is given less work once the leader has measured it; a
leader that crashes with jobs in flight leaves them to its successor's journal;
a job re-submitted after a failover is answered from the cache, not recomputed.
"""

from __future__ import annotations

import asyncio

import numpy as np
from runtime_support import reference_probabilities, running_cluster, sample_image

from edgedi.agent.client import connect
from edgedi.agent.planning import REPLAN_DRIFT, Planning
from edgedi.broker.plan import Plan
from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import TopicRoot

MODEL = "tiny-edgedi"


def _rows(plan: Plan, device: str) -> int:
    return sum(
        part.rows[1] - part.rows[0]
        for segment in plan.segments
        for part in segment.parts
        if part.device == device
    )


def _learnt(planning: Planning) -> bool:
    """Has the leader measured agent-3 as clearly slower than the others?"""
    others = max(planning.speed_factor("agent-1"), planning.speed_factor("agent-2"))
    return planning.speed_factor("agent-3") > REPLAN_DRIFT * others


async def test_a_joining_device_is_used_and_a_slow_one_is_copied_then_given_less(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    jobs = {"straggler_min_s": 0.05, "straggler_factor": 1.0, "deadline_s": 20.0}
    # Profiles of a plausible speed for this machine (tiles of a few milliseconds).
    speed = 0.01
    async with running_cluster(broker, topic_root, speeds=(speed, speed), jobs=jobs) as cluster:
        await cluster.wait_for_plan(devices=2)
        leader = cluster.leader()
        async with connect(broker.host, broker.port, root=topic_root) as client:
            image = sample_image(11)
            reference = reference_probabilities(MODEL, image)
            first = await client.infer(image, MODEL, strategy="proportional", timeout=20)
            assert first.status == "ok", first.error
            assert "agent-3" not in first.devices

            # It announces the profile of a fast device but computes 100× slower.
            cluster.start("agent-3", speed, jobs=jobs, compute={"slowdown": 100.0})
            await cluster.wait_for_plan(devices=3)
            assert cluster.leader() is leader  # a joining device does not disturb the leader
            planning = leader.planning
            initial = await planning.plan_for(MODEL, "proportional")
            assert "agent-3" in initial.devices

            # Re-plans from measurements come at most every REPLAN_MIN_INTERVAL_S.
            results = []
            # A bound in time: the straggler is copied and then suspect (no tiles) for
            # up to 10 s, so each of the few jobs it is measured in takes a while.
            learning_until = asyncio.get_running_loop().time() + 60
            while asyncio.get_running_loop().time() < learning_until:
                result = await client.infer(image, MODEL, strategy="proportional", timeout=20)
                results.append(result)
                assert result.status == "ok", result.error
                np.testing.assert_allclose(result.probabilities, reference, atol=1e-5)
                current = await planning.plan_for(MODEL, "proportional")
                if _learnt(planning) and _rows(current, "agent-3") < _rows(initial, "agent-3"):
                    break
        assert "agent-3" in results[0].devices  # used from the plan after it joined
        coordinator = leader.coordinator
        assert coordinator is not None
        # Its trial tile (relayed: a newcomer gets no direct run) was copied to others.
        assert coordinator.statistics.speculative >= 1
        assert _learnt(planning)
        relearnt = await planning.plan_for(MODEL, "proportional")
        assert _rows(relearnt, "agent-3") < _rows(initial, "agent-3")


async def test_jobs_of_a_crashed_leader_are_finished_by_its_successor(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    # A slow cluster, so the jobs are still running when the leader dies.
    async with running_cluster(
        broker, topic_root, speeds=(1.0, 1.0, 1.0), compute={"slowdown": 20.0}
    ) as cluster:
        await cluster.wait_for_plan()
        first = cluster.leader()
        first_epoch = first.election.epoch
        images = [sample_image(seed) for seed in range(4)]
        async with connect(broker.host, broker.port, root=topic_root) as client:
            # The client never re-submits (retry_s > timeout): only the journal can
            # bring these jobs to the next leader.
            jobs = [
                asyncio.create_task(
                    client.infer(image, MODEL, strategy="equal", timeout=40, retry_s=100)
                )
                for image in images
            ]
            coordinator = first.coordinator
            assert coordinator is not None
            async with asyncio.timeout(10):  # every job has reached the leader
                while coordinator.in_flight < len(jobs):  # noqa: ASYNC110 - another agent's state
                    await asyncio.sleep(0.02)
            assert coordinator.statistics.completed == 0  # all still running
            # A crash: no Will, no result, no goodbye; found silent after ~3 s.
            task = cluster.tasks[cluster.agents.index(first)]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            results = await asyncio.gather(*jobs)
        second = cluster.leader()
        assert second is not first and second.election.epoch > first_epoch
        for image, result in zip(images, results, strict=True):
            assert result.status == "ok", result.error
            assert result.epoch == second.election.epoch
            np.testing.assert_allclose(
                result.probabilities, reference_probabilities(MODEL, image), atol=1e-5
            )
        assert second.coordinator is not None
        assert second.coordinator.statistics.submitted == len(images)
        assert len(second.journal) == 0


async def test_a_job_resubmitted_after_a_failover_is_answered_from_the_cache(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root, speeds=(1.0, 1.0)) as cluster:
        await cluster.wait_for_plan()
        first = cluster.leader()
        async with connect(broker.host, broker.port, root=topic_root) as client:
            image = sample_image(3)
            job_id = client.new_job_id()
            before = await client.infer(image, MODEL, job_id=job_id, timeout=20)
            assert before.status == "ok", before.error
            await cluster.stop(first)  # graceful: state `stopped`, the other takes over
            await cluster.wait_for_plan(devices=1)
            second = cluster.leader()
            again = await client.infer(image, MODEL, job_id=job_id, timeout=20, retry_s=2)
        # The same answer, computed once, by the first leader; said again by the leader
        # in force, which vouches for it (a client may never have seen the first).
        same = {"sender", "epoch", "message_id", "sent_at"}
        assert again.model_dump(exclude=same) == before.model_dump(exclude=same)
        assert before.sender == first.device_id
        assert (again.sender, again.epoch) == (second.device_id, second.election.epoch)
        assert second.coordinator is not None
        assert second.coordinator.statistics.duplicates >= 1
        assert second.coordinator.statistics.submitted == 0


async def test_an_overloaded_cluster_is_not_flooded_with_copies(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    # Every device far slower than announced and many jobs at once: every tile is
    # late, and copies could only add load. At most one tile per device has a copy out.
    jobs = {"straggler_min_s": 0.05, "straggler_factor": 1.0, "deadline_s": 60.0}
    async with running_cluster(
        broker, topic_root, speeds=(1.0, 1.0, 1.0), jobs=jobs, compute={"slowdown": 30.0}
    ) as cluster:
        await cluster.wait_for_plan()
        leader = cluster.leader()
        images = [sample_image(seed) for seed in range(8)]
        async with connect(broker.host, broker.port, root=topic_root) as client:
            results = await asyncio.gather(
                *(client.infer(image, MODEL, strategy="equal", timeout=60) for image in images)
            )
        for image, result in zip(images, results, strict=True):
            assert result.status == "ok", result.error
            np.testing.assert_allclose(
                result.probabilities, reference_probabilities(MODEL, image), atol=1e-5
            )
        coordinator = leader.coordinator
        assert coordinator is not None
        assert coordinator.statistics.speculation_held > 0
