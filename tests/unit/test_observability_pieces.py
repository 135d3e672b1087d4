"""Metrics and Home Assistant discovery, piece by piece: settings, flags, the numbers
an agent that is not running exposes, and the discovery payloads.

The scrape of a running cluster and the retained configs on a real broker are in
tests/integration/test_observability.py.
"""

from __future__ import annotations

import argparse
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgedi.agent.commands.agent import _overrides, add_arguments
from edgedi.agent.config import AgentSettings, ConfigError, load_settings
from edgedi.agent.coordinator import CoordinatorStatistics
from edgedi.agent.home_assistant import cluster_configs, device_config, node_id
from edgedi.agent.runtime import Agent
from edgedi.broker.messages import JobResult, encode


def _settings(*flags: str) -> AgentSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_settings(
        overrides=_overrides(parser.parse_args(["--id", "pi-1", *flags])), environ={}
    )


def test_metrics_and_discovery_are_off_unless_asked_for() -> None:
    settings = _settings()
    assert settings.metrics.port is None
    assert settings.metrics.host == "127.0.0.1"
    assert settings.home_assistant.discovery is False
    on = _settings("--metrics-port", "9464", "--metrics-host", "0.0.0.0", "--home-assistant")
    assert (on.metrics.port, on.metrics.host) == (9464, "0.0.0.0")
    assert on.home_assistant.discovery is True
    assert _settings("--no-home-assistant").home_assistant.discovery is False


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (("--metrics-port", "70000"), "metrics.port"),
        (("--metrics-port", "-1"), "metrics.port"),
    ],
)
def test_bad_metrics_settings_are_refused(flags: tuple[str, ...], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _settings(*flags)
    assert any(line.startswith(f"{field}:") for line in raised.value.lines)


@pytest.mark.parametrize("prefix", ["", "a/#", "a/+/b", "/ha", "ha/", "h a"])
def test_a_discovery_prefix_must_be_plain_topic_levels(prefix: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(
            overrides={"device_id": "pi-1", "home_assistant": {"discovery_prefix": prefix}},
            environ={},
        )
    assert raised.value.lines[0].startswith("home_assistant.discovery_prefix:")


def _samples(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = agent.metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counts_of_earlier_leadership_terms_are_kept() -> None:
    agent = Agent(_settings())
    try:
        assert _samples(agent)[("edgedi_jobs_finished_total", (("status", "ok"),))] == 0
        agent.metrics.retire(CoordinatorStatistics(submitted=3, completed=2, errors=1))
        agent.metrics.retire(CoordinatorStatistics(submitted=1, completed=1, redispatched=4))
        result = JobResult(sender="pi-1", job_id="j-1", status="ok", latency_ms={"total": 120.0})
        agent.metrics.job_finished(result)
        samples = _samples(agent)
    finally:
        agent.executor.shutdown()
    assert samples[("edgedi_jobs_submitted_total", ())] == 4
    assert samples[("edgedi_jobs_finished_total", (("status", "ok"),))] == 3
    assert samples[("edgedi_jobs_finished_total", (("status", "error"),))] == 1
    assert samples[("edgedi_tile_redispatches_total", ())] == 4
    assert samples[("edgedi_job_latency_seconds_count", (("status", "ok"),))] == 1
    assert samples[("edgedi_job_latency_seconds_sum", (("status", "ok"),))] == pytest.approx(0.12)
    assert samples[("edgedi_job_latency_seconds_bucket", (("le", "0.1"), ("status", "ok")))] == 0
    assert samples[("edgedi_job_latency_seconds_bucket", (("le", "0.25"), ("status", "ok")))] == 1
    # Not running: no MQTT session to report on, and nothing else breaks the scrape.
    assert not any(name.startswith("edgedi_mqtt_") for name, _ in samples)
    assert samples[("edgedi_is_leader", ())] == 0


def test_two_agents_in_one_process_have_their_own_registries() -> None:
    first, second = Agent(_settings()), Agent(_settings())
    try:
        first.metrics.retire(CoordinatorStatistics(submitted=5))
        assert _samples(first)[("edgedi_jobs_submitted_total", ())] == 5
        assert _samples(second)[("edgedi_jobs_submitted_total", ())] == 0
    finally:
        first.executor.shutdown()
        second.executor.shutdown()


def test_node_ids_are_what_home_assistant_accepts() -> None:
    assert node_id("pi-1") == "pi-1"
    assert node_id("pi.kitchen_2") == "pi_kitchen_2"


def test_device_config_follows_the_discovery_conventions() -> None:
    topic, payload = device_config(
        "homeassistant", "edgedi/v1/line-3/devices/pi.4/state", "pi.4", "line-3"
    )
    assert topic == "homeassistant/binary_sensor/pi_4/connectivity/config"
    assert payload["state_topic"] == "edgedi/v1/line-3/devices/pi.4/state"
    assert payload["device_class"] == "connectivity"
    assert payload["unique_id"] == "edgedi_pi_4_connectivity"
    assert payload["device"]["identifiers"] == ["edgedi_pi_4"]
    assert payload["device"]["via_device"] == "edgedi_cluster_line-3"
    assert payload["origin"]["name"] == "edgedi"
    json.dumps(payload)  # plain JSON


def test_cluster_sensors_share_one_device_and_the_leaders_availability() -> None:
    configs = cluster_configs(
        "ha/discovery",
        "edgedi/v1/line-3/summary/last_result",
        "edgedi/v1/line-3/devices/pi-1/state",
        "line-3",
    )
    assert sorted(configs) == [
        f"ha/discovery/sensor/edgedi_line-3/{name}/config"
        for name in ("confidence", "last_class", "latency")
    ]
    unique_ids = {payload["unique_id"] for payload in configs.values()}
    assert len(unique_ids) == 3
    for payload in configs.values():
        assert payload["state_topic"] == "edgedi/v1/line-3/summary/last_result"
        assert payload["availability"][0]["topic"] == "edgedi/v1/line-3/devices/pi-1/state"
        assert payload["device"]["identifiers"] == ["edgedi_cluster_line-3"]
        assert (
            payload["value_template"].startswith("{{") and "value_json" in payload["value_template"]
        )


def test_the_value_templates_read_a_real_result() -> None:
    """Home Assistant's templates are Jinja: render them on a result as HA would."""
    jinja2 = pytest.importorskip("jinja2")
    environment = jinja2.Environment()
    configs = cluster_configs("homeassistant", "s", "edgedi/v1/d/devices/pi-1/state", "d")
    ok = JobResult(
        sender="pi-1",
        job_id="j-1",
        status="ok",
        class_name="scratches",
        probabilities=(0.1, 0.75, 0.15),
        latency_ms={"total": 84.5},
    )
    error = JobResult(sender="pi-1", job_id="j-2", status="error", error="no workers")

    def render(name: str, result: JobResult) -> str:
        template = configs[f"homeassistant/sensor/edgedi_d/{name}/config"]["value_template"]
        return environment.from_string(template).render(value_json=json.loads(encode(result)))

    assert render("last_class", ok) == "scratches"
    assert render("confidence", ok) == "75.0"
    assert render("latency", ok) == "84.5"
    assert render("last_class", error) == "error"
    assert render("confidence", error) == "None"  # Home Assistant: unknown
    assert render("latency", error) == "None"
    available = configs["homeassistant/sensor/edgedi_d/latency/config"]["availability"][0]
    for status, expected in (("online", "online"), ("offline", "offline"), ("stopped", "offline")):
        text = environment.from_string(available["value_template"]).render(
            value_json={"status": status}
        )
        assert text == expected
    _, device = device_config("homeassistant", "t", "pi-1", "d")
    for status, expected in (("online", "ON"), ("offline", "OFF"), ("stopped", "OFF")):
        text = environment.from_string(device["value_template"]).render(
            value_json={"status": status}
        )
        assert text == expected
