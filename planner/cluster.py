"""Cluster descriptions: devices, their profiles and the network, from YAML or generated.

A cluster file names reusable `device_types` (cores, memory, a time model per cost
class, a link), then the `devices` (an id, a type, optional overrides: a slowdown
factor, a different link or memory), the `network` (`edgedi.planner.cost.NetworkModel`)
and optionally the `leader` (default: the first device). Every section is a frozen
pydantic model with `extra="forbid"`; errors come back as `field.path: message` lines
in a `ClusterConfigError`.

This module parses text and builds objects; reading files is the caller's business
(`edgedi plan` reads them, `shipped_cluster_path` says where the examples live).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgedi.models.units import CostClass
from edgedi.planner.cost import NetworkModel
from edgedi.planner.errors import ClusterConfigError
from edgedi.planner.profiles import DeviceProfile, TimeModel

CLUSTERS_DIR = Path(__file__).resolve().parent / "clusters"


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LinkConfig(_Config):
    bandwidth_bytes_per_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        description="usable throughput of the device's link to the broker"
    )
    latency_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        default=0.0, description="one-way latency device <-> broker (s)"
    )


class DeviceTypeConfig(_Config):
    description: str = Field(default="", description="what this profile stands for, and why")
    cores: int = Field(default=4, ge=1, description="cores used for inference")
    memory_mb: int = Field(gt=0, description="memory available to the agent (MB)")
    time_models: dict[CostClass, TimeModel] = Field(description="per cost class: a, b")
    default: TimeModel | None = Field(default=None, description="model for other classes")
    link: LinkConfig


class DeviceConfig(_Config):
    id: str = Field(min_length=1, max_length=200, description="unique device id")
    type: str = Field(description="a key of `device_types`")
    slowdown: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        default=1.0, description="multiplies every compute time (load, thermal throttling)"
    )
    link: LinkConfig | None = Field(default=None, description="overrides the type's link")
    memory_mb: int | None = Field(default=None, gt=0, description="overrides the type's memory")


class ClusterConfig(_Config):
    name: str = Field(min_length=1)
    description: str = ""
    network: NetworkModel = NetworkModel()
    leader: str | None = Field(default=None, description="coordinator; default the first device")
    device_types: dict[str, DeviceTypeConfig]
    devices: list[DeviceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> ClusterConfig:
        ids = [d.id for d in self.devices]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"device ids used twice: {', '.join(duplicates)}")
        for device in self.devices:
            if device.type not in self.device_types:
                known = ", ".join(sorted(self.device_types))
                raise ValueError(f"device {device.id}: unknown type {device.type!r} ({known})")
        if self.leader is not None and self.leader not in ids:
            raise ValueError(f"leader {self.leader!r} is not one of the devices")
        return self


@dataclass(frozen=True)
class Cluster:
    """What the planner needs: device profiles, the network and the leader."""

    name: str
    devices: tuple[DeviceProfile, ...]
    network: NetworkModel
    leader: str
    description: str = ""


def device_profile(device: DeviceConfig, kind: DeviceTypeConfig) -> DeviceProfile:
    link = device.link or kind.link
    profile = DeviceProfile(
        device=device.id,
        time_models=dict(kind.time_models),
        default=kind.default,
        memory_bytes=(device.memory_mb or kind.memory_mb) * 1_000_000,
        bandwidth=link.bandwidth_bytes_per_s,
        latency_s=link.latency_s,
        cores=kind.cores,
    )
    return profile if device.slowdown == 1.0 else profile.scaled(device.slowdown)


def build_cluster(config: ClusterConfig) -> Cluster:
    devices = tuple(device_profile(d, config.device_types[d.type]) for d in config.devices)
    return Cluster(
        name=config.name,
        devices=devices,
        network=config.network,
        leader=config.leader or config.devices[0].id,
        description=config.description,
    )


def _problems(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{where}: {item['msg']}")
    return lines


def parse_cluster(text: str, source: str = "<cluster>") -> Cluster:
    """A cluster from YAML text; raises ClusterConfigError with readable lines."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ClusterConfigError(source, [f"(yaml): {error}"]) from None
    if not isinstance(data, dict):
        raise ClusterConfigError(source, ["(top level): expected a mapping"])
    try:
        config = ClusterConfig.model_validate(data)
    except ValidationError as error:
        raise ClusterConfigError(source, _problems(error)) from None
    return build_cluster(config)


def shipped_cluster_names() -> tuple[str, ...]:
    return ("pi-mixed", "pi4x4", "pi5-wifi")


def shipped_cluster_path(name: str) -> Path:
    """Where the example cluster `name` lives (`planner/clusters/<name>.yaml`)."""
    return CLUSTERS_DIR / f"{name}.yaml"


