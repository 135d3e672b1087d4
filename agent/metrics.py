"""Prometheus metrics of one agent, served over HTTP from the agent's event loop.

Most numbers already exist as statistics objects (the worker's, the coordinator's,
the MQTT session's, membership and election state); `AgentCollector` reads them at
scrape time, so no hot path does any extra work for metrics. What had no counter
yet is the job latency distribution: the coordinator reports each job it ran to
its end (`job_finished`) and it goes into a histogram.

Each agent has its own `CollectorRegistry`, never the library's global one: tests
and `edgedi demo` run several agents in one process.

The server is a small asyncio HTTP/1.0 responder, not `prometheus_client`'s
threaded one: a scrape then reads the agent's state on the event loop that
changes it (no data races on its dicts), and the server is one task of the
agent's task group, closed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgedi.agent.coordinator import CoordinatorStatistics
from edgedi.broker.messages import JobResult

if TYPE_CHECKING:
    from edgedi.agent.runtime import Agent

__all__ = ["AgentMetrics"]

logger = logging.getLogger(__name__)

# Job latency buckets, seconds: a tiny model on a loopback cluster takes tens of
# milliseconds, VGG-16 on Raspberry Pis seconds, a job that waits for a failover tens.
LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A scraper sends a few hundred bytes of request; anything slower or larger is cut off.
_REQUEST_TIMEOUT_S: Final = 5.0
_MAX_REQUEST_BYTES: Final = 16 * 1024
# The classic text format, what `generate_latest` writes for names like ours; every
# Prometheus version reads it (the library's own server answers with it too unless
# the scraper asks for the newer 1.0.0 escaping).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class AgentCollector(Collector):
    """Reads an agent's statistics when scraped."""

    def __init__(self, agent: Agent, metrics: AgentMetrics) -> None:
        self.agent = agent
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        info = GaugeMetricFamily(
            "edgedi_agent_info",
            "This agent: device id, cluster and session counter (always 1)",
            labels=["device", "cluster", "session"],
        )
        info.add_metric(
            [agent.device_id, agent.settings.broker.cluster, str(agent.session_counter)], 1
        )
        yield info
        yield from self._jobs()
        yield from self._worker()
        yield from self._session()
        now = time.monotonic()
        yield GaugeMetricFamily(
            "edgedi_membership_alive",
            "Devices this agent sees alive (itself included once announced)",
            value=len(agent.membership.alive(now)),
        )
        yield GaugeMetricFamily(
            "edgedi_leader_epoch",
            "Epoch of the leader this agent follows (-1 or 0: none yet)",
            value=agent.election.epoch,
        )
        yield GaugeMetricFamily(
            "edgedi_is_leader", "1 while this agent leads the cluster", value=int(agent.is_leader)
        )

    def _jobs(self) -> Iterator[Metric]:
        # Coordinators come and go with leadership terms: earlier terms' counts are
        # kept in `retired`, the current term's are read live.
        totals = CoordinatorStatistics()
        _add(totals, self.metrics.retired)
        coordinator = self.agent.coordinator
        if coordinator is not None:
            _add(totals, coordinator.statistics)
        yield _counter(
            "edgedi_jobs_submitted", "Jobs this agent took on as leader", totals.submitted
        )
        finished = CounterMetricFamily(
            "edgedi_jobs_finished",
            "Jobs this agent answered as leader, by status (refused ones are errors too)",
            labels=["status"],
        )
        finished.add_metric(["ok"], totals.completed)
        finished.add_metric(["error"], totals.errors)
        yield finished
        yield _counter(
            "edgedi_jobs_refused", "Jobs refused because the coordinator was full", totals.refused
        )
        yield _counter(
            "edgedi_jobs_duplicate",
            "Resubmitted job ids (answered from the cache or already running)",
            totals.duplicates,
        )
        yield _counter(
            "edgedi_tile_redispatches",
            "Tiles sent again after a failure or a device's departure",
            totals.redispatched,
        )
        yield _counter(
            "edgedi_tile_speculative_copies",
            "Extra copies of overdue tiles (the first result wins)",
            totals.speculative,
        )
        yield _counter(
            "edgedi_direct_fallbacks",
            "Direct data plane runs moved to the relayed path",
            totals.direct_fallbacks,
        )
        yield _counter(
            "edgedi_coordinator_dropped_messages",
            "Tile outcomes and partials the coordinator dropped (stale, unknown, malformed)",
            totals.dropped_messages,
        )

    def _worker(self) -> Iterator[Metric]:
        statistics = self.agent.worker.statistics
        tiles = CounterMetricFamily(
            "edgedi_worker_tiles",
            "Tile tasks (one segment of one job each) this device ended, by outcome",
            labels=["outcome"],
        )
        for outcome in ("completed", "failed", "cancelled", "refused", "stale_epoch"):
            tiles.add_metric([outcome], getattr(statistics, outcome))
        yield tiles
        yield _counter(
            "edgedi_worker_tiles_accepted", "Tile tasks this device accepted", statistics.accepted
        )
        yield _counter(
            "edgedi_tile_compute_seconds",
            "Seconds the compute thread spent on tiles (slowdown emulation included)",
            statistics.busy_seconds,
        )
        yield _counter(
            "edgedi_worker_gate_rounds",
            "Attention-gate rounds this device's tiles went through",
            statistics.gate_rounds,
        )
        yield GaugeMetricFamily(
            "edgedi_worker_busy_tiles",
            "Tiles running or queued on this device",
            value=self.agent.worker.busy_tiles,
        )

    def _session(self) -> Iterator[Metric]:
        try:
            session = self.agent.session
        except RuntimeError:  # not running (yet): no MQTT numbers
            return
        statistics = session.statistics
        yield _counter(
            "edgedi_mqtt_connects", "Successful connects to the broker", statistics.connects
        )
        yield _counter(
            "edgedi_mqtt_reconnects",
            "Connects after the first (the broker or the network was lost)",
            max(0, statistics.connects - 1),
        )
        yield _counter(
            "edgedi_mqtt_connection_failures",
            "Connection attempts that failed or connections that dropped",
            statistics.connection_failures,
        )
        yield GaugeMetricFamily(
            "edgedi_mqtt_connected",
            "1 while connected to the broker",
            value=int(session.connected.is_set()),
        )
        yield _counter(
            "edgedi_mqtt_sent_bytes",
            "Payload bytes published through the broker",
            statistics.bytes_sent,
        )
        yield _counter(
            "edgedi_mqtt_received_bytes",
            "Payload bytes received from the broker",
            statistics.bytes_received,
        )
        messages = CounterMetricFamily(
            "edgedi_mqtt_messages", "MQTT messages by direction", labels=["direction"]
        )
        messages.add_metric(["sent"], statistics.published)
        messages.add_metric(["received"], statistics.received)
        yield messages
        dropped = CounterMetricFamily(
            "edgedi_mqtt_dropped_messages",
            "Incoming messages not handled, by reason",
            labels=["reason"],
        )
        dropped.add_metric(["malformed"], statistics.dropped_malformed)
        dropped.add_metric(["overflow"], statistics.dropped_overflow)
        dropped.add_metric(["unrouted"], statistics.dropped_unrouted)
        dropped.add_metric(["handler_error"], statistics.handler_errors)
        yield dropped
        yield _counter(
            "edgedi_mqtt_publish_failures", "Publishes that failed", statistics.publish_failures
        )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _add(total: CoordinatorStatistics, more: CoordinatorStatistics) -> None:
    for field in fields(CoordinatorStatistics):
        setattr(total, field.name, getattr(total, field.name) + getattr(more, field.name))


