"""A real cluster for the system tests: a private broker and three `edgedi agent` processes.

The broker is Mosquitto when the binary exists, else the embedded amqtt. Agents are
started as `python -m edgedi.agent.cli agent ...` with one torch thread and a short
start-up benchmark; the fixture waits until the leader's plan (naming all three) is
retained on `plans/current`. Teardown always runs: SIGTERM (graceful drain), then
SIGKILL for anything still alive, then the broker; the agents' logs are printed
when something went wrong, so a failure says why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from system_support import (
    AGENTS,
    INPUT_SIZE,
    MODELS,
    START_TIMEOUT_S,
    SystemCluster,
    retained_plan,
)

from edgedi.broker.server import start_broker
from edgedi.broker.topics import TopicRoot


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="package")
def system_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemCluster]:
    folder = tmp_path_factory.mktemp("cluster")
    broker = start_broker(prefer="auto")
    root = TopicRoot(prefix=f"edgedi-system/{uuid.uuid4().hex[:10]}", cluster="system")
    cluster = SystemCluster(broker, root, {device: folder / f"{device}.log" for device in AGENTS})
    environment = {key: value for key, value in os.environ.items() if not key.startswith("EDGEDI_")}
    environment.pop("NOTIFY_SOCKET", None)
    environment.pop("STATE_DIRECTORY", None)
    healthy = False
    try:
        for priority, device in enumerate(AGENTS):
            command = cluster.cli(
                "agent",
                "--broker", cluster.address,
                "--id", device,
                *cluster.root_arguments(),
                "--threads", "1",
                "--profile-seconds", "0.3",
                "--models", *MODELS,
                "--input-size", str(INPUT_SIZE),
                "--priority", str(priority),
                "--state-dir", str(folder / f"state-{device}"),
                "--log-level", "info",
            )  # fmt: skip
            with cluster.logs[device].open("wb") as log:
                cluster.processes[device] = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=environment
                )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not all(cluster.alive().values()):
                raise RuntimeError(f"an agent exited during start-up: {cluster.alive()}")
            announcement = retained_plan(broker, root, timeout=1.0)
            plan = announcement.get("plan") if announcement else None
            if isinstance(plan, dict) and sorted(plan.get("devices", ())) == sorted(AGENTS):
                break
        else:
            raise RuntimeError(f"no plan naming {AGENTS} within {START_TIMEOUT_S} s")
        yield cluster
        healthy = True
    finally:
        for process in cluster.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in cluster.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
                healthy = False
            if process.returncode not in (0, -signal.SIGTERM):
                healthy = False
        broker.stop()
        if not healthy:
            print_logs(cluster)


def print_logs(cluster: SystemCluster) -> None:
    for device in AGENTS:
        if cluster.logs[device].exists():
            tail = cluster.log(device)[-6000:]
            sys.stderr.write(f"\n===== log of {device} =====\n{tail}\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.when == "call" and report.failed:
        cluster = getattr(item, "funcargs", {}).get("system_cluster")
        if isinstance(cluster, SystemCluster):
            for device in AGENTS:
                if cluster.logs[device].exists():
                    report.sections.append((f"log of {device}", cluster.log(device)[-6000:]))
    return report