# --- Raspberry Pi profiles --------------------------------------------------------
#
# Per-class *ratios* were measured with `edgedi.models.profiling.run_profile` on the
# x86 build VM (1 thread, seconds per MAC relative to a 3x3 conv; fixed costs per op
# call): conv1x1 0.9, conv3x3 1, conv7x7 0.85, depthwise 6, pool 200 (a max-pool
# "MAC" is one comparison, memory-bound), gate 8, fc 6 (batch-1 linear layers are
# memory-bound). That profile (conv3x3 1.35e-11 s/MAC) predicts ResNet-18 at
# 224×224 in 28.7 ms; each Pi profile is it scaled so that ResNet-18 at 224×224
# takes the published time (FIELD-NOTES: 272 / 123 / 20 ms on Pi 3B+ / 4 / 5, ncnn,
# 4 threads): ×9.48, ×4.29, ×0.697. The shipped YAML files carry the same numbers.

_X86_RATIOS: dict[CostClass, tuple[float, float]] = {
    # cost class: (seconds per MAC relative to conv3x3, fixed seconds per op call)
    "conv1x1": (0.9, 5e-6),
    "conv3x3": (1.0, 20e-6),
    "convkxk": (0.85, 50e-6),
    "depthwise": (6.0, 30e-6),
    "pool": (200.0, 60e-6),
    "gate": (8.0, 5e-6),
    "fc": (6.0, 5e-6),
}
_X86_CONV3X3 = 1.35e-11
PI_SCALE = {"pi3bplus": 272 / 28.7, "pi4": 123 / 28.7, "pi5": 20 / 28.7}
ETHERNET_100M = LinkConfig(bandwidth_bytes_per_s=11.75e6, latency_s=0.0002)  # 94 Mbit/s TCP
ETHERNET_1G = LinkConfig(bandwidth_bytes_per_s=117.5e6, latency_s=0.0001)  # 940 Mbit/s TCP
# AOFL's WiFi model: 77.5 ms + 87.5 µs/KB per device-to-device transfer.
WIFI = LinkConfig(bandwidth_bytes_per_s=1024 / 87.5e-6, latency_s=0.03860)


def pi_time_models(scale: float) -> dict[CostClass, TimeModel]:
    return {
        cost_class: TimeModel(
            seconds_per_mac=float(f"{_X86_CONV3X3 * ratio * scale:.4g}"),
            seconds_fixed=float(f"{fixed * scale:.4g}"),
        )
        for cost_class, (ratio, fixed) in _X86_RATIOS.items()
    }


def pi_device_types() -> dict[str, DeviceTypeConfig]:
    return {
        "pi3bplus": DeviceTypeConfig(
            description="Raspberry Pi 3B+, 1 GB (about 750 MB free), 100 Mbit/s Ethernet",
            cores=4,
            memory_mb=750,
            time_models=pi_time_models(PI_SCALE["pi3bplus"]),
            link=ETHERNET_100M,
        ),
        "pi4": DeviceTypeConfig(
            description="Raspberry Pi 4B, 4 GB (3500 MB free), Gigabit Ethernet",
            cores=4,
            memory_mb=3500,
            time_models=pi_time_models(PI_SCALE["pi4"]),
            link=ETHERNET_1G,
        ),
        "pi5": DeviceTypeConfig(
            description="Raspberry Pi 5, 8 GB (7500 MB free), Gigabit Ethernet",
            cores=4,
            memory_mb=7500,
            time_models=pi_time_models(PI_SCALE["pi5"]),
            link=ETHERNET_1G,
        ),
    }


def synthetic_cluster(devices: int, seed: int = 0) -> Cluster:
    """A large made-up fleet: a Pi 5 leader, then a seeded mix of Pi 3B+/4/5.

    Half Pi 4, a quarter each Pi 3B+ (on 100 Mbit/s) and Pi 5; each device's compute
    is slowed by 0-30 % (load, throttling). The broker host has a 10 Gbit/s link.
    """
    if devices < 1:
        raise ClusterConfigError("synthetic", [f"devices: must be at least 1, got {devices}"])
    rng = random.Random(seed)
    configs = [DeviceConfig(id="d000", type="pi5")]
    for number in range(1, devices):
        kind = rng.choices(["pi3bplus", "pi4", "pi5"], weights=[1, 2, 1])[0]
        configs.append(
            DeviceConfig(
                id=f"d{number:03d}", type=kind, slowdown=round(1.0 + 0.3 * rng.random(), 3)
            )
        )
    config = ClusterConfig(
        name=f"synthetic-{devices}",
        description=f"{devices} generated Raspberry Pi class devices (seed {seed})",
        network=NetworkModel(broker_per_message_s=0.0003, broker_bandwidth=1.25e9),
        device_types=pi_device_types(),
        devices=configs,
    )
    return build_cluster(config)
