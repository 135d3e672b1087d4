"""The demo's pure pieces: the progress bar, the cluster view, speeds and plan lines."""

from __future__ import annotations

import io
import os

import pytest

from edgedi.agent.cluster_view import ClusterView, describe_plan, plan_headline
from edgedi.agent.commands.demo import settle
from edgedi.agent.local_cluster import ClusterError, Emulation, LocalCluster, default_speeds
from edgedi.agent.progress import ProgressBar, render_bar
from edgedi.broker.messages import (
    DeviceBirth,
    DeviceCapabilities,
    DeviceState,
    JobResult,
    LeaderRecord,
    PlanAnnouncement,
)
from edgedi.broker.plan import Part, Plan, Segment

# --- progress bar ---------------------------------------------------------------------


def test_render_bar_fills_in_proportion_and_fits_the_width() -> None:
    line = render_bar(5, 10, 40, suffix="images")
    assert len(line) <= 40
    assert " 5/10  50%" in line
    inside = line[line.index("[") + 1 : line.index("]")]
    assert inside.count("#") == len(inside) // 2
    assert render_bar(10, 10, 30).count(".") == 0
    assert len(render_bar(3, 7, 12, suffix="a long suffix")) <= 12


def test_progress_without_a_terminal_prints_plain_lines_only() -> None:
    stream = io.StringIO()
    with ProgressBar(3, stream=stream) as bar:
        for number in range(3):
            bar.write(f"line {number}")
            bar.advance()
    assert stream.getvalue() == "line 0\nline 1\nline 2\n"


def test_progress_on_a_terminal_redraws_the_bar_below_each_line() -> None:
    stream = io.StringIO()
    bar = ProgressBar(2, stream=stream, live=True)
    bar.write("first")
    bar.advance()
    bar.advance()
    bar.close()
    text = stream.getvalue()
    assert "first\n" in text
    assert "2/2 100%" in text
    assert text.endswith("\r\x1b[2K")  # the bar is gone, the lines stay


# --- speeds ---------------------------------------------------------------------------


def test_default_speeds_follow_the_pattern_within_the_core_budget() -> None:
    assert default_speeds(4, cores=2) == (0.4, 0.4, 0.25, 0.25)
    assert default_speeds(1, cores=2) == (0.4,)
    many = default_speeds(8, cores=2)
    assert len(many) == 8
    assert list(many) == sorted(many, reverse=True)
    assert all(speed >= 0.2 for speed in many)  # quotas under 1 ms per period are refused
    with pytest.raises(ValueError):
        default_speeds(0)


def test_ideal_speedup_is_the_summed_speed_over_the_fastest() -> None:
    quotas = Emulation("cgroup-v1", (0.4, 0.4, 0.25, 0.25), cores=2)
    assert quotas.ideal_speedup == pytest.approx(1.3 / 0.4)
    measured = Emulation("cgroup-v1", (0.4, 0.4), cores=2, measured=(0.4, 0.2))
    assert measured.ideal_speedup == pytest.approx(1.5)
    # With --slowdown every busy agent needs a whole core: two cores cap it at 2.
    slowed = Emulation("slowdown", (1.0, 1.0, 0.625, 0.625), cores=2)
    assert slowed.ideal_speedup == pytest.approx(2.0)
    assert slowed.slowdowns == pytest.approx((1.0, 1.0, 1.6, 1.6))
    assert "cgroup v1" in quotas.describe() and "--slowdown" in slowed.describe()


def test_without_root_the_launcher_falls_back_to_slowdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cluster = LocalCluster(4, model="tiny-edgedi", input_size=64)
    emulation = cluster._choose_emulation()
    assert emulation.method == "slowdown"
    assert "not running as root" in emulation.note
    assert emulation.slowdowns == pytest.approx((1.0, 1.0, 1.6, 1.6))
    assert not cluster.log_dir.exists()  # constructing starts nothing
    with pytest.raises(ClusterError, match="CPU quotas are not available"):
        LocalCluster(2, model="tiny-edgedi", emulation="quota")._choose_emulation()


# --- cluster view ---------------------------------------------------------------------


def _birth(device: str, session: int) -> DeviceBirth:
    return DeviceBirth(
        sender=device,
        device=device,
        session=session,
        candidate=True,
        capabilities=DeviceCapabilities(
            cores=1, memory_bytes=1 << 30, machine="Linux-x86_64", software_version="0"
        ),
    )


