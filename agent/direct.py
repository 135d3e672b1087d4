"""The direct data plane: every tile task of a job at once, rows routed device to device.

On the direct plane the leader is off the data path between segments. At the
start of a job it sends every device all of its tile tasks, for every segment:
the first segment's carry their input rows; the later ones carry none and say
nothing about where their input comes from. Each task instead names

- its segment's `peers` (the device of every tile): a tile sends its partial sums
  of each attention gate to them, and every holder combines the partials itself,
  in tile order, so all compute the same gate values without a round trip through
  the leader;
- its `forward` list: which rows of its output each tile of the next segment needs
  (halo included), and on which device that tile runs. The producer sends exactly
  those rows there; rows a device keeps for itself never leave it.

Only the last segment's tiles answer the leader (`TileResult`), which runs the
tail. A successful job therefore costs the leader one message per device (a
`TileTaskBatch` of its tasks; one message per task to a device older than
`TASK_BATCHES_SINCE`) and one result per last-segment tile, and no message at the end.

This module only builds the tasks (pure: numpy slicing and wire models); the
coordinator decides when the plane is used and falls back to the leader-relayed
path when a device fails, leaves or stalls.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from edgedi.agent.layout import SegmentLayout, TileAssignment
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import (
    MAX_TASKS_PER_BATCH,
    RowsForward,
    TileTask,
    TileTaskBatch,
    new_message_id,
)
from edgedi.broker.tensors import Tensor

__all__ = [
    "TASK_BATCHES_SINCE",
    "direct_tasks",
    "forwards",
    "supports_direct",
    "takes_task_batches",
    "task_batches",
]

Segments = Sequence[tuple[SegmentLayout, tuple[TileAssignment, ...]]]

TASK_BATCHES_SINCE: Final = (0, 2)
"""The first release (major, minor) whose devices read a `TileTaskBatch`."""

_RELEASE = re.compile(r"(\d+)\.(\d+)")


def takes_task_batches(software_version: object) -> bool:
    """Does a device of this `software_version` (its birth's) read task batches?

    Anything unparsable (a source checkout says "0+unknown") is taken for an old
    device: it gets one message per task, which every version reads.
    """
    if not isinstance(software_version, str):
        return False
    release = _RELEASE.match(software_version)
    if release is None:
        return False
    return (int(release[1]), int(release[2])) >= TASK_BATCHES_SINCE


def task_batches(tasks: Sequence[TileTask]) -> list[TileTaskBatch]:
    """`tasks` (one job's, for one device, in order) as few batches as the bound allows."""
    if not tasks:
        return []
    first = tasks[0]
    return [
        TileTaskBatch(
            sender=first.sender,
            job_id=first.job_id,
            epoch=first.epoch,
            device=first.device,
            tasks=tuple(tasks[start : start + MAX_TASKS_PER_BATCH]),
        )
        for start in range(0, len(tasks), MAX_TASKS_PER_BATCH)
    ]


def supports_direct(segments: Segments) -> bool:
    """Row strips only: grid tiles would need rows and columns from several producers."""
    return bool(segments) and all(layout.column_parts is None for layout, _ in segments)


def forwards(
    producer: SegmentLayout, consumer: SegmentLayout, devices: Sequence[str]
) -> list[tuple[RowsForward, ...]]:
    """Per producer tile: the rows of its output each consumer tile needs.

    `devices[j]` computes consumer tile `j`. The producer's output map is the
    consumer's input map, so the intervals compare directly.
    """
    result = []
    for index in range(producer.count):
        made = producer.row_tiles[index].out_rows
        needs = []
        for target in range(consumer.count):
            wanted = consumer.row_tiles[target].in_rows
            start, stop = max(made.start, wanted.start), min(made.stop, wanted.stop)
            if start < stop:
                needs.append(
                    RowsForward(tile=target, device=DeviceId(devices[target]), rows=(start, stop))
                )
        result.append(tuple(needs))
    return result


def direct_tasks(
    template: TileTask,
    segments: Segments,
    x: npt.NDArray[np.float32],
    wire_dtype: str,
    head_partial: bool = False,
) -> list[TileTask]:
    """Every tile task of the job, in segment order.

    `template` carries the job's fields (job, epoch, plan, model, deadline); each
    task replaces the segment and tile ones. `x` is the first segment's input.
    With `head_partial` the last segment's tiles answer with their share of the
    head's first linear layer (`edgedi.models.head_split`) instead of their rows.
    """
    tasks: list[TileTask] = []
    for position, (layout, assignments) in enumerate(segments):
        devices = [assignment.device for assignment in assignments]
        peers = tuple(DeviceId(device) for device in devices)
        last = position == len(segments) - 1
        sends = (
            [()] * layout.count
            if last
            else forwards(
                layout, segments[position + 1][0], [a.device for a in segments[position + 1][1]]
            )
        )
        for assignment in assignments:
            rows, columns = layout.tile(assignment.index)
            in_rows, in_columns = rows.in_rows, columns.in_rows
            tensor = None
            if position == 0:
                block = x[:, :, in_rows.start : in_rows.stop, in_columns.start : in_columns.stop]
                tensor = Tensor(np.ascontiguousarray(block, dtype=wire_dtype))
            tasks.append(
                template.model_copy(
                    update={
                        "device": DeviceId(assignment.device),
                        "segment": position,
                        "first_unit": layout.first,
                        "last_unit": layout.last,
                        "row_parts": tuple((p.start, p.stop) for p in layout.row_parts),
                        "column_parts": None,
                        "channel_parts": (
                            None
                            if layout.channel_parts is None
                            else tuple((p.start, p.stop) for p in layout.channel_parts)
                        ),
                        "tile": assignment.index,
                        "input_rows": (in_rows.start, in_rows.stop),
                        "input_columns": (in_columns.start, in_columns.stop),
                        "output_rows": (rows.out_rows.start, rows.out_rows.stop),
                        "output_columns": (columns.out_rows.start, columns.out_rows.stop),
                        "tensor": tensor,
                        "local_gates": layout.count == 1 and bool(layout.gates),
                        "peers": peers,
                        "forward": sends[assignment.index],
                        "head_partial": head_partial and last,
                        "message_id": new_message_id(),
                    }
                )
            )
    return tasks
