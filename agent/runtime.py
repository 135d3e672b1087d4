"""One device's agent: `Agent(settings).run()` owns everything in one TaskGroup.

Start-up, before touching the network: set the torch thread count, load the held
models and measure (or read the cached) device profile, all on the device's
single compute thread. Then the MQTT session connects with a Last Will (state
`offline` with this process's session counter) and, on every (re)connect,
announces the birth and state `online` (both retained). Once announced, READY=1
goes to systemd (a no-op outside it).

Tasks in the group (named, none orphaned):

- `mqtt`: the connection loop (`edgedi.broker.connection.MqttSession`);
- `heartbeat`: a load report every second (membership's liveness signal);
- `loop-lag`: measures how late the loop runs; silence is judged on a clock held
  back by recent stalls and unread messages (`edgedi.agent.loop_lag`);
- `control`: membership changes and the election, ticking every 0.25 s; it starts
  the coordinator when this device leads and stops it when it no longer does;
- `plans`: the leader's debounced re-planning and `plans/current` publication;
- `worker`: the tile executor; `coordinator` (while leading): the jobs;
- `watchdog`: systemd watchdog pings while the event loop and the compute thread are
  responsive, with or without the broker (returns at once outside systemd).
- `home-assistant`: Home Assistant discovery configs, published or cleared
  (`agent.home_assistant`); `metrics` (with `metrics.port`): the Prometheus
  endpoint (`agent.metrics`).

Message handlers only update state or hand work to a queue; they never await the
network, so the receive loop keeps up. Messages between the local coordinator and
the local worker skip the broker (same objects, no encoding), which saves a round
trip and a copy of the leader's own tiles: that routing is `agent.transport`'s.

`request_stop()` (SIGTERM/SIGINT in the CLI): STOPPING=1, stop taking work, let
in-flight jobs and tiles finish for up to `jobs.drain_s`, publish state `stopped`
(retained; a clean DISCONNECT does not fire the Will), disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from edgedi.agent.clock import OffsetEstimate
from edgedi.agent.config import AgentSettings
from edgedi.agent.connection import session_settings, tls_context
from edgedi.agent.coordinator import Coordinator
from edgedi.agent.device import (
    ProfileTable,
    capabilities,
    measure_profile,
    measure_unit_profiles,
)
from edgedi.agent.direct import takes_task_batches
from edgedi.agent.election import Decision, Election, LeaderClaim
from edgedi.agent.home_assistant import HomeAssistant
from edgedi.agent.identity import (
    IDENTITY_CHECK_S,
    DuplicateDevice,
    IdentityCheck,
    loses_to,
    new_instance,
    next_session,
)
from edgedi.agent.job_intake import ResultCache
from edgedi.agent.journal import JobJournal, remember_leader
from edgedi.agent.link_probe import LinkMeasurement, LinkProber
from edgedi.agent.loop_lag import LoopLag
from edgedi.agent.membership import HEARTBEAT_PERIOD_S, SILENT_AFTER_S, Membership
from edgedi.agent.metrics import AgentMetrics
from edgedi.agent.model_store import HeldModel, ModelStore
from edgedi.agent.pacing import join_cgroup
from edgedi.agent.planning import Planning, PlanningError
from edgedi.agent.systemd import notify, watchdog_loop
from edgedi.agent.transport import AgentTransport
from edgedi.agent.worker import Worker
from edgedi.broker.connection import MqttSession, Received, SessionSettings, Subscription
from edgedi.broker.errors import BrokerError
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import (
    CancelJob,
    ClockEcho,
    DeviceBirth,
    DeviceState,
    GateValue,
    Heartbeat,
    JobResult,
    JobSubmit,
    LeaderRecord,
    LinkEstimate,
    LinkProbe,
    PlanAnnouncement,
    RebirthRequest,
    ReductionPartial,
    TileFailed,
    TileResult,
    TileRows,
    TileTask,
    TileTaskBatch,
    TileTrace,
    UnitProfile,
)
from edgedi.broker.plan import Plan
from edgedi.broker.ratelimit import RateLimitedLog
from edgedi.broker.topics import (
    CONTROL_REBIRTH,
    DEVICE_BIRTH,
    DEVICE_HEARTBEAT,
    DEVICE_PARTIALS,
    DEVICE_PEER,
    DEVICE_PROBE,
    DEVICE_STATE,
    DEVICE_TASKS,
    JOB_GATES,
    JOB_PARTIALS,
    JOB_RESULT,
    JOB_SUBMIT,
    JOB_TILES,
    PLAN_CURRENT,
    PLANNER_LEADER,
    ParsedTopic,
    Publication,
    TopicRoot,
)

__all__ = ["Agent"]

logger = logging.getLogger(__name__)

# A device alive in one session this long is no newcomer (see `_settled_devices`).
_SETTLED_S = 10.0
# Two agents of one id that started together settle it within this long of announcing;
# later, a heartbeat of our id from elsewhere never stops a running agent (a forged
# one would otherwise shut any device down): the newcomer's start-up check stops it.
_DUPLICATE_RACE_S = 10.0


# After connecting, wait this long for retained births, states and the leader record
# before taking part in the election (a device must not claim what it has not seen).
SETTLE_S = 1.0
CONTROL_TICK_S = 0.25
# Membership changes come in bursts (a cluster starting); plan once they settle.
REPLAN_DEBOUNCE_S = 0.5
_ANNOUNCE_TIMEOUT_S = 5.0
_STOPPED_TIMEOUT_S = 3.0
# Repairs of retained state are rate-bounded: a leader says its record again, and a
# device its birth and state, at most this often; a device asks everyone for a
# rebirth (when the membership it sees is inconsistent) at most every
# _REBIRTH_REQUEST_S. A record rewritten in a loop cannot start a publishing storm.
_REPUBLISH_S = 1.0
_REBIRTH_REQUEST_S = 5.0


def _first_unit(held: HeldModel, x: torch.Tensor) -> None:
    with torch.inference_mode():
        held.model.run_units(x, 0, 1)


def _join_cgroup(tasks: Path | None) -> None:
    """Compute thread start: join the emulated device's CPU quota group, if any."""
    join_cgroup(tasks, threading.get_native_id(), "compute thread")


