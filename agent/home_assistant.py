"""Home Assistant MQTT discovery (`home_assistant.discovery`, off by default).

Home Assistant creates entities from retained JSON configs on
`<discovery_prefix>/<component>/<node_id>/<object_id>/config`; an empty retained
payload on the same topic removes the entity. edgedi publishes:

- per device, by that device: a `binary_sensor` of device class `connectivity`
  that reads the device's own retained state topic (`devices/<id>/state`:
  `online`, `stopped`, or `offline` from the MQTT Last Will). Its node id is the
  device id (`.` becomes `_`, which Home Assistant does not allow), so the
  broker's ACL can bind the topic to the device's login: grant
  `<prefix>/+/<node id>/#`. It declares no availability of its own: it *is* the
  availability, and an unavailable entity would hide `off`.
- per cluster, by the leader: `sensor`s of the last defect class, its confidence
  and the job's latency, all read from the retained `summary/last_result` (the
  last job's `JobResult` without its trace) that the leader publishes after every
  job. Node id `edgedi_<cluster>`. They are available while the leader that
  published them is `online` (a new leader publishes them again with its own
  state topic).

With discovery off, a device clears its own config once connected, and a leader
clears the cluster's configs and the summary when it starts leading: turning the
setting off removes the entities at the next start.

The configs are retained, so they are published again after every reconnect (a
restarted broker without persistence has lost them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Final

from edgedi.broker.errors import BrokerError
from edgedi.broker.messages import JobResult
from edgedi.broker.topics import DEVICE_STATE, RESULT_SUMMARY, Publication

if TYPE_CHECKING:
    from edgedi.agent.runtime import Agent

__all__ = ["HomeAssistant", "cluster_configs", "device_config", "discovery_topic", "node_id"]

logger = logging.getLogger(__name__)

_TICK_S: Final = 1.0
_PUBLISH_TIMEOUT_S: Final = 5.0
_AVAILABLE: Final = "{{ 'online' if value_json.status == 'online' else 'offline' }}"


def _software_version() -> str:
    try:
        return version("edgedi")
    except PackageNotFoundError:  # a source tree without installation
        return "unknown"


def node_id(name: str) -> str:
    """A Home Assistant node id (`[A-Za-z0-9_-]+`) for a device id or cluster name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _origin() -> dict[str, str]:
    return {"name": "edgedi", "sw_version": _software_version()}


def _cluster_device(cluster: str) -> dict[str, Any]:
    return {
        "identifiers": [f"edgedi_cluster_{node_id(cluster)}"],
        "name": f"edgedi cluster {cluster}",
        "manufacturer": "edgedi",
        "model": "inference cluster",
    }


def discovery_topic(prefix: str, component: str, node: str, object_id: str) -> str:
    return f"{prefix}/{component}/{node}/{object_id}/config"


def device_config(
    prefix: str, state_topic: str, device_id: str, cluster: str
) -> tuple[str, dict[str, Any]]:
    """The topic and payload of one device's connectivity binary sensor."""
    node = node_id(device_id)
    payload = {
        "name": "Connectivity",
        "unique_id": f"edgedi_{node}_connectivity",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "state_topic": state_topic,
        "value_template": "{{ 'ON' if value_json.status == 'online' else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        "qos": 1,
        "device": {
            "identifiers": [f"edgedi_{node}"],
            "name": f"edgedi {device_id}",
            "manufacturer": "edgedi",
            "model": "edgedi agent",
            "sw_version": _software_version(),
            "via_device": _cluster_device(cluster)["identifiers"][0],
        },
        "origin": _origin(),
    }
    return discovery_topic(prefix, "binary_sensor", node, "connectivity"), payload


