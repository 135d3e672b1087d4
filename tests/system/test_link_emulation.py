"""Emulated links (edgedi.agent.link_emulation) built, used and removed for real.

Needs root, `ip`/`tc` and a kernel with network namespaces, veth, bridge and tbf:
skipped with the reason otherwise. What is checked above all is that nothing is left
behind — no namespace, link, qdisc or cgroup of the run — when it ends normally,
when its launcher is killed (the next start removes the leftovers) and when a demo
is interrupted with SIGINT mid-run.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgedi.agent import link_emulation
from edgedi.agent.client import connect
from edgedi.agent.link_emulation import EmulatedNetwork, detect, remove_stale
from edgedi.agent.local_cluster import LocalCluster
from edgedi.models.data import generate_image

pytestmark = [pytest.mark.system]

MODEL = "tiny-edgedi"
SIZE = 64
# 100 Mbit/s configured measures ~96 on an idle machine (TCP and Ethernet headers);
# above it the shaping is missing (an unshaped veth carries 12-17 Gbit/s). The lower
# bound only says the link carries data: a 0.3 s transfer on a loaded 2-core machine
# (a CI run) has measured 70 Mbit/s, and a test asserts no speed.
MEASURED_RANGE_MBIT = (10.0, 100.5)


@pytest.fixture(scope="module", autouse=True)
def _links_supported() -> None:
    why = detect()
    if why:
        pytest.skip(f"emulated links unavailable: {why}")


def _ip(*arguments: str) -> str:
    return subprocess.run(
        [link_emulation._tool(arguments[0]) or arguments[0], *arguments[1:]],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout


def leftovers(pid: int) -> list[str]:
    """Everything the launcher with this pid created that still exists."""
    found = [
        f"namespace {line.split()[0]}"
        for line in _ip("ip", "netns", "list").splitlines()
        if line.startswith(f"edgedi-{pid}-")
    ]
    ours = [
        line
        for line in _ip("ip", "-o", "link", "show").splitlines()
        if re.search(rf"alias edgedi launcher {pid}\b", line)
    ]
    found += [f"link {line}" for line in ours]
    names = {line.split(": ")[1].split("@")[0] for line in ours}
    found += [
        f"qdisc {line}"
        for line in _ip("tc", "qdisc", "show").splitlines()
        if any(f"dev {name} " in line for name in names)
    ]
    for parent in (Path("/sys/fs/cgroup/cpu/edgedi-local"), Path("/sys/fs/cgroup/edgedi-local")):
        if parent.is_dir():
            found += [f"cgroup {group}" for group in parent.glob(f"{pid}-*")]
    return found


def test_a_network_is_shaped_both_ways_and_removed_completely() -> None:
    network = EmulatedNetwork(100, ["left", "right"])
    with network:
        for node in ("left", "right"):
            namespace = network.namespace(node)
            assert "tbf" in _ip("tc", "-n", namespace, "qdisc", "show", "dev", "eth0")
        hub_side = _ip("tc", "-n", network.hub, "qdisc", "show")
        assert hub_side.count("tbf") == 3  # both nodes' downloads and the launcher's
        assert "rate 100Mbit" in hub_side
        assert "tbf" in _ip("tc", "qdisc", "show", "dev", network.host_link)
        measured = network.measure_mbit("left", "right", seconds=0.3)
        assert MEASURED_RANGE_MBIT[0] <= measured <= MEASURED_RANGE_MBIT[1], measured
        assert leftovers(os.getpid())
    assert leftovers(os.getpid()) == []
    network.remove()  # idempotent


def test_the_leftovers_of_a_killed_launcher_are_removed_at_the_next_start() -> None:
    script = (
        "import sys, time\n"
        "from edgedi.agent.link_emulation import EmulatedNetwork\n"
        "EmulatedNetwork(100, ['a', 'b']).create()\n"
        "print('built', flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as launcher:
        try:
            assert launcher.stdout is not None
            assert launcher.stdout.readline().strip() == "built"
        finally:
            launcher.kill()  # no clean-up runs: what it built stays
    assert any(item.startswith("namespace") for item in leftovers(launcher.pid))
    assert any(item.startswith("link") for item in leftovers(launcher.pid))
    removed = remove_stale()  # what EmulatedNetwork.create() does first
    assert removed
    assert leftovers(launcher.pid) == []


@pytest.mark.slow
def test_a_cluster_on_100mbit_links_runs_a_job_and_leaves_nothing_behind() -> None:
    cluster = LocalCluster(
        2, model=MODEL, input_size=SIZE, link="100mbit", calibrate=False, profile_seconds=0.3
    )
    with cluster:
        links = cluster.links
        assert links is not None and links.rate_mbit == 100, links
        assert links.measured_mbit is not None
        assert MEASURED_RANGE_MBIT[0] <= links.measured_mbit <= MEASURED_RANGE_MBIT[1]
        assert "no added latency or loss" in links.describe()
        assert cluster.host.startswith("10.213.")
        for agent in cluster.agents:
            # The agents measure the shaped link themselves: nothing is announced for them.
            assert "--link-mbit" not in agent.command
            # nsenter, not `ip netns exec`, whose own sysfs hides /sys/fs/cgroup.
            assert agent.command[0] == link_emulation._tool("nsenter")
            if agent.cgroup is not None:  # the device's quota groups hold the agent itself
                loop_group = agent.cgroup.with_name(agent.cgroup.name + "-loop")
                group = loop_group if loop_group.exists() else agent.cgroup
                procs = (group / "cgroup.procs").read_text().split()
                assert str(agent.process.pid) in procs
        cluster.wait_ready_sync(timeout=120)

        async def one_job() -> None:
            async with connect(cluster.host, cluster.port, root=cluster.root) as client:
                result = await client.infer(generate_image(2, 0, SIZE), MODEL, timeout=30)
            assert result.status == "ok", result.error

        asyncio.run(one_job())
        for agent in cluster.agents:
            tasks = agent.cgroup / "tasks" if agent.cgroup is not None else None
            if tasks is not None and tasks.exists():  # cgroup v1: one thread moves
                # Its compute thread sits in the device's quota group, apart from its loop.
                threads = set(tasks.read_text().split())
                own = {p.name for p in Path(f"/proc/{agent.process.pid}/task").iterdir()}
                assert threads & own, (agent.device_id, threads, own)
        assert leftovers(os.getpid())
    assert leftovers(os.getpid()) == []


@pytest.mark.slow
def test_a_demo_interrupted_mid_run_leaves_nothing_behind() -> None:
    command = [
        sys.executable, "-m", "edgedi.agent.cli", "demo",
        "--link", "100mbit", "--devices", "2", "--images", "50", "--no-baseline",
        "--model", MODEL, "--size", str(SIZE),
    ]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as demo:
        output = _interrupt_after_the_first_result(demo)
    text = "".join(output)
    assert demo.returncode == 130, text
    link_lines = [line for line in output if line.startswith("links: ")]
    assert len(link_lines) == 1 and "tbf 100 Mbit/s" in link_lines[0], text
    assert "no added latency or loss" in link_lines[0]
    assert leftovers(demo.pid) == [], text


def _interrupt_after_the_first_result(demo: subprocess.Popen[str]) -> list[str]:
    """SIGINT once the demo printed its first result (checking it has built its links);
    everything it printed."""
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_forward, args=(demo, lines), name="demo-output")
    reader.start()
    output = []
    try:
        deadline = time.monotonic() + 120
        while not re.match(r"\[\s*1/50\]", output[-1] if output else ""):  # the first result
            output.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        assert leftovers(demo.pid), "".join(output)
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=10)
        reader.join(timeout=10)
    return output + list(lines.queue)


def _forward(process: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
