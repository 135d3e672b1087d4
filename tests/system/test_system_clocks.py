"""Clocks that disagree and ids that collide, on real agent processes and a real broker.

- Under libfaketime: a worker an hour ahead, a worker an hour behind, and a leader
  whose wall clock steps an hour forward mid-stream (as NTP does when it first syncs
  a Pi). Every job is answered correctly, every device computes in every job (`equal`
  plans), no tile is refused for its deadline, re-sent or copied, and `edgedi status`
  shows each device's clock offset to the leader.
- Two agents with one device id (a cloned SD card): the one running keeps running,
  undisturbed; the newcomer exits with status 78 and says why; no membership flap.

libfaketime fakes only the wall clock here (FAKETIME_DONT_FAKE_MONOTONIC=1): an NTP
step moves CLOCK_REALTIME, never CLOCK_MONOTONIC. libfaketime 0.9.10 then fails
absolute monotonic sleeps (`time.sleep`), which the agent only uses for an emulated
slowdown, so these agents run at full speed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fault_support import (
    MODEL,
    FaultCluster,
    ResultLog,
    fault_cluster,
    observed,
    picture,
    reference,
    wait_for_plan,
)

from edgedi.agent.client import InferenceClient
from edgedi.agent.identity import EXIT_DUPLICATE_ID
from edgedi.broker.messages import JobResult

LIBFAKETIME = next(
    (
        path
        for path in (
            Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"),
            Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1"),
            Path("/usr/lib/faketime/libfaketimeMT.so.1"),
        )
        if path.is_file()
    ),
    None,
)
needs_faketime = pytest.mark.skipif(
    LIBFAKETIME is None,
    reason="libfaketime is not installed (Debian: apt-get install faketime; scripts/test "
    "installs it where it runs as root)",
)

SEEDS = 4
HOUR = 3600.0


# A tile counts as overdue (and is copied) after at least this long. The test
# machines are shared and an agent may stall for a second or two; a clock that
# leaks into a timer shows as an hour, never as 15 s.
# No link measurement either: it keeps every agent's compute thread busy just as the
# cluster forms, which on a loaded machine may stall one past its liveness limit.
PATIENT = {"EDGEDI_JOBS__STRAGGLER_MIN_S": "15", "EDGEDI_BROKER__MEASURE_LINK": "false"}


def _faketime(**variables: str) -> dict[str, str]:
    assert LIBFAKETIME is not None
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        **PATIENT,
        **variables,
    }


async def _jobs(
    client: InferenceClient,
    first: int,
    count: int,
    on_done: dict[int, asyncio.Event] | None = None,
) -> list[tuple[int, JobResult]]:
    """`count` jobs, two at a time, on `equal` plans (every device gets tiles);
    `on_done[k]` is set when k of them are answered."""
    slots = asyncio.Semaphore(2)
    done = 0

    async def one(number: int) -> tuple[int, JobResult]:
        nonlocal done
        async with slots:
            result = await client.infer(
                picture(number % SEEDS), MODEL, strategy="equal", timeout=60.0
            )
            done += 1
            if on_done is not None and done in on_done:
                on_done[done].set()
            return number, result

    return list(await asyncio.gather(*(one(n) for n in range(first, first + count))))


def _status(cluster: FaultCluster) -> dict[str, object]:
    command = [
        sys.executable, "-m", "edgedi.agent.cli", "status",
        "--broker", f"{cluster.broker.host}:{cluster.broker.port}",
        "--topic-root", cluster.root.prefix, "--cluster", cluster.root.cluster,
        "--wait", "2.5", "--json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    document: dict[str, object] = json.loads(done.stdout)
    return document


def _offsets(cluster: FaultCluster) -> dict[str, float | None]:
    devices = _status(cluster)["devices"]
    assert isinstance(devices, list)
    return {device["device"]: device["clock_offset_s"] for device in devices}


async def _wait_for_offsets(
    cluster: FaultCluster, log: ResultLog, clocks: dict[str, float], within_s: float = 60.0
) -> dict[str, float | None]:
    """Until every device reports its offset to the leader's clock within 5 s of what
    `clocks` (each device's fake offset) make it; round trips take a few heartbeats."""
    deadline = time.monotonic() + within_s
    while True:
        offsets = await asyncio.to_thread(_offsets, cluster)
        leader = log.leader()
        wanted = {
            device: clock - clocks[leader.device] if leader is not None else 0.0
            for device, clock in clocks.items()
        }
        if all(
            (offset := offsets.get(device)) is not None and abs(offset - value) < 5.0
            for device, value in wanted.items()
        ):
            return offsets
        if time.monotonic() > deadline:
            raise AssertionError(f"offsets {offsets}, wanted about {wanted}")
        await asyncio.sleep(1.0)


def _fake_clock(path: Path, offset_s: float) -> None:
    """Set a libfaketime timestamp file: the wall clock runs `offset_s` off (it is
    reread within a second)."""
    path.write_text(f"{offset_s:+.0f}\n")


@needs_faketime
async def test_skewed_and_stepping_clocks_change_nothing(tmp_path: Path) -> None:
    references = [reference(seed) for seed in range(SEEDS)]
    devices = {"clk-lead": 0, "clk-ahead": 1, "clk-behind": 2}
    clocks = {"clk-lead": 0.0, "clk-ahead": HOUR, "clk-behind": -HOUR}
    files = {device: tmp_path / f"clock-{device}" for device in devices}
    for device, offset in clocks.items():
        _fake_clock(files[device], offset)
    environments = {
        device: _faketime(FAKETIME_TIMESTAMP_FILE=str(files[device]), FAKETIME_CACHE_DURATION="1")
        for device in devices
    }
    async with (
        fault_cluster(tmp_path, devices, slowdown=1.0, environments=environments) as cluster,
        observed(cluster) as (client, log),
    ):
        await wait_for_plan(client, set(devices))
        before = await _jobs(client, 0, 8)
        offsets = await _wait_for_offsets(cluster, log, clocks)
        # Mid-stream, with tiles in flight: NTP steps the leader's clock an hour forward.
        # (clk-lead leads, unless a stall of the shared test machine made it look gone
        # for a moment: whoever leads now is stepped.)
        halfway = asyncio.Event()
        stream = asyncio.create_task(_jobs(client, 8, 16, on_done={4: halfway}))
        await halfway.wait()
        leader = log.leader()
        assert leader is not None
        clocks[leader.device] += HOUR
        _fake_clock(files[leader.device], clocks[leader.device])
        after = await stream
        stepped = await _wait_for_offsets(cluster, log, clocks)
        await wait_for_plan(client, set(devices))

        jobs = before + after
        for number, result in jobs:
            assert result.status == "ok", f"job {number}: {result.error}"
            np.testing.assert_allclose(result.probabilities, references[number % SEEDS], atol=1e-4)
        # The skewed devices compute: in every job, unless a stall of the test machine
        # took one out of a plan for a moment.
        used = {device: sum(device in result.devices for _, result in jobs) for device in devices}
        assert all(count > len(jobs) // 2 for count in used.values()), used
        logs = "\n".join(cluster.log_path(device).read_text() for device in devices)
        for trouble in (
            "deadline has already passed",  # a worker judging a deadline by its own clock
            "deadline exceeded",
            "copying tile",  # an overdue timer that jumped with the clock
            "direct plane gave up (overdue",
        ):
            assert trouble not in logs, trouble
        print(
            f"\nstepped {leader.device}; clock offsets before the step {offsets}, after "
            f"{stepped}; jobs per device {used} of {len(jobs)}"
        )


async def test_a_second_agent_with_a_taken_id_stops_and_the_first_keeps_running(
    tmp_path: Path,
) -> None:
    references = [reference(seed) for seed in range(SEEDS)]
    devices = {"twin": 0, "twin-peer": 1}
    async with (
        fault_cluster(
            tmp_path, devices, slowdown=1.0, environments=dict.fromkeys(devices, PATIENT)
        ) as cluster,
        observed(cluster) as (
            client,
            log,
        ),
    ):
        await wait_for_plan(client, set(devices))
        first = cluster.processes["twin"]
        leader_before = log.leader()
        plan_before = await client.current_plan(timeout=2.0)
        # A board cloned from twin's card: same id, its own state directory.
        second = cluster.start("twin", 0, state="twin-clone")
        returncode = await asyncio.to_thread(second.wait, 120)
        jobs = await _jobs(client, 0, 4)

        logs = cluster.logs()
        assert returncode == EXIT_DUPLICATE_ID, logs
        assert "device id twin is already in use" in cluster.log_path("twin").read_text()
        assert first.poll() is None, "the running agent must keep running"
        for number, result in jobs:
            assert result.status == "ok", f"job {number}: {result.error}"
            np.testing.assert_allclose(result.probabilities, references[number % SEEDS], atol=1e-4)
        # No fight: the running agent never lost its connection, the leader and the
        # plan stayed, nobody saw a device leave.
        assert "failed or lost" not in logs, logs
        leader_after = log.leader()
        assert leader_before is not None and leader_after is not None
        assert (leader_after.device, leader_after.epoch) == (
            leader_before.device,
            leader_before.epoch,
        )
        plan_after = await client.current_plan(timeout=2.0)
        assert plan_before is not None and plan_after is not None
        assert plan_after.plan.plan_id == plan_before.plan.plan_id
        assert "membership: joined -, left" not in logs
        # It stopped before taking a session number, let alone announcing one.
        assert not (cluster.folder / "state-twin-clone" / "session").exists()