def cluster_configs(
    prefix: str, summary_topic: str, leader_state_topic: str, cluster: str
) -> dict[str, dict[str, Any]]:
    """Topic → payload of the cluster's sensors (published by the leader)."""
    node = f"edgedi_{node_id(cluster)}"
    common: dict[str, Any] = {
        "state_topic": summary_topic,
        "qos": 1,
        "availability": [{"topic": leader_state_topic, "value_template": _AVAILABLE}],
        "availability_mode": "any",
        "device": _cluster_device(cluster),
        "origin": _origin(),
    }
    sensors: dict[str, dict[str, Any]] = {
        "last_class": {
            "name": "Last defect class",
            "icon": "mdi:magnify-scan",
            "value_template": (
                "{{ value_json.class_name if value_json.status == 'ok' else 'error' }}"
            ),
            # Every field of the last result (job id, model, devices, error) as attributes.
            "json_attributes_topic": summary_topic,
        },
        "confidence": {
            "name": "Last confidence",
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "suggested_display_precision": 1,
            "value_template": (
                "{{ ((value_json.probabilities | max) * 100) | round(2) "
                "if value_json.probabilities else None }}"
            ),
        },
        "latency": {
            "name": "Last latency",
            "device_class": "duration",
            "unit_of_measurement": "ms",
            "state_class": "measurement",
            "suggested_display_precision": 0,
            "value_template": (
                "{{ value_json.latency_ms.total if 'total' in value_json.latency_ms else None }}"
            ),
        },
    }
    return {
        discovery_topic(prefix, "sensor", node, name): {
            **sensor,
            "unique_id": f"edgedi_{node_id(cluster)}_{name}",
            **common,
        }
        for name, sensor in sensors.items()
    }


class HomeAssistant:
    """Keeps this agent's discovery configs (and, leading, the summary) on the broker."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.settings = agent.settings.home_assistant
        self._last: JobResult | None = None
        self._wake = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.settings.discovery

    def job_finished(self, result: JobResult) -> None:
        """The leader's coordinator finished a job: its summary is published soon."""
        if self.enabled:
            self._last = result
            self._wake.set()

    async def run(self) -> None:
        """Until cancelled: publish (or clear) after every (re)connect and leadership."""
        agent = self.agent
        session = agent.session
        device_done: int | None = None  # the connection the device config went out on
        cluster_done: tuple[int, int] | None = None  # (connection, epoch) of the cluster's
        while True:
            try:
                async with asyncio.timeout(_TICK_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if not session.connected.is_set():
                continue
            connection = session.statistics.connects
            try:
                if device_done != connection and (self.enabled or device_done is None):
                    await self._publish_device()
                    device_done = connection
                leading = agent.is_leader
                term = (connection, agent.election.epoch)
                if leading and cluster_done != term and (self.enabled or cluster_done is None):
                    await self._publish_cluster()
                    cluster_done = term
                last, self._last = self._last, None
                if last is not None and leading:
                    await self._publish_summary(last)
            except BrokerError as error:
                logger.warning("Home Assistant discovery: publish failed: %s", error)

    async def _publish(self, topic: str, payload: dict[str, Any] | None) -> None:
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        await self.agent.session.publish_raw(
            Publication(topic, body, qos=1, retain=True), timeout=_PUBLISH_TIMEOUT_S
        )

    async def _publish_device(self) -> None:
        agent = self.agent
        topic, payload = device_config(
            self.settings.discovery_prefix,
            DEVICE_STATE.topic(agent.root, device=agent.device_id),
            agent.device_id,
            agent.root.cluster,
        )
        await self._publish(topic, payload if self.enabled else None)

    async def _publish_cluster(self) -> None:
        agent = self.agent
        configs = cluster_configs(
            self.settings.discovery_prefix,
            RESULT_SUMMARY.topic(agent.root),
            DEVICE_STATE.topic(agent.root, device=agent.device_id),
            agent.root.cluster,
        )
        for topic, payload in configs.items():
            await self._publish(topic, payload if self.enabled else None)
        if not self.enabled:
            await agent.session.clear_retained(RESULT_SUMMARY, timeout=_PUBLISH_TIMEOUT_S)
        logger.info(
            "Home Assistant discovery: cluster sensors %s",
            "published" if self.enabled else "cleared",
        )

    async def _publish_summary(self, result: JobResult) -> None:
        summary = result.model_copy(update={"trace": (), "predicted_trace": ()})
        await self.agent.session.publish(RESULT_SUMMARY, summary, timeout=_PUBLISH_TIMEOUT_S)