class AgentMetrics:
    """One agent's registry, its job latency histogram and its HTTP server."""

    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.retired = CoordinatorStatistics()
        """Counts of this agent's earlier leadership terms."""
        self.job_latency = Histogram(
            "edgedi_job_latency_seconds",
            "End-to-end latency of the jobs this agent ran as leader (receipt to result)",
            ["status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(AgentCollector(agent, self))
        self.address: tuple[str, int] | None = None
        """(host, port) the server listens on, once it does."""
        self.listening = asyncio.Event()

    def retire(self, statistics: CoordinatorStatistics) -> None:
        """A leadership term ended: keep its counts (the coordinator object goes)."""
        _add(self.retired, statistics)

    def job_finished(self, result: JobResult) -> None:
        total_ms = result.latency_ms.get("total")
        if total_ms is not None:
            self.job_latency.labels(status=result.status).observe(total_ms / 1000.0)

    def render(self) -> bytes:
        """The text exposition format, as a scrape gets it."""
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> None:
        """Answer scrapes until cancelled. A port that cannot be bound is logged, not
        fatal: the agent's work matters more than its metrics."""
        try:
            server = await asyncio.start_server(self._handle, host, port, limit=_MAX_REQUEST_BYTES)
        except OSError as error:
            logger.error("metrics: cannot listen on %s:%d: %s", host, port, error)
            return
        async with server:
            sockname = server.sockets[0].getsockname()
            self.address = (str(sockname[0]), int(sockname[1]))
            self.listening.set()
            logger.info("metrics on http://%s:%d/metrics", *self.address)
            try:
                await server.serve_forever()
            finally:
                self.listening.clear()
                self.address = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, content_type = self._respond(head)
            head_only = head.startswith(b"HEAD ")
            writer.write(
                (
                    f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                + (b"" if head_only else body)
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            logger.debug("metrics: bad or slow request: %s", type(error).__name__)
        except ConnectionError as error:
            logger.debug("metrics: client went away: %s", error)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[str, bytes, str]:
        request = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(request) != 3 or request[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"GET or HEAD /metrics\n", "text/plain"
        path = request[1].split("?", 1)[0]
        if path not in ("/metrics", "/"):
            return "404 Not Found", b"metrics are at /metrics\n", "text/plain"
        return "200 OK", self.render(), CONTENT_TYPE
