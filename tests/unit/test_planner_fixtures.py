"""Hand-built ModelSpecs and clusters for the planner tests (imported by the others).

Small chains with the features the planner must get right: strides, padding, pools,
residual units with projection shortcuts, compact units with an attention gate (a
reduction), and the tail (global pooling + head).
"""

from __future__ import annotations

import random

from edgedi.models.units import ModelSpec, Op, Unit, UnitKind
from edgedi.planner.cost import NetworkModel
from edgedi.planner.profiles import DeviceProfile, TimeModel


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv(
    name: str, cin: int, cout: int, h: int, w: int, k: int = 3, s: int = 1, p: int | None = None
) -> Op:
    pad = k // 2 if p is None else p
    return Op(
        name,
        "conv",
        cin,
        cout,
        h,
        w,
        out_size(h, k, s, pad),
        out_size(w, k, s, pad),
        kernel=k,
        stride=s,
        padding=pad,
        params=cin * cout * k * k,
    )


def pool(name: str, c: int, h: int, w: int, k: int = 2, s: int = 2) -> Op:
    return Op(
        name, "maxpool", c, c, h, w, out_size(h, k, s, 0), out_size(w, k, s, 0), kernel=k, stride=s
    )


def gate(name: str, c: int, h: int, w: int) -> Op:
    return Op(name, "gate", c, c, h, w, h, w, params=c * c)


