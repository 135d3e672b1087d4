"""The cost model: compute time of a tile, bytes it moves, and messages through the broker.

These are the scalar, readable definitions. `edgedi.planner.blocks` and
`edgedi.planner.timing` evaluate the same model vectorised for the search, and the
simulator replays it message by message; the tests hold all three to agree.

Compute. A tile's time on a device is the sum over its ops of the device's time model
for the op's cost class: `seconds_per_mac · MACs + seconds_fixed` per op invocation.
MACs come from the tile geometry, so the halo's redundant rows are paid for.
A tile is cut into *phases* by the attention gates (reductions) it contains: after a
gate's pooling the device waits for the combined gate vector before going on.

Messages. All traffic is star-shaped through the broker: device → broker → device,
two hops. A message of B bytes from s to r costs each hop's link latency plus the
broker's per-message cost, and its bytes move at the slower of the two links
(`B / min(bw_s, bw_r)`, the hops pipelined). With `store_and_forward` the broker
receives the whole message before forwarding it: the bytes cross each link in turn
(`B / bw_s + B / bw_r`). Links are full duplex and each direction serves one message
at a time, first come first served; in the star only the coordinator's link is ever
contended. With `shared_medium` (e.g. one WiFi cell) every transfer holds the one
medium for its whole transmission (both hops), so nothing overlaps on the air.
Reductions are a round of small messages: partial sums worker → coordinator, the
combined gate vector coordinator → workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgedi.models.units import Op, TileGeometry
from edgedi.planner.profiles import DeviceProfile

PARTIAL_BYTES_PER_CHANNEL = 8  # float64 partial sums keep the reduction exact
GATE_BYTES_PER_CHANNEL = 4  # the combined fp32 gate vector


class NetworkModel(BaseModel):
    """The broker and the medium between devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker_per_message_s: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = Field(
        default=0.0002, description="broker's own cost per forwarded message (s)"
    )
    broker_bandwidth: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None, description="the broker host's link (bytes/s); null: never the bottleneck"
    )
    shared_medium: bool = Field(
        default=False, description="all transfers share one medium (WiFi cell): no overlap"
    )
    store_and_forward: bool = Field(
        default=False, description="the broker receives a whole message before forwarding it"
    )
    message_overhead_bytes: int = Field(
        default=256, ge=0, description="envelope bytes per message (MQTT header, ids, dtype, shape)"
    )
    gate_round_s: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = Field(
        default=0.0,
        description="extra wait of a gate's all-gather round beyond its slowest message's "
        "hop: the spread of several hops at once (fitted from measured jobs)",
    )


Side = Literal["sender", "receiver"]


@dataclass(frozen=True)
class MessageTiming:
    """A message as a FIFO resource sees it.

    The message reaches the contended resource `pre` seconds after it is ready, holds
    it for `hold` seconds, and arrives `post` seconds after releasing it.
    """

    pre: float
    hold: float
    post: float

    @property
    def total(self) -> float:
        return self.pre + self.hold + self.post


def message_parts(
    size: Any,
    sender_bw: Any,
    sender_latency: Any,
    receiver_bw: Any,
    receiver_latency: Any,
    network: NetworkModel,
    contended: Side,
) -> tuple[Any, Any, Any]:
    """(pre, hold, post) of messages of `size` bytes (envelope included); scalars or arrays.

    The single definition of the link model: the scalar functions here, the vectorised
    evaluator and the simulator all call it.
    """
    broker_bw = network.broker_bandwidth or math.inf
    per_message = network.broker_per_message_s
    zero = size * 0.0
    if not network.store_and_forward:
        hold = size / np.minimum(np.minimum(sender_bw, receiver_bw), broker_bw)
        return zero, hold, zero + sender_latency + receiver_latency + per_message
    first = size / np.minimum(sender_bw, broker_bw)
    second = size / np.minimum(receiver_bw, broker_bw)
    if network.shared_medium:
        return zero, first + second, zero + sender_latency + receiver_latency + per_message
    if contended == "sender":
        return zero, first, sender_latency + per_message + second + receiver_latency
    return first + sender_latency + per_message, second, zero + receiver_latency


