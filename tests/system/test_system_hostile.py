"""The attacker's tests: hostile messages from a client the project does not ship.

Real `edgedi agent` processes on a private broker (see `fault_support`); the
attacker is a plain paho client (`hostile_support`). What is checked is what an
attack would break: a departure declared, a job failed, an agent down.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import numpy as np
from fault_support import FaultCluster, fault_cluster, observed, picture, wait_for_plan
from hostile_support import Attacker, bloated, flood, png_claiming
from PIL import Image
from system_support import SystemCluster

from edgedi.agent.client import InferenceClient
from edgedi.broker.messages import JobResult
from edgedi.broker.topics import (
    CONTROL_REBIRTH,
    DEVICE_BIRTH,
    DEVICE_HEARTBEAT,
    DEVICE_STATE,
    JOB_GATES,
    JOB_RESULT,
    JOB_SUBMIT,
    PLAN_CURRENT,
    PLANNER_LEADER,
)

MODEL = "tiny-edgedi"
# Topics every candidate reads (jobs/submit is one a client may write).
READ_BY_EVERY_CANDIDATE = (
    JOB_SUBMIT,
    DEVICE_BIRTH,
    DEVICE_STATE,
    DEVICE_HEARTBEAT,
    PLANNER_LEADER,
    PLAN_CURRENT,
    JOB_GATES,
    JOB_RESULT,
    CONTROL_REBIRTH,
)
_DEPARTURE = re.compile(r"membership: joined .*, left (?!-$)(.+)$", re.MULTILINE)


def departures(cluster: FaultCluster) -> list[str]:
    """Every 'left ...' the agents logged."""
    found = []
    for device in cluster.processes:
        text = cluster.log_path(device).read_text(errors="replace")
        found += [f"{device}: left {match}" for match in _DEPARTURE.findall(text)]
    return found


async def _jobs(client: InferenceClient, count: int, in_flight: int = 4) -> list[JobResult]:
    slots = asyncio.Semaphore(in_flight)

    async def one(number: int) -> JobResult:
        async with slots:
            return await client.infer(picture(number), MODEL, strategy="equal", timeout=60)

    return list(await asyncio.gather(*(one(number) for number in range(count))))


async def test_slow_to_reject_messages_on_every_read_topic_fail_no_job(tmp_path: Path) -> None:
    devices = {"bloat-a": 0, "bloat-b": 1, "bloat-c": 2}
    async with (
        fault_cluster(tmp_path, devices, slowdown=5.0) as cluster,
        observed(cluster) as (
            client,
            _log,
        ),
    ):
        await wait_for_plan(client, set(devices))
        before = departures(cluster)
        attacker = Attacker(cluster.broker, cluster.root)
        try:
            targets = [
                (attacker.topic(spec, "bloat-a"), bloated(spec)) for spec in READ_BY_EVERY_CANDIDATE
            ]
            jobs = asyncio.create_task(_jobs(client, 40))
            sent = await asyncio.to_thread(flood, attacker, targets, 10, 0.2)
            results = await jobs
        finally:
            attacker.close()
        failed = [result.error for result in results if result.status != "ok"]
        assert not failed, failed
        assert departures(cluster) == before, departures(cluster)
        assert all(process.poll() is None for process in cluster.processes.values())
        print(f"\n{sent} bloated messages (~3 MB each) on {len(targets)} topics: 40/40 jobs ok")


def test_edgedi_infer_answers_a_batch_past_its_bad_files(
    system_cluster: SystemCluster, tmp_path: Path
) -> None:
    size = 64
    good = picture(2)
    Image.fromarray(good).save(tmp_path / "good.png")
    # The same picture at 16 bits per sample: the same answer, not a white image.
    Image.fromarray(good.astype(np.uint16) * 257).save(tmp_path / "wide.png")
    png_claiming(tmp_path / "bomb.png", 15000, 15000)
    Image.new("L", (3, 3), 128).save(tmp_path / "tiny.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    names = ["bomb.png", "good.png", "tiny.png", "junk.png", "wide.png"]
    arguments = ["--broker", system_cluster.address, *system_cluster.root_arguments()]
    arguments += ["--model", "tiny-edgedi", "--size", str(size), "--json", "--timeout", "30"]
    completed = subprocess.run(
        system_cluster.cli("infer", *arguments, *(str(tmp_path / name) for name in names)),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert completed.returncode == 1, completed.stderr + completed.stdout
    assert "Traceback" not in completed.stderr, completed.stderr
    errors = completed.stderr.strip().splitlines()
    assert len(errors) == 3, errors
    assert any("bomb.png" in line and "pixels" in line for line in errors), errors
    assert any("tiny.png" in line and "minimum input" in line for line in errors), errors
    assert any("junk.png" in line and "not a readable image" in line for line in errors), errors
    results = [JobResult.model_validate_json(line) for line in completed.stdout.splitlines()]
    assert [result.status for result in results] == ["ok", "ok"], results
    np.testing.assert_allclose(results[0].probabilities, results[1].probabilities, atol=1e-6)
