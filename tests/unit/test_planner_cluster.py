"""Cluster descriptions (YAML, shipped examples, synthetic fleets) and `edgedi plan`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from edgedi.agent.cli import main
from edgedi.planner.cluster import (
    PI_SCALE,
    parse_cluster,
    pi_time_models,
    shipped_cluster_names,
    shipped_cluster_path,
    synthetic_cluster,
)
from edgedi.planner.errors import ClusterConfigError


@pytest.mark.parametrize("name", shipped_cluster_names())
def test_shipped_clusters_parse_and_match_the_code(name: str) -> None:
    text = shipped_cluster_path(name).read_text()
    cluster = parse_cluster(text, name)
    assert cluster.name == name and len(cluster.devices) >= 4
    raw = yaml.safe_load(text)
    for type_name, kind in raw["device_types"].items():
        expected = pi_time_models(PI_SCALE[type_name])
        for cost_class, model in kind["time_models"].items():
            assert float(model["seconds_per_mac"]) == expected[cost_class].seconds_per_mac
            assert float(model["seconds_fixed"]) == expected[cost_class].seconds_fixed


def test_pi_profiles_reproduce_the_resnet18_anchor() -> None:
    from edgedi.models.specs import get_spec
    from edgedi.planner.cost import op_seconds
    from edgedi.planner.profiles import DeviceProfile

    spec = get_spec("resnet18", 224)
    for kind, published in (("pi3bplus", 0.272), ("pi4", 0.123), ("pi5", 0.020)):
        device = DeviceProfile(
            device=kind, time_models=pi_time_models(PI_SCALE[kind]), memory_bytes=1, bandwidth=1.0
        )
        seconds = sum(op_seconds(device, op, op.out_height) for u in spec.units for op in u.ops)
        assert seconds == pytest.approx(published, rel=0.03)


def test_errors_name_the_field() -> None:
    text = shipped_cluster_path("pi-mixed").read_text()
    data = yaml.safe_load(text)
    data["devices"][1]["speed"] = 3
    data["device_types"]["pi4"]["link"]["bandwidth_bytes_per_s"] = -1
    with pytest.raises(ClusterConfigError) as caught:
        parse_cluster(yaml.safe_dump(data), "broken.yaml")
    problems = "\n".join(caught.value.problems)
    assert "devices.1.speed: Extra inputs are not permitted" in problems
    assert "device_types.pi4.link.bandwidth_bytes_per_s:" in problems
    data = yaml.safe_load(text)
    data["devices"][0]["type"] = "pi9"
    with pytest.raises(ClusterConfigError, match="unknown type 'pi9'"):
        parse_cluster(yaml.safe_dump(data))
    with pytest.raises(ClusterConfigError, match="yaml"):
        parse_cluster("devices: [", "x")
    with pytest.raises(ClusterConfigError, match="mapping"):
        parse_cluster("- 1")


def test_synthetic_clusters() -> None:
    small, big = synthetic_cluster(8), synthetic_cluster(512)
    assert len(big.devices) == 512 and big.leader == "d000"
    assert big.devices[:8] == small.devices  # the same seed grows the same fleet
    assert synthetic_cluster(8, seed=1).devices != small.devices
    with pytest.raises(ClusterConfigError):
        synthetic_cluster(0)


def test_cli_table_json_and_gantt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--cluster", "pi4x4", "--model", "tiny", "--size", "64"]) == 0
    table = capsys.readouterr().out
    assert "edgeci" in table and "speedup" in table
    out = tmp_path / "timeline.png"
    code = main(
        [
            "plan",
            "--cluster",
            "synthetic:6",
            "--model",
            "resnet18",
            "--size",
            "64",
            "--strategy",
            "edgeci",
            "--strategy",
            "single",
            "--json",
            "--gantt",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == ["edgeci", "single"]
    assert rows[0]["latency_s"] <= rows[1]["latency_s"]
    with Image.open(out) as image:
        assert image.size[0] == 1200 and image.size[1] > 100


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndevices: []\ndevice_types: {}\n")
    assert main(["plan", "--cluster", str(bad), "--validate"]) == 2
    assert "devices:" in capsys.readouterr().err
    assert main(["plan", "--cluster", "pi4x4", "--validate"]) == 0
    assert main(["plan", "--cluster", "pi4x4", "--model", "nope"]) == 2
    assert main(["plan", "--cluster", "pi4x4", "--model", "tiny", "--strategy", "magic"]) == 2
    assert main(["plan", "--cluster", "synthetic:x", "--model", "tiny"]) == 2
    assert main(["plan", "--cluster", str(tmp_path / "missing.yaml"), "--model", "tiny"]) == 2
    capsys.readouterr()