def message_timing(
    nbytes: float,
    sender: tuple[float, float],
    receiver: tuple[float, float],
    network: NetworkModel,
    contended: Side,
) -> MessageTiming:
    """Timing of one message; `sender`/`receiver` are (bandwidth, latency) of their links.

    `contended` names the end whose link is shared with other messages (in the star:
    the coordinator's). With a shared medium the medium is the contended resource.
    """
    size = float(nbytes + network.message_overhead_bytes)
    pre, hold, post = message_parts(
        size, sender[0], sender[1], receiver[0], receiver[1], network, contended
    )
    return MessageTiming(float(pre), float(hold), float(post))


def transfer_seconds(
    nbytes: float, sender: DeviceProfile, receiver: DeviceProfile, network: NetworkModel
) -> float:
    """Seconds for one uncontended message from `sender` to `receiver` (0 if the same)."""
    if sender.device == receiver.device:
        return 0.0
    timing = message_timing(
        nbytes,
        (sender.bandwidth, sender.latency_s),
        (receiver.bandwidth, receiver.latency_s),
        network,
        "sender",
    )
    return timing.total


def reduction_round_seconds(
    worker: DeviceProfile, coordinator: DeviceProfile, channels: int, network: NetworkModel
) -> float:
    """One uncontended reduction round trip: partial sums up, the gate vector back."""
    up = transfer_seconds(channels * PARTIAL_BYTES_PER_CHANNEL, worker, coordinator, network)
    down = transfer_seconds(channels * GATE_BYTES_PER_CHANNEL, coordinator, worker, network)
    return up + down


def op_macs(op: Op, rows: int, cols: int | None = None) -> int:
    """MACs of `op` producing `rows` output rows (of `cols` columns; None: the full width)."""
    if rows <= 0 or (cols is not None and cols <= 0):
        return 0
    if cols is None or op.kind in ("gap", "linear"):
        return op.macs(rows)
    return op.macs_per_row * rows * cols // op.out_width + op.fixed_macs


def op_seconds(profile: DeviceProfile, op: Op, rows: int, cols: int | None = None) -> float:
    """Seconds for one invocation of `op` on a tile of `rows` × `cols` output elements."""
    if rows <= 0 or (cols is not None and cols <= 0):
        return 0.0
    return profile.time_model(op.cost_class).seconds(op_macs(op, rows, cols))


def compute_seconds(profile: DeviceProfile, geometry: TileGeometry) -> float:
    """Seconds for a whole tile (all phases), halo rows included."""
    if geometry.empty:
        return 0.0
    total = 0.0
    for cost_class, macs in geometry.macs_by_cost_class().items():
        total += profile.time_model(cost_class).seconds_per_mac * macs
    for op_rows in geometry.op_rows:
        if not op_rows.out_rows.empty:
            total += profile.time_model(op_rows.op.cost_class).seconds_fixed
    return total


def tile_bytes(geometry: TileGeometry) -> tuple[int, int]:
    """Bytes a tile receives (its input rows, halo included) and sends (its output)."""
    return geometry.in_bytes, geometry.out_bytes


def phase_seconds(
    profile: DeviceProfile, geometry: TileGeometry, cols: Sequence[int | None] | None = None
) -> list[float]:
    """Seconds per phase of a tile: a new phase starts after each attention gate.

    `cols` optionally gives, per op of `geometry.op_rows`, the number of output
    columns the tile computes (grid tiles); None means the full width.
    """
    phases = [0.0]
    op_rows = geometry.op_rows
    for position, item in enumerate(op_rows):
        width = None if cols is None else cols[position]
        if not geometry.empty:
            phases[-1] += op_seconds(profile, item.op, len(item.out_rows), width)
        if item.op.kind == "gate":
            phases.append(0.0)
    return phases


def tail_seconds(profile: DeviceProfile, ops: Sequence[Op]) -> float:
    """The tail (global pooling, head) on one device."""
    return sum(op_seconds(profile, op, op.out_height) for op in ops)