class Agent:
    """An edgedi device: worker always, planner and coordinator while elected leader."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        profile: ProfileTable | None = None,
        environ: Mapping[str, str] | None = None,
        settle_s: float = SETTLE_S,
        identity_check_s: float = IDENTITY_CHECK_S,
    ) -> None:
        self.settings = settings
        self.device_id = DeviceId(settings.device_id)
        self.instance = new_instance()
        # Sparkplug-style session counter, stored in the state directory; set once the
        # broker has shown which sessions of this id it still holds (see agent.identity).
        self.session_counter = 0
        self.root = TopicRoot(settings.broker.topic_root, settings.broker.cluster)
        self.store = ModelStore(
            settings.compute.models, settings.compute.input_size, settings.compute.checkpoint_dir
        )
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"compute-{self.device_id}",
            initializer=_join_cgroup,
            initargs=(settings.compute.cgroup_tasks,),
        )
        self.membership = Membership()
        self.election = Election(
            self.device_id,
            settings.planner.priority,
            settings.planner.candidate,
            session=self.session_counter,
        )
        self.planning = Planning(
            self.device_id,
            settings.compute.input_size,
            settings.planner.strategy,
            on_change=lambda: self._plan_dirty.set(),
            direct=settings.jobs.direct,
            cgroup_procs=settings.planner.cgroup_procs,
        )
        self.journal = JobJournal(settings.jobs.journal_size, settings.jobs.deadline_s)
        self.births: dict[str, DeviceBirth] = {}
        self.current_plan: PlanAnnouncement | None = None
        self.coordinator: Coordinator | None = None
        self.profile: ProfileTable | None = profile
        self.unit_profiles: dict[str, UnitProfile] = {}
        self.measured_link: LinkMeasurement | None = None
        self.link_prober = LinkProber(
            self.device_id,
            lambda probe: self.session.publish(DEVICE_PROBE, probe, device=self.device_id),
        )
        # The links of the worker and the coordinator: local short-cuts or the broker.
        self.transport = AgentTransport(
            self.device_id,
            self.executor,
            session=lambda: self.session,
            worker=lambda: self.worker,
            coordinator=lambda: self.coordinator,
            slowdown=settings.compute.slowdown,
        )
        self.worker = Worker(
            self.device_id,
            self.store,
            self.executor,
            self.transport,
            accepts_epoch=self.election.accepts_epoch,
            slowdown=settings.compute.slowdown,
            max_active=settings.compute.max_active_tiles,
            max_queued=settings.compute.max_queued_tiles,
            wire_dtype=settings.jobs.wire_dtype,
            unit_costs=self._unit_costs,
        )
        self.metrics = AgentMetrics(self)
        self.home_assistant = HomeAssistant(self)
        self.ready = asyncio.Event()
        """Set once connected and announced (READY=1)."""
        self._environ = environ
        self._settle_s = settle_s
        self._identity_check_s = identity_check_s
        self._duplicate: DuplicateDevice | None = None
        self._session: MqttSession | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._plan_dirty = asyncio.Event()
        self._rebirth = False
        self._connected_at: float | None = None
        # Whether STATUS= already says the broker is gone (once per outage).
        self._broker_lost_reported = False
        self._reconnected = False
        self._leader_view: tuple[str | None, int] = (None, -1)
        self._coordinator_task: asyncio.Task[None] | None = None
        self._leader_subscriptions: list[Subscription] = []
        self._results = ResultCache(settings.jobs.result_cache)
        # Who led in each recent epoch (from leader records): a result is believed
        # only from the leader of its epoch.
        self._leaders_by_epoch: set[tuple[int, str]] = set()
        self._group: asyncio.TaskGroup | None = None
        self._heartbeat_sequence = 0
        # Clock offset to the leader (agent.clock): our recent heartbeats (sequence,
        # sent_at, monotonic send time); as leader, the heartbeats heard since our last.
        self.clock_offset = OffsetEstimate()
        self._beats_sent: deque[tuple[int, float, float]] = deque(maxlen=16)
        self._beats_heard: dict[str, tuple[int, float]] = {}
        self._offset_leader: str | None = None
        self._offset_warned = False
        self._announced_at = -float("inf")
        self._first_announced_at: float | None = None
        self._leader_published_at = -float("inf")
        self._rebirth_requested_at = -float("inf")
        self._ask_rebirth: str | None = None
        self._stopping = False
        self._log = RateLimitedLog(logger)
        # Silence is judged on a clock that stands still while our own loop could not
        # read (see edgedi.agent.loop_lag): a busy agent must not evict live devices.
        self.loop_lag = LoopLag(
            SILENT_AFTER_S + HEARTBEAT_PERIOD_S,
            behind_since=lambda: self._session.behind_since() if self._session else None,
        )

    # --- public state ---------------------------------------------------------------

    @property
    def session(self) -> MqttSession:
        if self._session is None:
            raise RuntimeError("the agent is not running")
        return self._session

    @property
    def is_leader(self) -> bool:
        return self.coordinator is not None and self.election.is_leader()

    @property
    def leader(self) -> tuple[str | None, int]:
        """(leader device, epoch) as this agent sees it."""
        return self.election.leader, self.election.epoch

    def request_stop(self) -> None:
        """Begin the graceful shutdown (safe from a signal handler, also twice)."""
        self._stop.set()

    # --- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Run until `request_stop()`; raises on a bug (systemd restarts us)."""
        try:
            await self._prepare()
            if not await self._claim_identity():
                return  # stopped while checking
            self._session = self._make_session()
            await self._subscribe()
            async with asyncio.TaskGroup() as group:
                self._group = group
                session_task = group.create_task(self.session.run(), name=f"mqtt-{self.device_id}")
                control = group.create_task(self._control_loop(), name=f"control-{self.device_id}")
                others = [
                    group.create_task(self._heartbeat_loop(), name=f"heartbeat-{self.device_id}"),
                    group.create_task(self.loop_lag.run(), name=f"loop-lag-{self.device_id}"),
                    group.create_task(self._plan_loop(), name=f"plans-{self.device_id}"),
                    group.create_task(self.worker.run(), name=f"worker-{self.device_id}"),
                    group.create_task(
                        watchdog_loop(self.executor, self._environ),
                        name=f"watchdog-{self.device_id}",
                    ),
                    group.create_task(
                        self.home_assistant.run(), name=f"home-assistant-{self.device_id}"
                    ),
                ]
                metrics = self.settings.metrics
                if metrics.port is not None:
                    others.append(
                        group.create_task(
                            self.metrics.serve(metrics.host, metrics.port),
                            name=f"metrics-{self.device_id}",
                        )
                    )
                await self._stop.wait()
                # No election step may start leading once the shutdown has begun.
                control.cancel()
                await asyncio.wait([control])
                await self._shutdown()
                for task in others:
                    task.cancel()
                self.session.request_stop()
                await session_task
        finally:
            self._group = None
            self.coordinator = None  # an agent that is not running leads nothing
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.planning.close()
        if self._duplicate is not None:
            raise self._duplicate

    def _session_settings(self, client_id: str) -> SessionSettings:
        return session_settings(
            self.settings.broker, client_id, max_payload_bytes=self.settings.jobs.max_payload_bytes
        )

    def _tls(self) -> ssl.SSLContext | None:
        return tls_context(self.settings.broker)

    async def _claim_identity(self) -> bool:
        """Listen to our own id's records before announcing anything (agent.identity):
        raise `DuplicateDevice` if another agent is alive with it, else take the next
        session number. False when asked to stop meanwhile."""
        # A client id of its own and no Will: this look neither evicts nor marks anyone.
        session = MqttSession(
            self._session_settings(f"{self.device_id[:108]}-check-{self.instance}"),
            self.root,
            tls_context=self._tls(),
        )
        check = IdentityCheck(self.device_id)
        found = asyncio.Event()

        async def observe(received: Received) -> None:
            check.observe(received.message)
            if check.holder is not None:
                found.set()

        for spec in (DEVICE_BIRTH, DEVICE_STATE, DEVICE_HEARTBEAT):
            await session.subscribe(spec, observe, device=self.device_id)
        async with asyncio.TaskGroup() as group:
            group.create_task(session.run(), name=f"identity-{self.device_id}")
            stop = group.create_task(self._stop.wait(), name=f"identity-stop-{self.device_id}")
            waiters = [stop, group.create_task(session.connected.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if session.connected.is_set() and not self._stop.is_set():
                    waiters.append(group.create_task(found.wait()))
                    await asyncio.wait(
                        [stop, waiters[-1]],
                        timeout=self._identity_check_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
            finally:
                for task in waiters:
                    task.cancel()
                session.request_stop()
        if self._stop.is_set():
            return False
        problem = check.problem()
        if problem is not None:
            raise DuplicateDevice(problem)
        self.session_counter = next_session(self.settings.state_dir, check.highest_session + 1)
        self.election.session = self.session_counter
        logger.info("%s starts session %d", self.device_id, self.session_counter)
        return True

    async def _prepare(self) -> None:
        compute = self.settings.compute
        if compute.threads is not None:
            torch.set_num_threads(compute.threads)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self.executor, self.store.load_all)
        if self.profile is None:
            threads = compute.threads or torch.get_num_threads()
            self.profile = await loop.run_in_executor(
                self.executor,
                lambda: measure_profile(
                    compute.profile_seconds,
                    threads,
                    state_dir=self.settings.state_dir,
                    slowdown=compute.slowdown,
                ),
            )
        threads = compute.threads or torch.get_num_threads()
        if compute.measure_tiles:
            self.unit_profiles = await loop.run_in_executor(
                self.executor,
                lambda: measure_unit_profiles(
                    self.store,
                    threads,
                    state_dir=self.settings.state_dir,
                    slowdown=compute.slowdown,
                ),
            )
        logger.info(
            "%s ready to connect after %.1f s: models %s, session %d",
            self.device_id,
            time.perf_counter() - started,
            ", ".join(self.store.held),
            self.session_counter,
        )

    def _make_session(self) -> MqttSession:
        # A client id per process: a second agent of the same id (a cloned card) then
        # cannot evict this one by connecting; it finds the id taken and stops.
        return MqttSession(
            self._session_settings(f"{self.device_id[:115]}-{self.instance}"),
            self.root,
            will=self._will,
            on_connect=self._on_connect,
            tls_context=self._tls(),
            on_retained_damage=self._on_retained_damage,
        )

    def _will(self) -> Publication:
        return self.session.prepare(DEVICE_STATE, self._state("offline"), device=self.device_id)

    def _state(self, status: str) -> DeviceState:
        return DeviceState(
            sender=self.device_id,
            device=self.device_id,
            session=self.session_counter,
            status=status,  # type: ignore[arg-type]
        )

    def _birth(self) -> DeviceBirth:
        return DeviceBirth(
            sender=self.device_id,
            device=self.device_id,
            session=self.session_counter,
            candidate=self.settings.planner.candidate,
            priority=self.settings.planner.priority,
            capabilities=capabilities(self.store.held, self.settings.compute.threads),
            profile=dict(self.profile or {}),
            unit_profiles=dict(self.unit_profiles),
            link=self._link_estimate(),
        )

    def _unit_costs(self, digest: str) -> tuple[tuple[float, float], ...] | None:
        """The unit costs this device measured for the model of `digest`, if any."""
        for profile in self.unit_profiles.values():
            if profile.digest == digest:
                return profile.units
        return None

    def _link_estimate(self) -> LinkEstimate:
        """What the birth announces: the measurement, unless the settings name a link."""
        broker = self.settings.broker
        announced = {"link_mbit_s", "link_latency_ms"} & broker.model_fields_set
        measured = self.measured_link
        bandwidth = broker.link_mbit_s * 1e6 / 8
        latency = broker.link_latency_ms / 1000.0
        if measured is not None and "link_mbit_s" not in announced:
            bandwidth = measured.bandwidth
        if measured is not None and "link_latency_ms" not in announced:
            latency = measured.latency_s
        return LinkEstimate(bandwidth_bytes_per_second=bandwidth, latency_seconds=latency)

    async def _measure_link(self) -> None:
        """Round trips through the broker while the compute thread is busy (see
        `agent.link_probe`); then the birth announces them."""
        stop = asyncio.Event()
        held = self.store.get(self.store.held[0]) if self.store.held else None
        load = (
            asyncio.get_running_loop().create_task(self._keep_busy(held, stop))
            if held is not None
            else None
        )
        try:
            measured = await self.link_prober.measure()
        except (TimeoutError, BrokerError) as error:
            logger.warning("could not measure the link through the broker: %s", error)
            return
        finally:
            stop.set()
            if load is not None:
                await load
        self.measured_link = measured
        logger.info("link through the broker: %s", measured.describe())
        try:
            await self.session.publish(DEVICE_BIRTH, self._birth(), device=self.device_id)
        except BrokerError as error:
            logger.warning("could not announce the measured link: %s", error)

    async def _keep_busy(self, held: HeldModel, stop: asyncio.Event) -> None:
        """Keep the compute thread busy with the model's first unit until `stop`, one
        short step at a time (the watchdog's probe of the thread gets in between)."""
        x = torch.zeros((1, *held.spec.units[0].in_shape))
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await loop.run_in_executor(self.executor, _first_unit, held, x)

    async def _on_probe(self, received: Received) -> None:
        message = received.message
        assert isinstance(message, LinkProbe)
        if message.device == self.device_id:
            self.link_prober.received(message)

    async def _on_connect(self) -> None:
        """On every (re)connect: announce, and settle again before the next election step.

        While we were away we heard no heartbeats: every device that was alive when
        we lost the broker counts as heard now, or an outage longer than
        `SILENT_AFTER_S` would make everyone (us too) look dead at once. That includes
        devices whose Will came just before: a broker that shuts down publishes every
        client's Will. Whoever really died expires `SILENT_AFTER_S` later. The broker
        may also have lost its retained messages (a restart without persistence): a
        leader publishes its record and plan again once settled (`_control_step`).
        """
        first = self._connected_at is None
        if first and self.settings.broker.username is None:
            # One line, once: an operator reading the journal must know.
            logger.warning(
                "%s connected to %s:%d without a login: the broker cannot bind device ids "
                "to logins, so any client that reaches it may publish as any device "
                "(configure users and the ACL: docs/deploy.md)",
                self.device_id,
                self.settings.broker.host,
                self.settings.broker.port,
            )
        await self._announce()
        if first:
            group = self._group
            if self.settings.broker.measure_link and group is not None:
                group.create_task(self._measure_link(), name=f"link-{self.device_id}")
            return
        now = time.monotonic()
        self._connected_at = now
        own = self.membership.get(self.device_id)
        lost_at = own.last_heartbeat or own.born_at if own is not None else now
        for record in self.membership.records():
            heard = record.last_heartbeat or record.born_at
            if record.status == "offline" and heard >= lost_at - SILENT_AFTER_S:
                self.membership.state(record.device, record.session, "online", now=now)
            if record.status != "stopped":
                self.membership.heartbeat(record.device, record.session, now=now)
        self._reconnected = True
        if self.coordinator is not None:
            self.coordinator.connection_restored()

    async def _announce(self) -> None:
        """Birth, then state online (both retained); on connect and on a rebirth request."""
        session = self.session
        await session.publish(
            DEVICE_BIRTH, self._birth(), device=self.device_id, timeout=_ANNOUNCE_TIMEOUT_S
        )
        status = "stopped" if self._stopping else "online"
        await session.publish(
            DEVICE_STATE, self._state(status), device=self.device_id, timeout=_ANNOUNCE_TIMEOUT_S
        )
        self._announced_at = time.monotonic()
        if self._first_announced_at is None:
            self._first_announced_at = self._announced_at
        if self._connected_at is None:
            self._connected_at = time.monotonic()
        if not self.ready.is_set():
            self.ready.set()
            notify("READY=1", self._environ)
        self._broker_lost_reported = False
        notify(f"STATUS=connected to {self.settings.broker.host}", self._environ)
        logger.info("%s announced (session %d)", self.device_id, self.session_counter)

    async def _shutdown(self) -> None:
        self._stopping = True
        notify("STOPPING=1", self._environ)
        logger.info("%s stopping: draining in-flight work", self.device_id)
        drain = self.settings.jobs.drain_s
        self.worker.stop_accepting()
        await self._stop_leading(drain)
        if not await self.worker.drain(drain):
            logger.warning("tiles still running after %.1f s; leaving them", drain)
        if self._duplicate is not None:
            return  # the state of the id belongs to the agent that keeps it
        try:
            await self.session.publish(
                DEVICE_STATE,
                self._state("stopped"),
                device=self.device_id,
                timeout=_STOPPED_TIMEOUT_S,
            )
        except BrokerError as error:
            logger.warning("could not publish state stopped: %s", error)

    # --- subscriptions and handlers (never await the network here) --------------------

    async def _subscribe(self) -> None:
        session = self.session
        await session.subscribe(DEVICE_BIRTH, self._on_birth)
        await session.subscribe(DEVICE_STATE, self._on_state)
        await session.subscribe(DEVICE_HEARTBEAT, self._on_heartbeat)
        await session.subscribe(PLANNER_LEADER, self._on_leader)
        await session.subscribe(PLAN_CURRENT, self._on_plan)
        await session.subscribe(DEVICE_TASKS, self._on_task, device=self.device_id)
        await session.subscribe(JOB_GATES, self._on_gate)
        await session.subscribe(DEVICE_PEER, self._on_peer, target=self.device_id)
        await session.subscribe(DEVICE_PARTIALS, self._on_peer)  # every device's
        await session.subscribe(DEVICE_PROBE, self._on_probe, device=self.device_id)
        await session.subscribe(CONTROL_REBIRTH, self._on_rebirth)
        if self.settings.planner.candidate:
            # Every candidate keeps the journal, so whoever leads next can answer the
            # jobs a dead leader left (see edgedi.agent.journal).
            await session.subscribe(JOB_SUBMIT, self._on_submit)
            await session.subscribe(JOB_RESULT, self._on_result)

    async def _on_birth(self, received: Received) -> None:
        birth = received.message
        assert isinstance(birth, DeviceBirth)
        if birth.device == self.device_id and (
            birth.session != self.session_counter or birth.sender != self.device_id
        ):
            self._repair("a birth of this device that is not ours")
            return  # keep our own record of ourselves
        known = self.births.get(birth.device)
        if known is not None and birth.session < known.session:
            return
        self.membership.birth(
            birth.device,
            birth.session,
            candidate=birth.candidate,
            priority=birth.priority,
            capabilities=birth.capabilities.model_dump(),
            now=time.monotonic(),
        )
        if birth.device not in self.membership:
            self._log.warning(
                "table full",
                "device table full of live devices: ignored the birth of %s",
                birth.device,
            )
            return
        if known is not None and birth.session > known.session and self.coordinator is not None:
            self.coordinator.device_restarted(birth.device)
        self.births[birth.device] = birth
        for forgotten in [device for device in self.births if device not in self.membership]:
            del self.births[forgotten]  # the table made room by forgetting it
        self._wake.set()

    async def _on_state(self, received: Received) -> None:
        state = received.message
        assert isinstance(state, DeviceState)
        if state.device == self.device_id:
            if state.session != self.session_counter:
                if state.session < self.session_counter and not self._stopping:
                    # The late Will of an older connection of ours (or the record a
                    # stopped duplicate left) is what the broker retains: say who we are.
                    self._rebirth = True
                return  # nobody else defines this device's session in its own table
            if state.status != "online" and not self._stopping:
                # Our Will from a connection that has been replaced, or a forged state.
                self._repair(f"state {state.status} of this device while it runs")
        self.membership.state(state.device, state.session, state.status, now=time.monotonic())
        self._wake.set()

    async def _on_heartbeat(self, received: Received) -> None:
        beat = received.message
        assert isinstance(beat, Heartbeat)
        if beat.device == self.device_id and (beat.instance or "") != self.instance:
            self._another_agent(beat)
            return
        birth = self.births.get(beat.device)
        if birth is None or birth.session < beat.session:
            # A live device whose (current) birth we never saw: deleted retained
            # state, or a birth lost. Ask everyone to announce themselves again.
            self._ask_rebirth = f"heartbeat of {beat.device} without its birth"
            self._wake.set()
        now = time.monotonic()
        self.membership.heartbeat(beat.device, beat.session, now=now)
        if beat.device != self.device_id and self.is_leader and beat.device in self.births:
            self._beats_heard[beat.device] = (beat.sequence, now)
        if beat.echoes and beat.device == self.election.leader and beat.device != self.device_id:
            self._clock_sample(beat, now)

    def _clock_sample(self, beat: Heartbeat, now: float) -> None:
        """The leader's heartbeat echoes one of ours: one round trip (agent.clock)."""
        if beat.device != self._offset_leader:
            self._offset_leader = beat.device
            self.clock_offset.reset()
        echo = next((e for e in beat.echoes or () if e.device == self.device_id), None)
        sent = next((s for s in self._beats_sent if echo and s[0] == echo.sequence), None)
        if echo is None or sent is None:
            return
        _, t1, sent_at = sent
        t3 = beat.sent_at
        self.clock_offset.add(
            t1, t3 - echo.held_s, t3, time.time(), round_trip_s=now - sent_at - echo.held_s
        )
        offset = self.clock_offset.offset_s
        if offset is None:
            return
        limit = self.settings.clock.warn_offset_s
        if abs(offset) > limit and not self._offset_warned:
            self._offset_warned = True
            logger.warning(
                "this device's clock is %+.3f s from the leader %s's (more than %.1f s): "
                "nothing depends on it, but timestamps in logs and results disagree",
                offset,
                beat.device,
                limit,
            )
        elif abs(offset) <= limit / 2 and self._offset_warned:
            self._offset_warned = False
            logger.info("clock offset to the leader %s now %+.3f s", beat.device, offset)

    def _another_agent(self, beat: Heartbeat) -> None:
        """A heartbeat of our id from another process: both started at once (each
        checked before the other announced). One of the two stops (agent.identity)."""
        if self._duplicate is not None or self._stopping:
            return
        first = self._first_announced_at
        racing = first is not None and time.monotonic() - first < _DUPLICATE_RACE_S
        if racing and loses_to((self.session_counter, self.instance), beat):
            self._duplicate = DuplicateDevice(
                f"device id {self.device_id} is also used by another agent (session "
                f"{beat.session}), which keeps it. This agent stops. Give every device "
                f"a unique device_id."
            )
            logger.error("%s", self._duplicate)
            self.request_stop()
        else:
            self._log.log(
                logging.ERROR,
                "duplicate",
                "another agent uses device id %s (session %d); it stops, this one keeps it",
                self.device_id,
                beat.session,
            )
            self._rebirth = True  # its birth and state may be the retained ones now
            self._wake.set()

    async def _on_leader(self, received: Received) -> None:
        record = received.message
        assert isinstance(record, LeaderRecord)
        before = self.election.highest_epoch
        if not self.election.observe(
            LeaderClaim(record.epoch, record.priority, record.device, record.session)
        ):
            self._log.warning(
                "implausible leader",
                "ignored a leader record of %s with implausible epoch %d (highest seen %d)",
                record.device,
                record.epoch,
                before,
            )
            self._on_retained_damage(received.topic)
        elif record.sender == record.device:
            remember_leader(self._leaders_by_epoch, record.epoch, record.device)
        if self.election.highest_epoch > before:
            self.worker.on_epoch(self.election.highest_epoch)
        self._wake.set()

    async def _on_plan(self, received: Received) -> None:
        announcement = received.message
        assert isinstance(announcement, PlanAnnouncement)
        if not self.election.accepts_epoch(announcement.epoch):
            logger.debug("ignored a plan of stale epoch %d", announcement.epoch)
            return
        self.current_plan = announcement
        logger.info("plan in force: %s (epoch %d)", announcement.plan.summary(), announcement.epoch)

    async def _on_task(self, received: Received) -> None:
        message = received.message
        if isinstance(message, TileTask):
            self.worker.accept(message)
        elif isinstance(message, TileTaskBatch):
            for task in message.tasks:  # the batch checked they are one job's, for one device
                self.worker.accept(task)
        elif isinstance(message, CancelJob):
            self.worker.cancel_job(message)

    async def _on_gate(self, received: Received) -> None:
        message = received.message
        assert isinstance(message, GateValue)
        self.worker.on_gate(message)

    async def _on_peer(self, received: Received) -> None:
        message = received.message
        assert isinstance(message, TileRows | ReductionPartial)
        if received.topic.parameters.get("device") != message.device:
            # The topic names the sender (the broker's ACL binds it to the login).
            self.worker.statistics.refused += 1
            return
        if message.device == self.device_id:
            return  # our own broadcast partial: taken locally when it was made
        if isinstance(message, TileRows):
            self.worker.on_rows(message)
        else:
            self.worker.on_peer_partial(message)

    async def _on_submit(self, received: Received) -> None:
        message = received.message
        assert isinstance(message, JobSubmit)
        cached = self._results.get(message.job_id)
        if cached is None or cached.retryable:
            self.journal.submitted(message, time.monotonic())
        if self.coordinator is not None:
            self.coordinator.submit(message)

    async def _on_result(self, received: Received) -> None:
        result = received.message
        assert isinstance(result, JobResult)
        if result.epoch is None or (result.epoch, result.sender) not in self._leaders_by_epoch:
            # Not from the leader of its epoch: it answers nothing (and a leader does
            # not drop the job for it).
            self._log.warning(
                "foreign result",
                "ignored a result of job %s from %s, who did not lead epoch %s",
                result.job_id,
                result.sender,
                result.epoch,
            )
            return
        self.journal.answered(result.job_id)
        self._results.remember(result)
        if self.coordinator is not None:
            self.coordinator.answered_elsewhere(result)

    async def _on_job_message(self, received: Received) -> None:
        message = received.message
        assert isinstance(message, ReductionPartial | TileResult | TileFailed | TileTrace)
        if self.coordinator is not None:
            self.coordinator.route(message)

    def _on_retained_damage(self, topic: ParsedTopic) -> None:
        """A retained message we subscribe to was deleted, refused or not believed:
        whoever it belongs to says it again (rate-bounded, in the control loop)."""
        spec, device = topic.spec, topic.parameters.get("device")
        if spec in (DEVICE_BIRTH, DEVICE_STATE) and device == self.device_id:
            self._repair(f"retained {spec.name} of this device damaged")
        elif spec is PLANNER_LEADER and self.election.my_claim is not None:
            self.election.contested = True  # say our record again
            self._wake.set()
        elif spec is PLAN_CURRENT and self.is_leader:
            self._plan_dirty.set()

    def _repair(self, why: str) -> None:
        """Announce this device's birth and state again soon (rate-bounded)."""
        if not self._rebirth:
            self._log.log(
                logging.INFO, "repair", "%s: announcing it again (%s)", self.device_id, why
            )
        self._rebirth = True
        self._wake.set()

    async def _on_rebirth(self, received: Received) -> None:
        assert isinstance(received.message, RebirthRequest)
        self._rebirth = True
        self._wake.set()

    # --- loops ----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        busy_before = self.worker.statistics.busy_seconds
        at_before = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_PERIOD_S)
            if not self.session.connected.is_set():
                self._report_broker_lost()
                continue
            now = time.monotonic()
            busy = self.worker.statistics.busy_seconds
            load = min(1.0, max(0.0, (busy - busy_before) / max(1e-6, now - at_before)))
            busy_before, at_before = busy, now
            self._heartbeat_sequence += 1
            echoes = None
            if self.is_leader:
                heard, self._beats_heard = self._beats_heard, {}
                echoes = tuple(
                    ClockEcho(device=DeviceId(device), sequence=sequence, held_s=now - at)
                    for device, (sequence, at) in sorted(heard.items())
                )
            beat = Heartbeat(
                sender=self.device_id,
                device=self.device_id,
                session=self.session_counter,
                sequence=self._heartbeat_sequence,
                load=load,
                busy_tiles=self.worker.busy_tiles,
                instance=self.instance,
                clock_offset_s=0.0 if self.is_leader else self.clock_offset.offset_s,
                echoes=echoes,
            )
            self._beats_sent.append((beat.sequence, beat.sent_at, now))
            try:
                await self.session.publish(
                    DEVICE_HEARTBEAT, beat, device=self.device_id, timeout=HEARTBEAT_PERIOD_S
                )
            except BrokerError as error:
                logger.debug("heartbeat not sent: %s", error)

    def _report_broker_lost(self) -> None:
        """Show an outage in `systemctl status` (once per outage; `_announce` clears it).

        The watchdog keeps pinging meanwhile: the session reconnects by itself.
        """
        if self._broker_lost_reported:
            return
        self._broker_lost_reported = True
        broker = self.settings.broker
        # Wall clock, not monotonic: an operator reads it next to the journal.
        since = datetime.now().astimezone().isoformat(timespec="seconds")
        notify(
            f"STATUS=broker {broker.host}:{broker.port} unreachable since {since}, reconnecting",
            self._environ,
        )

    async def _control_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(CONTROL_TICK_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping or not self.session.connected.is_set():
                continue
            now = time.monotonic()
            if self._rebirth and now - self._announced_at >= _REPUBLISH_S:
                self._rebirth = False
                try:
                    await self._announce()
                except BrokerError as error:
                    logger.warning("rebirth announcement failed: %s", error)
            if self._ask_rebirth is not None and now - self._rebirth_requested_at >= (
                _REBIRTH_REQUEST_S
            ):
                await self._request_rebirth(self._ask_rebirth)
            connected_at = self._connected_at
            if connected_at is None or time.monotonic() - connected_at < self._settle_s:
                continue
            await self._control_step()

    async def _request_rebirth(self, reason: str) -> None:
        self._ask_rebirth = None
        self._rebirth_requested_at = time.monotonic()
        logger.info("%s asks every device to announce itself again: %s", self.device_id, reason)
        request = RebirthRequest(sender=self.device_id, reason=reason)
        try:
            await self.session.publish(CONTROL_REBIRTH, request)
        except BrokerError as error:
            logger.warning("could not ask for a rebirth: %s", error)

    async def _control_step(self) -> None:
        now = self.loop_lag.judged()
        change = self.membership.changes(now)
        if change:
            logger.info(
                "membership: joined %s, left %s",
                ", ".join(change.joined) or "-",
                ", ".join(change.left) or "-",
            )
            if change.left and self.coordinator is not None:
                self.coordinator.devices_left(change.left)
        alive = self.membership.alive(now)
        decision = self.election.decide(alive)
        if decision is Decision.CLAIM:
            claim = self.election.make_claim()
            logger.info("%s claims leadership with epoch %d", self.device_id, claim.epoch)
            await self._publish_leader(claim)
        elif decision is Decision.REASSERT and self.election.my_claim is not None:
            if time.monotonic() - self._leader_published_at >= _REPUBLISH_S:
                await self._publish_leader(self.election.my_claim)
            else:
                self.election.contested = True  # say it on a later tick
        reconnected, self._reconnected = self._reconnected, False
        if reconnected and decision is Decision.LEAD and self.election.my_claim is not None:
            # The broker may have restarted and lost its retained copies: publish again.
            await self._publish_leader(self.election.my_claim)
            self._plan_dirty.set()
        self._log_leader_view()
        if self.election.is_leader():
            # Membership first: a job may arrive as soon as jobs/submit is subscribed.
            if self.planning.update(self.births, [r.device for r in alive], self.election.epoch):
                self._plan_dirty.set()
            if self.coordinator is None or self.coordinator.epoch != self.election.epoch:
                await self._stop_leading(0.0)
                await self._start_leading()
        elif self.coordinator is not None:
            logger.info("%s is no longer the leader", self.device_id)
            await self._stop_leading(0.0)

    def _settled_devices(self) -> list[str]:
        """Devices alive in a session that began at least `_SETTLED_S` ago: a new
        coordinator does not put them on probation (ghosts re-birth far more often)."""
        now = time.monotonic()
        return [
            record.device
            for record in self.membership.alive(self.loop_lag.judged())
            if now - record.session_since >= _SETTLED_S
        ]

    def _log_leader_view(self) -> None:
        view = (self.election.leader, self.election.epoch)
        if view != self._leader_view:
            self._leader_view = view
            mine = " (this device)" if view[0] == self.device_id else ""
            logger.info("leader view: %s epoch %d%s", view[0], view[1], mine)

    async def _publish_leader(self, claim: LeaderClaim) -> None:
        self._leader_published_at = time.monotonic()
        remember_leader(self._leaders_by_epoch, claim.epoch, claim.device)
        record = LeaderRecord(
            sender=self.device_id,
            device=DeviceId(claim.device),
            epoch=claim.epoch,
            session=claim.session,
            priority=claim.priority,
        )
        try:
            await self.session.publish(PLANNER_LEADER, record)
        except BrokerError as error:
            logger.warning("could not publish the leader record: %s (trying again)", error)
            if self.election.my_claim == claim:
                # Said again on a later tick (`Decision.REASSERT`). Never said, a claim
                # leaves the others without a leader, or a rival of the same epoch
                # (both claimed while a stopping broker sent every Will) leading too.
                self.election.contested = True

    def _takes_task_batches(self, device: str) -> bool:
        """Whether `device`'s birth names a release that reads `TileTaskBatch`."""
        record = self.membership.get(device)
        return record is not None and takes_task_batches(
            record.capabilities.get("software_version")
        )

    async def _start_leading(self) -> None:
        group = self._group
        if group is None or self._stopping:
            return
        epoch = self.election.epoch
        coordinator = Coordinator(
            self.device_id,
            epoch,
            self.store,
            self.planning,
            self.transport,
            self.settings.jobs,
            alive_devices=lambda: [r.device for r in self.membership.alive(self.loop_lag.judged())],
            results=self._results,
            successor=self._successor_alive,
            on_finished=self._job_finished,
            proven=self._settled_devices(),
            takes_batches=self._takes_task_batches,
        )
        self.coordinator = coordinator
        self._coordinator_task = group.create_task(
            coordinator.run(), name=f"coordinator-{self.device_id}"
        )
        session = self.session
        self._leader_subscriptions = [
            await session.subscribe(JOB_PARTIALS, self._on_job_message),
            await session.subscribe(JOB_TILES, self._on_job_message),
        ]
        backlog = self.journal.pending(time.monotonic())
        for entry in backlog:
            coordinator.submit(entry.submit, received_at=entry.received_at)
        self._plan_dirty.set()
        logger.info(
            "%s leads the cluster (epoch %d)%s",
            self.device_id,
            epoch,
            f"; taking over {len(backlog)} unanswered job(s)" if backlog else "",
        )

    def _job_finished(self, result: JobResult) -> None:
        self.metrics.job_finished(result)
        self.home_assistant.job_finished(result)

    def _successor_alive(self) -> bool:
        """Is another candidate alive to take over the jobs this leader leaves?"""
        now = self.loop_lag.judged()
        return any(
            record.device != self.device_id and record.candidate
            for record in self.membership.alive(now)
        )

    async def _stop_leading(self, drain_s: float) -> None:
        coordinator, task = self.coordinator, self._coordinator_task
        if coordinator is None or task is None:
            return
        subscriptions, self._leader_subscriptions = self._leader_subscriptions, []
        coordinator.stop(drain_s)  # takes no new jobs; the running ones still hear back
        try:
            async with asyncio.timeout(drain_s + _STOPPED_TIMEOUT_S * 2):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
        for subscription in subscriptions:
            await self.session.unsubscribe(subscription)
        self.metrics.retire(coordinator.statistics)
        self.coordinator = None
        self._coordinator_task = None

    async def _plan_loop(self) -> None:
        while True:
            await self._plan_dirty.wait()
            await asyncio.sleep(REPLAN_DEBOUNCE_S)
            self._plan_dirty.clear()
            if self.coordinator is None or self._stopping:
                continue
            model = self.settings.planner.model or (self.store.held[0] if self.store.held else None)
            if model is None:
                continue
            await self._make_wanted_plans()
            try:
                plan = await self.planning.plan_for(model)
            except PlanningError as error:
                logger.warning("no plan to publish: %s", error)
                continue
            if not self.is_leader or plan.epoch != self.election.epoch:
                # Leadership changed while planning: a retained plan of a deposed
                # leader would mislead every newcomer.
                logger.info("not publishing plan %s of epoch %d", plan.plan_id, plan.epoch)
                continue
            await self._publish_plan(plan)

    async def _make_wanted_plans(self) -> None:
        """Jobs that ran a replaced plan meanwhile: make their new plans now, off the
        jobs' path (`Planning.plan_for(stale_ok=True)`)."""
        for model, strategy in self.planning.take_wanted():
            try:
                await self.planning.plan_for(model, strategy)
            except PlanningError as error:
                logger.info("no new %s plan for %s: %s", strategy, model, error)

    async def _publish_plan(self, plan: Plan) -> None:
        announcement = PlanAnnouncement(sender=self.device_id, epoch=plan.epoch, plan=plan)
        try:
            await self.session.publish(PLAN_CURRENT, announcement)
        except BrokerError as error:
            logger.warning("could not publish the plan: %s", error)

    # --- diagnostics ----------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """A snapshot for logs and tests."""
        now = self.loop_lag.judged()
        return {
            "device": self.device_id,
            "session": self.session_counter,
            "clock_offset_s": self.clock_offset.offset_s,
            "leader": self.election.leader,
            "epoch": self.election.epoch,
            "is_leader": self.is_leader,
            "alive": [record.device for record in self.membership.alive(now)],
            "worker": vars(self.worker.statistics),
            "coordinator": vars(self.coordinator.statistics) if self.coordinator else None,
            "mqtt": vars(self.session.statistics) if self._session is not None else None,
            "worst_loop_stall_s": round(self.loop_lag.worst_s, 3),
            "pid": os.getpid(),
        }
