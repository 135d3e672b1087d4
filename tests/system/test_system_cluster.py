"""Three `edgedi agent` processes on a real broker, driven as a user would drive them.

Results must equal single-process inference of the same model and weights; a plain
MQTT client (paho, not our code) must be able to read them as JSON; exactly one
leader is elected; jobs run concurrently; garbage does not stop an agent; and
`edgedi infer` works end to end.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as paho
import torch
from system_support import AGENTS, INPUT_SIZE, SystemCluster

from edgedi.agent.client import connect
from edgedi.broker.messages import JobResult
from edgedi.broker.topics import JOB_RESULT, PLANNER_LEADER
from edgedi.models.checkpoints import load_model
from edgedi.models.data import CLASSES, generate_image
from edgedi.models.training import normalize

RESULT_FIELDS = {
    "job_id",
    "status",
    "label",
    "class_name",
    "probabilities",
    "latency_ms",
    "plan_id",
    "strategy",
    "devices",
    "epoch",
    "model",
}


def image(seed: int) -> npt.NDArray[np.uint8]:
    return generate_image(seed % len(CLASSES), seed, INPUT_SIZE, seed // len(CLASSES))


def reference(model_name: str, picture: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    torch.set_num_threads(1)
    model, _ = load_model(model_name, INPUT_SIZE)
    with torch.inference_mode():
        logits = model(normalize(picture[None])).double()
    return torch.softmax(logits, dim=1).numpy().reshape(-1)


async def infer(cluster: SystemCluster, picture: Any, model: str, **options: Any) -> JobResult:
    async with connect(cluster.broker.host, cluster.broker.port, root=cluster.root) as client:
        return await client.infer(picture, model, timeout=30, **options)


class RawListener:
    """A paho client (not our code) subscribed to a topic filter, keeping what arrives."""

    def __init__(self, cluster: SystemCluster, topic_filter: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.arrived = threading.Condition()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(cluster.broker.host, cluster.broker.port)
        self.client.loop_start()
        self.client.subscribe(topic_filter, qos=1)
        assert subscribed.wait(5), "no SUBACK"

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self.arrived:
            self.messages.append((message.topic, message.payload, bool(message.retain)))
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[tuple[str, bytes, bool]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_results_equal_single_process_inference(system_cluster: SystemCluster) -> None:
    cases = [
        ("tiny-edgedi", None),
        ("tiny-edgedi", "equal"),
        ("tiny", "modnn"),
        ("tiny", "images"),
        ("resnet18-edgedi", None),
        ("resnet18-edgedi", "edgedi"),
    ]
    for seed, (model, strategy) in enumerate(cases):
        picture = image(seed)
        result = await infer(system_cluster, picture, model, strategy=strategy)
        assert result.status == "ok", result.error
        expected = reference(model, picture)
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-4)
        assert result.label == int(np.argmax(expected))
        assert result.class_name == CLASSES[result.label]
        assert set(result.devices) <= set(AGENTS)


async def test_a_plain_mqtt_client_reads_results_as_json(system_cluster: SystemCluster) -> None:
    listener = RawListener(system_cluster, f"{system_cluster.root.base}/results/#")
    try:
        result = await infer(system_cluster, image(7), "tiny-edgedi", strategy="equal")
        messages = await asyncio.to_thread(listener.wait_for, 1, 10.0)
    finally:
        listener.close()
    assert result.status == "ok", result.error
    topic, payload, retained = next(m for m in messages if f"/{result.job_id}/" in m[0])
    # results/<job_id>/<leader>: the leader's own id, which the broker's ACL binds.
    assert topic == JOB_RESULT.topic(
        system_cluster.root, job_id=result.job_id, device=result.sender
    )
    assert not retained
    document = json.loads(payload)
    assert set(document) >= RESULT_FIELDS
    assert document["status"] == "ok"
    assert document["class_name"] == CLASSES[document["label"]]
    assert abs(sum(document["probabilities"]) - 1.0) < 1e-6
    assert document["latency_ms"]["total"] > 0
    assert set(document["devices"]) == set(AGENTS)  # "equal" splits over all three


def test_exactly_one_leader_is_elected(system_cluster: SystemCluster) -> None:
    listener = RawListener(system_cluster, PLANNER_LEADER.topic(system_cluster.root))
    try:
        messages = listener.wait_for(1, 5.0)
    finally:
        listener.close()
    assert messages, "no retained leader record"
    record = json.loads(messages[-1][1])
    assert record["device"] in AGENTS
    # Each agent's own view, from its log: the same leader and epoch everywhere.
    views = {}
    for device in AGENTS:
        found = re.findall(r"leader view: (\S+) epoch (\d+)", system_cluster.log(device))
        assert found, f"{device} logged no leader view"
        views[device] = found[-1]
    assert set(views.values()) == {(record["device"], str(record["epoch"]))}
    claims = [d for d in AGENTS if "claims leadership" in system_cluster.log(d)]
    assert claims == [record["device"]]


async def test_two_jobs_in_flight_both_complete(system_cluster: SystemCluster) -> None:
    async with connect(
        system_cluster.broker.host, system_cluster.broker.port, root=system_cluster.root
    ) as client:
        pictures = [image(11), image(12)]
        started = time.perf_counter()
        results = await asyncio.gather(
            *(client.infer(p, "resnet18-edgedi", strategy="equal", timeout=30) for p in pictures)
        )
        elapsed = time.perf_counter() - started
    for picture, result in zip(pictures, results, strict=True):
        assert result.status == "ok", result.error
        np.testing.assert_allclose(
            result.probabilities, reference("resnet18-edgedi", picture), atol=1e-4
        )
    assert results[0].job_id != results[1].job_id
    assert elapsed < 30


def test_malformed_messages_do_not_stop_an_agent(system_cluster: SystemCluster) -> None:
    base = system_cluster.root.base
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}")
    client.connect(system_cluster.broker.host, system_cluster.broker.port)
    client.loop_start()
    try:
        for topic in (f"{base}/jobs/submit", f"{base}/devices/sys-2/tasks"):
            for payload in (b"\xc1garbage", b"{}", b'{"version": 2, "kind": "job_submit"}'):
                client.publish(topic, payload, qos=1).wait_for_publish(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()
    result = asyncio.run(infer(system_cluster, image(3), "tiny", strategy="equal"))
    assert result.status == "ok", result.error
    assert all(system_cluster.alive().values()), system_cluster.alive()


def test_edgedi_infer_end_to_end(system_cluster: SystemCluster) -> None:
    completed = subprocess.run(
        system_cluster.cli(
            "infer",
            "--broker",
            system_cluster.address,
            *system_cluster.root_arguments(),
            "--model",
            "tiny-edgedi",
            "--synthetic",
            "3",
            "--timeout",
            "30",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr + completed.stdout
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert re.search(r"\(label \d, p=0\.\d+\)", line), line
        assert any(name in line for name in CLASSES), line
