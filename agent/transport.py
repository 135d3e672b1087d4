"""How the coordinator and the worker reach devices, clients and the compute thread."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol, TypeVar

from edgedi.broker.messages import CancelJob, GateValue, JobResult, TileTask

__all__ = ["CoordinatorLinks"]

T = TypeVar("T")


class CoordinatorLinks(Protocol):
    """How the coordinator reaches devices, clients and the compute thread."""

    async def send_task(self, task: TileTask) -> None: ...

    async def send_gate(self, message: GateValue, devices: Collection[str]) -> None: ...

    async def send_cancel(self, device: str, message: CancelJob) -> None: ...

    async def send_result(self, result: JobResult) -> None: ...

    async def compute(self, function: Callable[[], T]) -> T: ...
