"""Emulated links without building any: the fallback, the lines people read, the names.

Building real networks is in tests/system/test_link_emulation.py (root only).
"""

from __future__ import annotations

import os

import pytest

from edgedi.agent import link_emulation
from edgedi.agent.link_emulation import EmulatedNetwork, LinkEmulationError, Links, detect
from edgedi.agent.local_cluster import LocalCluster


def test_without_root_shaped_links_fall_back_to_loopback_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert detect() == "not running as root, so no network namespaces"
    links = LocalCluster(2, model="tiny-edgedi", input_size=64, link="1gbit")._start_network()
    assert links.rate_mbit is None and links.name == "loopback"
    line = links.describe()
    assert "\n" not in line
    assert "asked for 1gbit links, but not running as root" in line


def test_without_ip_and_tc_the_reason_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(link_emulation, "_tool", lambda name: None)
    assert detect() == "ip and tc not installed (package iproute2)"


def test_the_links_line_gives_the_rate_the_measurement_and_what_is_missing() -> None:
    line = Links("100mbit", 100, 95.84, netem=False).describe()
    assert line == (
        "tbf 100 Mbit/s each way on every device's link (broker and client too), "
        "measured 95.8 Mbit/s agent→broker; no added latency or loss "
        "(netem is unavailable on this kernel)"
    )
    assert Links("1gbit", 1000, 958.0, netem=True).describe().endswith("(netem is not used)")
    assert Links("loopback").describe() == "loopback (no shaping)"
    assert "loopback" in Links("loopback").caveat
    assert "100 Mbit/s" in Links("100mbit", 100).caveat


def test_tbf_bursts_one_millisecond_of_the_rate() -> None:
    assert link_emulation._tbf(100)[:5] == ["tbf", "rate", "100mbit", "burst", "12500"]
    assert link_emulation._tbf(1000)[4] == "125000"


def test_a_network_names_its_namespaces_after_the_launcher_and_builds_nothing_yet() -> None:
    network = EmulatedNetwork(100, ["broker", "dev-1"])
    assert network.namespace("dev-1").startswith(f"edgedi-{os.getpid()}-")
    assert network.namespace("dev-1").endswith("-dev-1")
    assert len(network.host_link) <= 15  # the kernel's limit for an interface name
    with pytest.raises(LinkEmulationError, match="not created"):
        network.address("broker")
    with pytest.raises(LinkEmulationError, match="no node"):
        network.namespace("dev-2")
    with pytest.raises(ValueError, match="distinct"):
        EmulatedNetwork(100, ["dev-1", "dev-1"])
    with pytest.raises(ValueError, match="host"):
        EmulatedNetwork(100, ["host"])
