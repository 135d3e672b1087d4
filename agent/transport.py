"""How the coordinator and the worker reach devices, clients and the compute thread.

`CoordinatorLinks` (and `edgedi.agent.worker.WorkerLinks`) say what each needs;
`AgentTransport` is what an agent gives them: a message for a part on this device
takes the local short-cut (straight to the worker or the coordinator, never through
the broker), any other is published on its topic; torch work goes to the agent's
compute thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Protocol, TypeVar

from edgedi.agent.pacing import paced
from edgedi.broker.connection import MqttSession
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import (
    CancelJob,
    GateValue,
    JobResult,
    ReductionPartial,
    TileFailed,
    TileResult,
    TileRows,
    TileTask,
    TileTaskBatch,
    TileTrace,
)
from edgedi.broker.topics import (
    DEVICE_PARTIALS,
    DEVICE_PEER,
    DEVICE_TASKS,
    JOB_GATES,
    JOB_PARTIALS,
    JOB_RESULT,
    JOB_TILES,
)

if TYPE_CHECKING:  # the coordinator and the worker are given a transport
    from edgedi.agent.coordinator import Coordinator
    from edgedi.agent.worker import Worker

__all__ = ["AgentTransport", "CoordinatorLinks"]

T = TypeVar("T")


class CoordinatorLinks(Protocol):
    """How the coordinator reaches devices, clients and the compute thread."""

    async def send_task(self, task: TileTask) -> None: ...

    async def send_batch(self, batch: TileTaskBatch) -> None: ...

    async def send_gate(self, message: GateValue, devices: Collection[str]) -> None: ...

    async def send_cancel(self, device: str, message: CancelJob) -> None: ...

    async def send_result(self, result: JobResult) -> None: ...

    async def compute(self, function: Callable[[], T]) -> T: ...


class AgentTransport:
    """The links of an agent's worker and coordinator (`CoordinatorLinks`, `WorkerLinks`).

    The session, the worker and the coordinator (while leading) are the agent's of
    the moment, hence asked for at each message.
    """

    def __init__(
        self,
        device_id: DeviceId,
        executor: Executor,
        *,
        session: Callable[[], MqttSession],
        worker: Callable[[], Worker],
        coordinator: Callable[[], Coordinator | None],
        slowdown: float = 1.0,
    ) -> None:
        self.device_id = device_id
        self.executor = executor
        # The leader's own torch work (the tail) as slow as its tiles (agent.pacing).
        self.slowdown = slowdown
        self._session = session
        self._worker = worker
        self._coordinator = coordinator

    @property
    def session(self) -> MqttSession:
        return self._session()

    @property
    def worker(self) -> Worker:
        return self._worker()

    @property
    def coordinator(self) -> Coordinator | None:
        return self._coordinator()

    async def send_task(self, task: TileTask) -> None:
        if task.device == self.device_id:
            self.worker.accept(task)
        else:
            await self.session.publish(DEVICE_TASKS, task, device=task.device)

    async def send_batch(self, batch: TileTaskBatch) -> None:
        if batch.device == self.device_id:
            for task in batch.tasks:
                self.worker.accept(task)
        else:
            await self.session.publish(DEVICE_TASKS, batch, device=batch.device)

    async def send_gate(self, message: GateValue, devices: Collection[str]) -> None:
        if any(device != self.device_id for device in devices):
            await self.session.publish(JOB_GATES, message, job_id=message.job_id)
        if self.device_id in devices:
            self.worker.on_gate(message)

    async def send_cancel(self, device: str, message: CancelJob) -> None:
        if device == self.device_id:
            self.worker.cancel_job(message)
        else:
            await self.session.publish(DEVICE_TASKS, message, device=device)

    async def send_result(self, result: JobResult) -> None:
        await self.session.publish(JOB_RESULT, result, job_id=result.job_id, device=self.device_id)

    async def compute(self, function: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        result, _seconds = await loop.run_in_executor(self.executor, paced, function, self.slowdown)
        return result

    async def send_partial(self, message: ReductionPartial) -> None:
        coordinator = self.coordinator
        if coordinator is not None and coordinator.owns(message.job_id):
            coordinator.route(message)
        else:
            await self.session.publish(
                JOB_PARTIALS, message, job_id=message.job_id, device=self.device_id
            )

    async def send_peer(self, device: str, message: TileRows | ReductionPartial) -> None:
        if device == self.device_id:
            if isinstance(message, TileRows):
                self.worker.on_rows(message)
            else:
                self.worker.on_peer_partial(message)
            return
        await self.session.publish(DEVICE_PEER, message, device=self.device_id, target=device)

    async def send_peer_partial(self, message: ReductionPartial) -> None:
        await self.session.publish(DEVICE_PARTIALS, message, device=self.device_id)

    async def send_tile_outcome(self, message: TileResult | TileFailed | TileTrace) -> None:
        coordinator = self.coordinator
        if coordinator is not None and coordinator.owns(message.job_id):
            coordinator.route(message)
        else:
            await self.session.publish(
                JOB_TILES, message, job_id=message.job_id, device=self.device_id
            )
