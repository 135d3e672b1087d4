"""An async client for the cluster: submit images, await their results.

    async with connect("127.0.0.1", 1883) as client:
        result = await client.infer(image, "tiny-edgedi", timeout=30)

`infer` subscribes to `results/<job_id>/+` before it publishes the job (so the
result cannot slip past), and re-submits the *same* job id every `retry_s` seconds
until a result arrives or `timeout` runs out: submission is idempotent, so a retry
is safe — it reaches a newly elected leader after a failover, and a finished job
just has its result published again. A `retryable` error (no workers just now, a
tile lost, the leader changing) is retried the same way and returned only when
time runs out; any other error result is returned at once (`status == "error"`).
Only a timeout with no answer at all raises.

A result is believed only from the device that led the cluster in the result's
epoch (as the leader records this client has seen say): on a broker that does not
enforce identities, anyone could publish one.

Used by `edgedi infer`, the demo and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgedi.agent.journal import remember_leader
from edgedi.broker.connection import MqttSession, Received, SessionSettings
from edgedi.broker.errors import ConnectionLost, NotAuthorised
from edgedi.broker.ids import JobId
from edgedi.broker.messages import JobResult, JobSubmit, LeaderRecord, PlanAnnouncement
from edgedi.broker.tensors import Tensor
from edgedi.broker.topics import (
    JOB_RESULT,
    JOB_SUBMIT,
    PLAN_CURRENT,
    PLANNER_LEADER,
    TopicRoot,
    TopicSpec,
)

if TYPE_CHECKING:
    from edgedi.agent.config import BrokerSettings

__all__ = ["InferenceClient", "JobTimeout", "connect", "connect_to"]

logger = logging.getLogger(__name__)

DEFAULT_RETRY_S = 5.0
# After a retryable error, wait this long before submitting again.
_RETRYABLE_PAUSE_S = 0.5


class JobTimeout(TimeoutError):
    """No result arrived for a job within the client's timeout."""

    def __init__(self, job_id: str, timeout: float, hint: str = "") -> None:
        super().__init__(f"no result for job {job_id} within {timeout:.1f} s{hint}")
        self.job_id = job_id


