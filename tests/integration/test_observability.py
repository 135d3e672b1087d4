"""Metrics and Home Assistant discovery with real agents on the real broker fixture.

The metrics test scrapes a leader's port over HTTP (urllib, as Prometheus or curl
would) before and after a job and reads the numbers back with prometheus_client's
own parser. The discovery test reads the retained configs with a plain aiomqtt
client, then restarts the cluster with discovery off and sees them removed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
import uuid

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_support import running_cluster, sample_image

from edgedi.agent.client import connect
from edgedi.agent.runtime import Agent
from edgedi.broker.server import BrokerHandle
from edgedi.broker.topics import DEVICE_STATE, RESULT_SUMMARY, TopicRoot


def _scrape_text(agent: Agent, path: str = "/metrics") -> tuple[int, str, str]:
    assert agent.metrics.address is not None
    host, port = agent.metrics.address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


async def scrape(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the agent's metrics port: (name, sorted labels) → value."""
    async with asyncio.timeout(10):
        await agent.metrics.listening.wait()
    status, content_type, text = await asyncio.to_thread(_scrape_text, agent)
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_a_scrape_shows_the_counters_move_during_a_job(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(
        broker, topic_root, speeds=(1.0, 1.0), metrics={"port": 0}
    ) as cluster:
        await cluster.wait_for_plan()
        leader = cluster.leader()
        other = next(agent for agent in cluster.agents if agent is not leader)
        before = await scrape(leader)
        worker_before = await scrape(other)
        assert value(before, "edgedi_is_leader") == 1
        assert value(worker_before, "edgedi_is_leader") == 0
        assert value(before, "edgedi_leader_epoch") == leader.election.epoch >= 1
        assert value(worker_before, "edgedi_leader_epoch") == leader.election.epoch
        assert value(before, "edgedi_membership_alive") == 2
        assert value(before, "edgedi_mqtt_connects_total") >= 1
        assert value(before, "edgedi_mqtt_reconnects_total") == 0
        assert value(before, "edgedi_mqtt_connected") == 1
        assert value(before, "edgedi_jobs_finished_total", status="ok") == 0
        assert ("edgedi_job_latency_seconds_count", (("status", "ok"),)) not in before
        async with connect(broker.host, broker.port, root=topic_root) as client:
            result = await client.infer(sample_image(1), "tiny-edgedi", strategy="equal")
        assert result.status == "ok", result.error
        after = await scrape(leader)
        worker_after = await scrape(other)

    assert value(after, "edgedi_jobs_submitted_total") == 1
    assert value(after, "edgedi_jobs_finished_total", status="ok") == 1
    assert value(after, "edgedi_jobs_finished_total", status="error") == 0
    assert value(after, "edgedi_job_latency_seconds_count", status="ok") == 1
    total_s = result.latency_ms["total"] / 1000.0
    assert abs(value(after, "edgedi_job_latency_seconds_sum", status="ok") - total_s) < 1e-6
    assert value(after, "edgedi_job_latency_seconds_bucket", status="ok", le="+Inf") == 1
    # Both devices computed a tile of the equal split: the worker's numbers moved too.
    for samples_before, samples_after in ((before, after), (worker_before, worker_after)):
        assert value(samples_after, "edgedi_worker_tiles_total", outcome="completed") > value(
            samples_before, "edgedi_worker_tiles_total", outcome="completed"
        )
        assert value(samples_after, "edgedi_tile_compute_seconds_total") > value(
            samples_before, "edgedi_tile_compute_seconds_total"
        )
        assert value(samples_after, "edgedi_mqtt_sent_bytes_total") > value(
            samples_before, "edgedi_mqtt_sent_bytes_total"
        )
        assert value(samples_after, "edgedi_mqtt_received_bytes_total") > value(
            samples_before, "edgedi_mqtt_received_bytes_total"
        )
    # tiny-edgedi has attention gates: the tiles went through gate rounds.
    assert value(worker_after, "edgedi_worker_gate_rounds_total") > value(
        worker_before, "edgedi_worker_gate_rounds_total"
    )
    assert value(after, "edgedi_tile_redispatches_total") == 0
    assert value(after, "edgedi_tile_speculative_copies_total") == 0


async def test_the_metrics_port_answers_only_scrapes_and_survives_garbage(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    async with running_cluster(broker, topic_root, speeds=(1.0,), metrics={"port": 0}) as cluster:
        agent = cluster.agents[0]
        async with asyncio.timeout(20):
            await agent.metrics.listening.wait()
        assert agent.metrics.address is not None
        host, port = agent.metrics.address
        for request in (b"GET /nothing HTTP/1.1\r\n\r\n", b"POST /metrics HTTP/1.1\r\n\r\n"):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            response = await reader.read()
            writer.close()
            assert response.split(b"\r\n")[0] in (
                b"HTTP/1.0 404 Not Found",
                b"HTTP/1.0 405 Method Not Allowed",
            )
        # A request that never ends its headers, and one far too long, are cut off.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000)
        assert await reader.read() == b""
        writer.close()
        samples = await scrape(agent)
        assert (
            value(
                samples,
                "edgedi_agent_info",
                device=agent.device_id,
                cluster="test",
                session=str(agent.session_counter),
            )
            == 1
        )
    assert agent.metrics.address is None  # closed with the agent


async def test_a_taken_metrics_port_is_logged_and_the_agent_runs_on(
    broker: BrokerHandle, topic_root: TopicRoot, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with running_cluster(
            broker, topic_root, speeds=(1.0,), metrics={"port": port}
        ) as cluster:
            await cluster.wait_for_plan()
            agent = cluster.agents[0]
            assert agent.is_leader
            assert not agent.metrics.listening.is_set()
    assert f"metrics: cannot listen on 127.0.0.1:{port}" in caplog.text


async def retained(
    broker: BrokerHandle, topic_filter: str, settle_s: float = 1.0
) -> dict[str, bytes]:
    """Every retained message under `topic_filter`, read with a plain MQTT client."""
    found: dict[str, bytes] = {}
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"reader-{uuid.uuid4().hex[:8]}"
    ) as client:
        await client.subscribe(topic_filter, qos=1)
        try:
            async with asyncio.timeout(settle_s):
                async for message in client.messages:
                    payload = message.payload
                    assert isinstance(payload, bytes)
                    # amqtt also sends retained messages of other clients' filters.
                    if message.retain and payload and message.topic.matches(topic_filter):
                        found[message.topic.value] = payload
        except TimeoutError:
            pass
    return found


async def test_home_assistant_discovery_is_published_and_removed(
    broker: BrokerHandle, topic_root: TopicRoot
) -> None:
    prefix = f"ha-{uuid.uuid4().hex[:8]}"
    on = {"discovery": True, "discovery_prefix": prefix}
    async with running_cluster(broker, topic_root, speeds=(1.0, 1.0), home_assistant=on) as cluster:
        await cluster.wait_for_plan()
        leader = cluster.leader()
        async with connect(broker.host, broker.port, root=topic_root) as client:
            result = await client.infer(sample_image(2), "tiny-edgedi", strategy="equal")
        assert result.status == "ok", result.error
        summary_topic = RESULT_SUMMARY.topic(topic_root)
        async with asyncio.timeout(10):
            while True:
                configs = await retained(broker, f"{prefix}/#")
                summaries = await retained(broker, summary_topic, settle_s=0.3)
                if len(configs) == 5 and summaries:
                    break

    devices = {agent.device_id for agent in cluster.agents}
    for device in devices:
        payload = json.loads(configs[f"{prefix}/binary_sensor/{device}/connectivity/config"])
        assert payload["device_class"] == "connectivity"
        assert payload["state_topic"] == DEVICE_STATE.topic(topic_root, device=device)
        assert payload["unique_id"] == f"edgedi_{device}_connectivity"
        assert payload["device"]["identifiers"] == [f"edgedi_{device}"]
        assert "status" in payload["value_template"]
    leader_state = DEVICE_STATE.topic(topic_root, device=leader.device_id)
    for name in ("last_class", "confidence", "latency"):
        payload = json.loads(configs[f"{prefix}/sensor/edgedi_test/{name}/config"])
        assert payload["state_topic"] == summary_topic
        assert payload["unique_id"] == f"edgedi_test_{name}"
        assert payload["availability"] == [
            {"topic": leader_state, "value_template": payload["availability"][0]["value_template"]}
        ]
        assert payload["device"]["identifiers"] == ["edgedi_cluster_test"]
        assert "value_json" in payload["value_template"]
    assert (
        json.loads(configs[f"{prefix}/sensor/edgedi_test/latency/config"])["unit_of_measurement"]
        == "ms"
    )
    last = json.loads(summaries[summary_topic])
    assert last["job_id"] == result.job_id
    assert last["class_name"] == result.class_name
    assert last["probabilities"] == list(result.probabilities)
    assert last["latency_ms"]["total"] == result.latency_ms["total"]
    assert last["trace"] == []

    # The same devices again with discovery off: everything they published goes.
    async with running_cluster(
        broker, topic_root, speeds=(1.0, 1.0), home_assistant={"discovery_prefix": prefix}
    ) as cluster:
        await cluster.wait_for_plan()
        async with asyncio.timeout(15):
            while True:
                left = await retained(broker, f"{prefix}/#")
                left |= await retained(broker, summary_topic, settle_s=0.3)
                if not left:
                    break
