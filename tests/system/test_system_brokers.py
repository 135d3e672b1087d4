"""Real agent processes on NATS (MQTT interface) and RabbitMQ (MQTT plugin).

The same scenario as the fault tests run on Mosquitto (test_system_faults.py), cut to
one test per broker: three `edgedi agent` processes elect a leader and publish a plan
(retained leader, plan, births and states; Wills), answer a stream of jobs, a worker is
SIGKILLed mid-job and restarted, then the leader is SIGKILLed mid-job: every job is
answered exactly once, equal to single-process inference, and the successor took over.
Each broker is skipped, with the reason, where it is not installed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fault_support import fault_cluster, observed, reference, wait_for_plan
from test_system_faults import SEEDS, _check_answers, _latencies, _stream

from edgedi.broker.server import BrokerKind


async def test_jobs_survive_a_killed_worker_and_a_killed_leader(
    fleet_broker_kind: BrokerKind, tmp_path: Path
) -> None:
    references = [reference(seed) for seed in range(SEEDS)]
    devices = {"fleet-a": 0, "fleet-b": 1, "fleet-c": 2}
    async with (
        fault_cluster(tmp_path, devices, broker_kind=fleet_broker_kind) as cluster,
        observed(cluster) as (client, log),
    ):
        await wait_for_plan(client, set(devices))
        first = log.leader()
        # Priority 0 usually leads, but an agent whose start-up is slower (a loaded
        # machine) may join after another already claimed it: kill whoever leads.
        assert first is not None and first.device in devices
        worker = next(device for device in reversed(devices) if device != first.device)
        moments = {4: asyncio.Event(), 10: asyncio.Event()}
        stream = asyncio.create_task(_stream(client, 16, on_done=moments))
        await moments[4].wait()
        cluster.kill(worker)  # with tiles of jobs in flight
        await asyncio.sleep(0.5)
        cluster.start(worker, devices[worker])
        await moments[10].wait()
        cluster.kill(first.device)  # the leader, holding jobs
        outcomes = await stream
        # The stream's last jobs may all be answered in the moment the kill takes (a
        # loaded machine): a few more, after it, must be the successor's.
        outcomes += await _stream(client, 3, first=16)
        _check_answers(outcomes, log, references)
        successor = log.leader()
        assert successor is not None and successor.device != first.device
        assert successor.epoch > first.epoch
        answered_after = [result for _, result, _ in outcomes if result.epoch == successor.epoch]
        assert answered_after, "the successor answered none of the jobs"
        print(f"\n{fleet_broker_kind}: 16 jobs, a worker then the leader killed: "
              f"{_latencies(outcomes)}")  # fmt: skip