class InferenceClient:
    """Submits jobs over a connected `MqttSession`; see the module docstring."""

    def __init__(self, session: MqttSession, client_id: str) -> None:
        self.session = session
        self.client_id = client_id
        self._plan: PlanAnnouncement | None = None
        self._leader: LeaderRecord | None = None
        self._plan_seen = asyncio.Event()
        self._leader_seen = asyncio.Event()
        self._leaders: set[tuple[int, str]] = set()
        self.refused_results = 0
        """Results ignored because their sender did not lead their epoch."""

    async def _watch(self) -> None:
        await self.session.subscribe(PLAN_CURRENT, self._on_plan)
        await self.session.subscribe(PLANNER_LEADER, self._on_leader)

    def check_authorised(self) -> None:
        """`NotAuthorised` when the broker refused one of this client's subscriptions."""
        for topic_filter, code in self.session.refused_subscriptions.items():
            raise NotAuthorised(
                topic_filter, f"the broker refused the subscription (reason code {code:#x})"
            )

    def unseen(self, spec: TopicSpec) -> str:
        """Why a retained record of `spec` may be missing, for messages to the user."""
        topic = spec.topic(self.session.root)
        return (
            f"no retained record on {topic} was seen: none is published yet, or this "
            f"account ({self.session.settings.username or 'anonymous'}) is not authorised "
            "to read it"
        )

    async def _on_plan(self, received: Received) -> None:
        message = received.message
        assert isinstance(message, PlanAnnouncement)
        if self._plan is None or message.epoch >= self._plan.epoch:
            self._plan = message
            self._plan_seen.set()

    async def _on_leader(self, received: Received) -> None:
        message = received.message
        assert isinstance(message, LeaderRecord)
        if message.sender == message.device:
            remember_leader(self._leaders, message.epoch, message.device)
        if self._leader is None or message.epoch >= self._leader.epoch:
            self._leader = message
            self._leader_seen.set()

    async def current_plan(self, timeout: float = 2.0) -> PlanAnnouncement | None:  # noqa: ASYNC109
        """The retained plan in force, or None if none arrives within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._plan_seen.wait()
        except TimeoutError:
            return None
        return self._plan

    async def leader(self, timeout: float = 2.0) -> LeaderRecord | None:  # noqa: ASYNC109
        """The retained leader record, or None if none arrives within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._leader_seen.wait()
        except TimeoutError:
            return None
        return self._leader

    def new_job_id(self) -> str:
        return f"{self.client_id}-{uuid.uuid4().hex[:16]}"

    async def infer(
        self,
        image: npt.NDArray[Any],
        model: str,
        *,
        job_id: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - also sent as the job's deadline
        retry_s: float = DEFAULT_RETRY_S,
        strategy: str | None = None,
        trace: bool = False,
    ) -> JobResult:
        """Submit `image` (grayscale, (H, W) or (1, H, W)) and await its result.

        `trace` asks the devices for the job's timeline (`JobResult.trace`).

        Raises `JobTimeout` when no result arrives within `timeout` seconds.
        """
        job_id = job_id or self.new_job_id()
        array = np.ascontiguousarray(image)
        if array.ndim == 2:
            array = array[None]
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[JobResult] = asyncio.Queue(maxsize=16)

        async def on_result(received: Received) -> None:
            message = received.message
            if isinstance(message, JobResult) and message.job_id == job_id:
                if (message.epoch, message.sender) not in self._leaders:
                    self.refused_results += 1
                    logger.warning(
                        "ignored a result of job %s from %s, who did not lead epoch %s",
                        job_id,
                        message.sender,
                        message.epoch,
                    )
                    return
                with contextlib.suppress(asyncio.QueueFull):  # only the latest few matter
                    results.put_nowait(message)

        subscription = await self.session.subscribe(JOB_RESULT, on_result, job_id=job_id)
        try:
            self.check_authorised()
            give_up = loop.time() + timeout
            attempt = 0
            last_error: JobResult | None = None
            while True:
                remaining = give_up - loop.time()
                submit = JobSubmit(
                    sender=self.client_id,
                    job_id=JobId(job_id),
                    model=model,
                    image=Tensor(array),
                    client=self.client_id,
                    submitted_at=time.time(),
                    # A little less than our own patience, so a deadline error still reaches us.
                    deadline_seconds=max(0.05, remaining - min(1.0, 0.1 * remaining)),
                    strategy=strategy,
                    trace=trace,
                )
                try:
                    await self.session.publish(JOB_SUBMIT, submit, timeout=max(0.1, remaining))
                except ConnectionLost as error:
                    logger.warning("could not submit job %s: %s", job_id, error)
                answer = await self._await_answer(results, min(retry_s, give_up - loop.time()))
                if answer is not None and not answer.retryable:
                    return answer
                if answer is not None:
                    # The cluster could not run it just now (no workers, leader changing):
                    # a later submission of the same id may succeed.
                    last_error = answer
                    logger.info("job %s: %s; submitting again", job_id, answer.error)
                    await asyncio.sleep(min(_RETRYABLE_PAUSE_S, max(0.0, give_up - loop.time())))
                if loop.time() >= give_up:
                    if last_error is not None:
                        return last_error
                    # Only a leader's results are believed: without its record, none is.
                    hint = "" if self._leaders else f"; {self.unseen(PLANNER_LEADER)}"
                    raise JobTimeout(job_id, timeout, hint)
                attempt += 1
                logger.info("no result for job %s yet; submitting again (%d)", job_id, attempt)
        finally:
            await self.session.unsubscribe(subscription)

    @staticmethod
    async def _await_answer(
        results: asyncio.Queue[JobResult],
        wait: float,
    ) -> JobResult | None:
        """The next result within `wait` seconds, or None."""
        if wait <= 0:
            return None
        try:
            async with asyncio.timeout(wait):
                return await results.get()
        except TimeoutError:
            return None


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    root: TopicRoot | None = None,
    client_id: str | None = None,
    username: str | None = None,
    password: str | None = None,
    connect_timeout: float = 10.0,
    tls_context: ssl.SSLContext | None = None,
) -> AsyncIterator[InferenceClient]:
    """A connected client; the connection closes when the block ends.

    `NotAuthorised` when the broker refuses the plan's or the leader's topic."""
    client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
    settings = SessionSettings(
        host=host,
        port=port,
        client_id=client_id,
        username=username,
        password=password,  # type: ignore[arg-type]  # pydantic turns str into SecretStr
    )
    async with _connected(
        MqttSession(settings, root or TopicRoot(), tls_context=tls_context), connect_timeout
    ) as client:
        yield client


@asynccontextmanager
async def connect_to(
    broker: BrokerSettings, *, client_id: str | None = None, connect_timeout: float = 10.0
) -> AsyncIterator[InferenceClient]:
    """`connect` with the shared connection settings (edgedi.agent.connection)."""
    from edgedi.agent.connection import session_settings, tls_context, topic_root

    client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
    session = MqttSession(
        session_settings(broker, client_id), topic_root(broker), tls_context=tls_context(broker)
    )
    async with _connected(session, connect_timeout) as client:
        yield client


@asynccontextmanager
async def _connected(
    session: MqttSession,
    connect_timeout: float,
) -> AsyncIterator[InferenceClient]:
    client = InferenceClient(session, session.settings.client_id)
    await client._watch()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(session.run(), name=f"mqtt-{client.client_id}")
            try:
                await session.wait_connected(connect_timeout)
                client.check_authorised()
                yield client
            finally:
                session.request_stop()
    except BaseExceptionGroup as errors:
        # The task group wraps what the block (or the check) raised; the caller
        # expects the error itself (`except BrokerError`), as without a group.
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None
        raise