def _state(device: str, session: int, status: str) -> DeviceState:
    return DeviceState(sender=device, device=device, session=session, status=status)  # type: ignore[arg-type]


def _plan(devices: tuple[str, ...], plan_id: str = "p" * 32, epoch: int = 1) -> Plan:
    return Plan(
        plan_id=plan_id,
        epoch=epoch,
        strategy="equal",
        model="tiny-edgedi",
        model_digest="digest",
        input_shape=(1, 64, 64),
        created_at=0.0,
        leader=devices[0],
        devices=devices,
        mode="rows",
        segments=(
            Segment(
                first_unit=0,
                last_unit=3,
                out_height=16,
                out_width=16,
                reductions=1,
                sink=devices[0],
                parts=(
                    Part(device=devices[0], rows=(0, 8)),
                    Part(device=devices[-1], rows=(8, 16)),
                ),
            ),
        ),
        tail_device=devices[0],
        predicted_latency_s=0.0025,
    )


def test_view_reports_changes_once_and_ignores_late_wills() -> None:
    view = ClusterView()
    assert view.apply(_birth("a", 5), now=0.0)[0].startswith("birth   a: session 5")
    assert view.apply(_birth("a", 5), now=0.1) == []  # a re-announcement says nothing new
    assert view.apply(_state("a", 5, "online"), now=0.2) == ["state   a: online (session 5)"]
    assert view.apply(_state("a", 5, "online"), now=0.3) == []
    late = view.apply(_state("a", 4, "offline"), now=0.4)
    assert "ignored a late offline" in late[0]
    assert view.online() == ["a"]
    assert view.apply(_state("a", 5, "stopped"), now=0.5) == ["state   a: stopped (session 5)"]
    assert view.online() == []


def test_view_knows_when_a_cluster_is_ready() -> None:
    view = ClusterView()
    for device, session in (("a", 1), ("b", 2)):
        view.apply(_birth(device, session))
        view.apply(_state(device, session, "online"))
    assert "no leader elected yet" in view.missing_for(["a", "b"])
    lines = view.apply(LeaderRecord(sender="a", device="a", epoch=1, session=1))
    assert lines == ["leader  a (epoch 1)"]
    assert "no plan published yet" in view.missing_for(["a", "b"])
    view.apply(PlanAnnouncement(sender="a", epoch=1, plan=_plan(("a",))))
    assert any("the plan was made for a" in line for line in view.missing_for(["a", "b"]))
    view.apply(PlanAnnouncement(sender="a", epoch=1, plan=_plan(("a", "b"), "q" * 32)))
    assert view.missing_for(["a", "b"]) == []
    assert view.missing_for(["a", "b", "c"])[0] == "not online yet: c"
    document = view.to_json()
    assert [device["device"] for device in document["devices"]] == ["a", "b"]
    assert document["leader"]["device"] == "a"
    assert document["plan"]["plan_id"] == "q" * 32


def test_plan_lines_name_each_devices_rows() -> None:
    plan = _plan(("a", "b"))
    lines = describe_plan(plan)
    assert "strategy equal" in lines[0]
    assert "a rows 0-8; b rows 8-16" in lines[1]
    assert "1 gate round(s)" in lines[1]
    assert "predicted latency 2.5 ms" in lines[-1]
    assert "1 segment(s) over a, b" in plan_headline(plan)


def _result(plan_id: str) -> JobResult:
    return JobResult(sender="dev-1", job_id="warm", status="ok", plan_id=plan_id)


async def test_warm_up_runs_until_the_leader_keeps_one_plan() -> None:
    # Exploration: candidates a and b side by side; c kept, judged on its first five
    # jobs and re-planned (another round: d and c); then d kept for good.
    plans = ["a", "b"] * 5 + ["c"] * 5 + ["d", "c"] * 5 + ["d"] * 20
    calls = iter(plans)

    async def run() -> JobResult | None:
        return _result(next(calls))

    results = await settle(run, minimum=16)
    # Past the minimum, until 11 jobs in a row (2 * MEASURED_JOBS + 1) ran plan d.
    assert [r.plan_id for r in results if r is not None] == plans[:36]


async def test_warm_up_gives_up_at_its_cap_and_counts_failures_as_unsettled() -> None:
    async def unsettled() -> JobResult | None:
        return None

    assert len(await settle(unsettled, minimum=3)) == 12
    assert len(await settle(unsettled, minimum=3, cap=5)) == 5