class Builder:
    """Appends units to a chain, tracking the running shape."""

    def __init__(self, channels: int = 3, size: int = 24) -> None:
        self.shape = (channels, size, size)
        self.input_shape = self.shape
        self.units: list[Unit] = []

    def _add(
        self,
        name: str,
        kind: UnitKind,
        main: tuple[Op, ...],
        shortcut: tuple[Op, ...] | None = None,
    ) -> Builder:
        last = main[-1]
        out = (last.out_channels, last.out_height, last.out_width)
        self.units.append(
            Unit(
                len(self.units),
                name,
                kind,
                self.shape,
                out,
                main,
                shortcut,
            )
        )
        self.shape = out
        return self

    def conv(self, cout: int, k: int = 3, s: int = 1) -> Builder:
        c, h, w = self.shape
        return self._add(f"conv{len(self.units)}", "conv", (conv("c", c, cout, h, w, k, s),))

    def pool(self) -> Builder:
        c, h, w = self.shape
        return self._add(f"pool{len(self.units)}", "pool", (pool("p", c, h, w),))

    def residual(self, cout: int, s: int = 1) -> Builder:
        c, h, w = self.shape
        a = conv("a", c, cout, h, w, 3, s)
        b = conv("b", cout, cout, a.out_height, a.out_width, 3, 1)
        shortcut: tuple[Op, ...] = ()
        if s != 1 or c != cout:
            shortcut = (conv("sc", c, cout, h, w, 1, s, 0),)
        return self._add(f"res{len(self.units)}", "residual", (a, b), shortcut)

    def compact(self, cout: int, ratio: int = 4, s: int = 1) -> Builder:
        c, h, w = self.shape
        mid = max(1, cout // ratio)
        down = conv("down", c, mid, h, w, 1, 1, 0)
        mid_conv = conv("mid", mid, mid, h, w, 3, s)
        g = gate("gate", mid, mid_conv.out_height, mid_conv.out_width)
        up = conv("up", mid, cout, mid_conv.out_height, mid_conv.out_width, 1, 1, 0)
        return self._add(f"compact{len(self.units)}", "compact", (down, mid_conv, g, up))

    def compact_residual(self, cout: int, ratio: int = 4) -> Builder:
        c, h, w = self.shape
        mid = max(1, cout // ratio)
        down = conv("down", c, mid, h, w, 1, 1, 0)
        mid_conv = conv("mid", mid, mid, h, w, 3, 1)
        g = gate("gate", mid, h, w)
        up = conv("up", mid, cout, h, w, 1, 1, 0)
        shortcut: tuple[Op, ...] = () if c == cout else (conv("sc", c, cout, h, w, 1, 1, 0),)
        return self._add(f"cres{len(self.units)}", "residual", (down, mid_conv, g, up), shortcut)

    def build(self, name: str = "test", classes: int = 6) -> ModelSpec:
        c, h, w = self.shape
        gap = Op("gap", "gap", c, c, h, w, 1, 1)
        head = Op("fc", "linear", c, classes, 1, 1, 1, 1, params=c * classes)
        units = [
            *self.units,
            Unit(len(self.units), "gap", "gap", self.shape, (c, 1, 1), (gap,)),
            Unit(len(self.units) + 1, "head", "head", (c, 1, 1), (classes, 1, 1), (head,)),
        ]
        return ModelSpec(name, self.input_shape, classes, tuple(units))


def small_vgg(size: int = 32) -> ModelSpec:
    return (
        Builder(3, size).conv(8).conv(8).pool().conv(16).conv(16).pool().conv(32).build("small-vgg")
    )


def small_resnet(size: int = 32) -> ModelSpec:
    return (
        Builder(3, size)
        .conv(8, k=7, s=2)
        .pool()
        .residual(8)
        .residual(16, s=2)
        .residual(16)
        .build("small-resnet")
    )


def small_compact(size: int = 32) -> ModelSpec:
    return (
        Builder(3, size)
        .conv(8)
        .compact(16)
        .pool()
        .compact_residual(16)
        .compact(32, s=2)
        .build("small-compact")
    )


def random_spec(rng: random.Random, units: int, size: int = 40) -> ModelSpec:
    """A random chain of `units` spatial units (strides kept so the map stays >= 2)."""
    builder = Builder(rng.choice([1, 3]), size)
    channels = 4
    for _ in range(units):
        height = builder.shape[1]
        choices = ["conv", "conv1", "residual", "compact", "cres"]
        if height >= 6:
            choices += ["pool", "stride"]
        kind = rng.choice(choices)
        channels = rng.choice([4, 8, 12])
        if kind == "conv":
            builder.conv(channels, k=rng.choice([3, 5]))
        elif kind == "conv1":
            builder.conv(channels, k=1)
        elif kind == "pool":
            builder.pool()
        elif kind == "stride":
            builder.conv(channels, k=3, s=2)
        elif kind == "residual":
            builder.residual(channels, s=2 if height >= 6 and rng.random() < 0.3 else 1)
        elif kind == "compact":
            builder.compact(channels)
        else:
            builder.compact_residual(channels)
    return builder.build(f"random{units}")


def profile(
    device: str,
    speed: float = 1.0,
    bandwidth: float = 12e6,
    latency: float = 3e-4,
    fixed: float = 2e-5,
    memory: int = 1 << 30,
) -> DeviceProfile:
    """A device `speed` times faster than the reference (1 ns per MAC of 3x3 conv)."""
    base = 1e-9 / speed
    return DeviceProfile(
        device=device,
        time_models={
            "conv3x3": TimeModel(seconds_per_mac=base, seconds_fixed=fixed),
            "conv1x1": TimeModel(seconds_per_mac=base * 1.4, seconds_fixed=fixed),
            "convkxk": TimeModel(seconds_per_mac=base * 1.2, seconds_fixed=fixed),
            "pool": TimeModel(seconds_per_mac=base * 3, seconds_fixed=fixed / 2),
            "gate": TimeModel(seconds_per_mac=base * 4, seconds_fixed=fixed),
            "fc": TimeModel(seconds_per_mac=base * 2, seconds_fixed=fixed),
        },
        memory_bytes=memory,
        bandwidth=bandwidth,
        latency_s=latency,
        cores=4,
    )


def random_cluster(rng: random.Random, devices: int) -> list[DeviceProfile]:
    return [
        profile(
            f"d{i}",
            speed=rng.uniform(0.3, 3.0),
            bandwidth=rng.choice([2e6, 12e6, 120e6]),
            latency=rng.uniform(0, 2e-3),
            fixed=rng.uniform(0, 1e-4),
        )
        for i in range(devices)
    ]


def random_network(rng: random.Random) -> NetworkModel:
    return NetworkModel(
        broker_per_message_s=rng.uniform(0, 1e-3),
        broker_bandwidth=rng.choice([None, 50e6]),
        shared_medium=rng.random() < 0.3,
        store_and_forward=rng.random() < 0.5,
        message_overhead_bytes=rng.choice([0, 256]),
    )


def test_builders_make_consistent_specs() -> None:
    for spec in (small_vgg(), small_resnet(), small_compact()):
        assert spec.spatial_units and spec.tail_units
    rng = random.Random(1)
    for units in range(1, 13):
        spec = random_spec(rng, units)
        assert len(spec.spatial_units) == units
