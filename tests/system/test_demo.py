"""The user's first command, small: `edgedi demo`, and `edgedi status` / `edgedi watch`
against a local cluster of agent processes (edgedi.agent.local_cluster).

Small settings throughout (the tiny model at 64 px, a few images): what is checked is
that the pieces work together and report what they should, not the speedup itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgedi.agent.client import connect
from edgedi.agent.local_cluster import CpuQuotas, LocalCluster
from edgedi.broker.server import start_broker
from edgedi.models.data import generate_image

pytestmark = [pytest.mark.system, pytest.mark.slow]

SIZE = 64
MODEL = "tiny-edgedi"


def edgedi(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "edgedi.agent.cli", *arguments]


def test_demo_streams_images_and_reports_the_speedup() -> None:
    completed = subprocess.run(
        edgedi("demo", "--devices", "3", "--images", "4", "--model", MODEL, "--size", str(SIZE)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = completed.stdout
    assert completed.returncode == 0, output + completed.stderr
    assert "weights: RANDOM" in output  # no trained tiny-edgedi is shipped
    assert "plan in force:" in output
    for number in range(1, 5):
        assert f"[{number}/4]" in output
    assert "summary: 8/8 jobs ok" in output
    assert "measured speedup over one device:" in output
    assert "ideal speedup for these speeds:" in output
    assert ": identical" in output  # distributed == one plain forward pass
    assert "why not the ideal, from this job and one traced job of single" in output
    assert "\x1b[" not in output  # no bar drawing when the output is not a terminal


def test_demo_with_paced_devices_is_exact_and_leaves_no_quota_group() -> None:
    quotas, why = CpuQuotas.detect()
    if quotas is None or quotas.version != 1:
        pytest.skip(f"paced devices keep their loops under quotas with cgroup v1: {why}")
    before = set(quotas.parent.glob("*-dev-*"))
    small = ("--devices", "2", "--images", "2", "--model", MODEL, "--size", str(SIZE))
    completed = subprocess.run(
        edgedi("demo", *small, "--emulation", "paced", "--json"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = completed.stderr  # --json: the person's lines go to stderr
    assert completed.returncode == 0, output + completed.stdout
    assert "compute paced to 0.4/0.4 of a core" in output
    assert "(paced)" in output and ": identical" in output
    figures = json.loads(completed.stdout)
    assert figures["emulation"] == "paced"
    factors = figures["factors"]  # the traced jobs' speedup taken apart
    product = factors["ideal"] * factors["work_ratio"] * factors["distributed_busy"]
    assert product / factors["single_busy"] == pytest.approx(factors["speedup"])
    sync = figures["sync"]  # None when the plan ran as one segment
    assert sync is None or len(sync["boundaries_ms"]) + len(sync["exchanges_ms"]) > 0
    assert set(quotas.parent.glob("*-dev-*")) <= before  # every group it made is gone


def test_demo_runs_on_an_existing_broker_with_the_shared_connection_options() -> None:
    broker = start_broker(prefer="auto")
    try:
        completed = subprocess.run(
            edgedi(
                "demo", "--broker", f"{broker.host}:{broker.port}",
                "--devices", "2", "--images", "2", "--model", MODEL, "--size", str(SIZE),
                "--no-baseline",
            ),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )  # fmt: skip
    finally:
        broker.stop()
    output = completed.stdout
    assert completed.returncode == 0, output + completed.stderr
    assert f"broker: existing broker on {broker.host}:{broker.port}" in output, output
    # A cluster of its own on a shared broker: never a fleet's `default`.
    assert f"edgedi watch --broker {broker.host}:{broker.port} --cluster demo-" in output
    assert "summary: 2/2 jobs ok" in output, output


def test_demo_refuses_bad_arguments() -> None:
    completed = subprocess.run(
        edgedi("demo", "--model", "no-such-model"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert "unknown model" in completed.stderr


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(2, model=MODEL, input_size=SIZE) as local:
        local.wait_ready_sync(timeout=120)
        yield local


def test_status_shows_devices_leader_and_plan(cluster: LocalCluster) -> None:
    completed = subprocess.run(
        edgedi("status", "--broker", cluster.broker_address),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    text = completed.stdout
    assert "dev-1   online" in text and "dev-2   online" in text
    assert "leader: dev-1 (epoch " in text
    assert "plan in force:" in text and "tail (pool + classifier) on dev-1" in text

    completed = subprocess.run(
        edgedi("status", "--broker", cluster.broker_address, "--json", "--wait", "0.5"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    document = json.loads(completed.stdout)
    assert [device["status"] for device in document["devices"]] == ["online", "online"]
    assert document["leader"]["device"] == "dev-1"
    assert document["plan"]["model"] == MODEL
    assert set(document["plan"]["devices"]) == {"dev-1", "dev-2"}


def test_status_of_an_empty_cluster_exits_non_zero(cluster: LocalCluster) -> None:
    completed = subprocess.run(
        edgedi(
            "status", "--broker", cluster.broker_address, "--cluster", "nobody", "--wait", "0.3"
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 1
    assert "devices (0):" in completed.stdout and "leader: none recorded" in completed.stdout


async def _one_job(cluster: LocalCluster) -> str:
    async with connect(cluster.host, cluster.port, root=cluster.root) as client:
        result = await client.infer(generate_image(2, 0, SIZE), MODEL, timeout=30)
    assert result.status == "ok", result.error
    return result.job_id


def _wait_for(path: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not printed within {timeout} s:\n{path.read_text()}")


# Last in the module: it stops one of the shared cluster's agents.
def test_watch_prints_membership_results_and_departures(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    log = tmp_path / "watch.txt"
    with log.open("w") as output:
        watcher = subprocess.Popen(
            edgedi("watch", "--broker", cluster.broker_address, "--duration", "60"),
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        text = _wait_for(log, "plan    ", 30)
        for device in ("dev-1", "dev-2"):
            assert f"birth   {device}: session" in text
            assert f"state   {device}: online" in text
        assert "leader  dev-1 (epoch" in text
        job_id = asyncio.run(_one_job(cluster))
        _wait_for(log, f"result  {job_id}: ", 30)
        second = next(agent for agent in cluster.agents if agent.device_id == "dev-2")
        second.process.send_signal(signal.SIGTERM)
        second.process.wait(timeout=30)
        _wait_for(log, "state   dev-2: stopped", 30)
    finally:
        watcher.send_signal(signal.SIGINT)
        try:
            code = watcher.wait(timeout=20)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait(timeout=10)  # reaped here, not blamed on a later test
            raise
    assert code == 0, log.read_text()
