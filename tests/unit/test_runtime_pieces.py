"""The runtime's pure pieces: tile layouts from plans, profiles from births, image checks,
the images-mode round robin, and `edgedi agent --check-config`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgedi.agent.connection import broker_address
from edgedi.agent.layout import LayoutError, plan_segment_layout, segment_layout
from edgedi.agent.planning import profile_from_birth
from edgedi.agent.result_checks import JobFailed, check_image
from edgedi.agent.segments import pooled_outputs, stitch_outputs
from edgedi.broker.messages import DeviceBirth, DeviceCapabilities, LinkEstimate
from edgedi.broker.plan import Part, Segment
from edgedi.broker.tensors import Tensor
from edgedi.models.specs import get_spec
from edgedi.models.units import segment_tiles

SPEC = get_spec("tiny-edgedi", 48)


def _segment(parts: list[Part], first: int = 0, last: int = 0) -> Segment:
    unit = SPEC.units[last]
    return Segment(
        first_unit=first,
        last_unit=last,
        out_height=unit.out_shape[1],
        out_width=unit.out_shape[2],
        sink="a",
        parts=tuple(parts),
    )


def test_a_row_plan_segment_becomes_strips_in_row_order() -> None:
    segment = _segment(
        [
            Part(device="b", rows=(20, 48)),
            Part(device="a", rows=(0, 20)),
            Part(device="c", rows=(48, 48)),
        ]
    )
    layout, assignments = plan_segment_layout(SPEC, segment)
    assert layout.row_parts[0].start == 0 and layout.column_parts is None
    assert [a.device for a in assignments] == ["a", "b"]  # the empty part is dropped
    expected = segment_tiles(SPEC.units[0:1], list(layout.row_parts))
    assert [layout.tile(i)[0] for i in range(2)] == expected
    assert layout.input_shape(1) == (1, 1, len(expected[1].in_rows), 48)


def test_a_grid_plan_segment_numbers_tiles_row_major() -> None:
    parts = [
        Part(device=device, rows=rows, cols=cols)
        for device, rows, cols in [
            ("a", (0, 24), (0, 24)),
            ("b", (0, 24), (24, 48)),
            ("c", (24, 48), (0, 24)),
            ("a", (24, 48), (24, 48)),
        ]
    ]
    layout, assignments = plan_segment_layout(SPEC, _segment(parts))
    assert layout.count == 4
    assert [a.device for a in assignments] == ["a", "b", "c", "a"]
    rows, columns = layout.tile(1)
    assert (rows.out_rows.start, columns.out_rows.start) == (0, 24)


def test_parts_that_are_not_a_grid_are_refused() -> None:
    parts = [
        Part(device="a", rows=(0, 24), cols=(0, 24)),
        Part(device="b", rows=(0, 24), cols=(24, 48)),
        Part(device="c", rows=(24, 48), cols=(0, 48)),
    ]
    with pytest.raises(LayoutError):
        plan_segment_layout(SPEC, _segment(parts))


def test_segment_layouts_check_their_units() -> None:
    with pytest.raises(LayoutError):
        segment_layout(SPEC, 2, 9, [(0, 4)])
    with pytest.raises(LayoutError):
        segment_layout(SPEC, 0, 0, [(0, 10)])  # does not cover the 48 rows


def test_stitching_and_pooling_restore_the_whole_map() -> None:
    layout = segment_layout(SPEC, 0, 0, [(0, 10), (10, 48)], [(0, 30), (30, 48)])
    whole = np.random.default_rng(0).normal(size=(1, 8, 48, 48)).astype(np.float32)
    tiles = {}
    for index in range(layout.count):
        rows, columns = layout.tile(index)
        tiles[index] = whole[
            :,
            :,
            rows.out_rows.start : rows.out_rows.stop,
            columns.out_rows.start : columns.out_rows.stop,
        ]
    np.testing.assert_array_equal(stitch_outputs(layout, tiles), whole)
    np.testing.assert_allclose(
        pooled_outputs(tiles, (8, 48, 48)), whole.mean(axis=(2, 3), dtype=np.float64), rtol=1e-12
    )


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((48, 48), np.uint8), None),
        (np.zeros((1, 48, 48), np.float32), None),
        (np.zeros((1, 1, 48, 48), np.float64), None),
        (np.zeros((3, 48, 48), np.uint8), "shape"),
        (np.zeros((1, 40, 48), np.uint8), "shape"),
        (np.zeros((48, 48), np.int64), "dtype"),
        (np.full((48, 48), np.inf, np.float32), "NaN or infinite"),
    ],
)
def test_images_are_checked_before_any_work(array: np.ndarray, problem: str | None) -> None:
    if problem is None:
        checked = check_image(Tensor(array), 48)
        assert checked.shape == (1, 48, 48) and checked.flags.writeable
    else:
        with pytest.raises(JobFailed, match=problem):
            check_image(Tensor(array), 48)


def test_a_birth_becomes_a_planner_profile() -> None:
    birth = DeviceBirth(
        sender="pi-1",
        device="pi-1",  # type: ignore[arg-type]
        session=1,
        candidate=True,
        capabilities=DeviceCapabilities(
            cores=4, memory_bytes=2**30, machine="Linux-aarch64", software_version="0.1"
        ),
        profile={"conv3x3": (1e-9, 1e-4), "unknown-class": (1.0, 1.0)},
        link=LinkEstimate(bandwidth_bytes_per_second=1e7, latency_seconds=0.002),
    )
    profile = profile_from_birth(birth)
    assert set(profile.time_models) == {"conv3x3"}
    assert profile.bandwidth == 1e7 and profile.latency_s == 0.002 and profile.cores == 4
    bare = profile_from_birth(birth.model_copy(update={"profile": {}, "link": None}))
    assert bare.default is not None  # an unmeasured device still gets planned, slowly


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", ("host", None)),
        ("10.0.0.2:1884", ("10.0.0.2", 1884)),
        ("[::1]:1883", ("::1", 1883)),
    ],
)
def test_broker_addresses(text: str, expected: tuple[str, int | None]) -> None:
    assert broker_address(text) == expected


def _check_config(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgedi.agent.cli", "agent", "--check-config", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: pi-1\nbroker:\n  host: 10.0.0.2\ncompute:\n  models: [tiny]\n")
    completed = _check_config("--config", str(config))
    assert completed.returncode == 0, completed.stderr
    assert "OK" in completed.stdout


def test_check_config_prints_field_paths_and_fails(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        "device_id: pi-1\nbroker:\n  port: 0\ncompute:\n  models: [nope]\nplanner:\n  strategy: x\n"
    )
    completed = _check_config("--config", str(config))
    assert completed.returncode == 1
    assert "broker.port:" in completed.stderr
    completed = _check_config("--id", "pi-1", "--models", "nope", "--strategy", "x")
    assert completed.returncode == 1
    assert "compute.models.0: unknown model 'nope'" in completed.stderr
    assert "planner.strategy: unknown strategy 'x'" in completed.stderr
    assert _check_config().returncode == 1  # no device id anywhere


def test_link_flags_reach_the_settings_and_are_checked() -> None:
    completed = _check_config("--id", "pi-1", "--link-mbit", "-5")
    assert completed.returncode == 1
    assert "broker.link_mbit_s:" in completed.stderr
    from edgedi.agent.commands.agent import _overrides, add_arguments
    from edgedi.agent.config import AgentSettings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--id", "pi-1", "--link-mbit", "54", "--link-latency-ms", "3"])
    overrides = _overrides(args)
    settings = AgentSettings(
        device_id="pi-1", broker={k: v for k, v in overrides["broker"].items() if v is not None}
    )
    assert settings.broker.link_mbit_s == 54.0 and settings.broker.link_latency_ms == 3.0


def test_channel_layouts_read_the_whole_map_and_refuse_bad_parts() -> None:
    spec = get_spec("resnet18", 64)
    last = len(spec.spatial_units) - 1
    first = last - 1  # the last two residual units (same width)
    height = spec.units[last].out_shape[1]
    width = spec.units[first].main[0].out_channels
    layout = segment_layout(
        spec, first, last, [(0, 1), (1, height)], channel_parts=[(0, 100), (100, width)]
    )
    assert layout.sums and layout.count == 2
    rows, _ = layout.tile(1)
    assert (rows.in_rows.start, rows.in_rows.stop) == (0, spec.units[first].in_shape[1])
    assert (rows.out_rows.start, rows.out_rows.stop) == (1, height)
    assert layout.gate_positions(0, 0) == 100 and layout.partial_total(0) == width
    assert layout.partial_shape(1) == (1, *spec.units[last].out_shape)
    for channels, problem in (
        ([(0, 100)], "one each"),
        ([(0, 100), (101, width)], "continue"),
        ([(0, 100), (100, width + 1)], "partition ends"),
    ):
        with pytest.raises(LayoutError, match=problem):
            segment_layout(spec, first, last, [(0, 1), (1, height)], channel_parts=channels)
    with pytest.raises(LayoutError, match="cannot be split by channels"):
        segment_layout(spec, 0, 0, [(0, 1), (1, 2)], channel_parts=[(0, 1), (1, 2)])
