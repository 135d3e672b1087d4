"""One set of connection options for every command (edgedi.agent.connection).

The flags parse the same way for `agent`, `infer`, `status`, `watch` and `demo`;
flags, the `EDGEDI_BROKER__*` environment and the YAML file's `broker:` section fill the
one settings object (`BrokerSettings`) in that order of strength; a password file
and TLS files are checked before anything connects.
"""

from __future__ import annotations

import argparse
import importlib
import ssl
import subprocess
from pathlib import Path

import pytest

from edgedi.agent.config import BrokerSettings, ConfigError, load_connection, load_settings
from edgedi.agent.connection import (
    connection_overrides,
    describe,
    load_from_arguments,
    session_settings,
    tls_context,
)
from edgedi.broker.connection import MqttSession
from edgedi.broker.topics import DEVICE_BIRTH, PLAN_CURRENT, TopicRoot

COMMANDS = ("agent", "infer", "status", "watch", "demo")


def _parse(command: str, arguments: list[str]) -> argparse.Namespace:
    module = importlib.import_module(f"edgedi.agent.commands.{command}")
    parser = argparse.ArgumentParser(prog=f"edgedi {command}")
    module.add_arguments(parser)
    return parser.parse_args(arguments)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("password", "ca.crt", "client.crt", "client.key")}
    paths["password"].write_text("s3cret\n")
    for name in ("ca.crt", "client.crt", "client.key"):
        paths[name].write_text("placeholder\n")
    return paths


def test_every_command_takes_the_same_connection_flags(files: dict[str, Path]) -> None:
    flags = [
        "--broker", "mqtt.lan:8883", "--cluster", "line-3", "--topic-root", "plant/v1",
        "--username", "camera", "--password-file", str(files["password"]),
        "--tls-ca", str(files["ca.crt"]),
        "--tls-cert", str(files["client.crt"]), "--tls-key", str(files["client.key"]),
    ]  # fmt: skip
    parsed = {command: connection_overrides(_parse(command, flags)) for command in COMMANDS}
    assert all(values == parsed["status"] for values in parsed.values()), parsed
    broker = load_from_arguments(_parse("infer", flags), environ={})
    assert (broker.host, broker.port, broker.cluster, broker.topic_root) == (
        "mqtt.lan",
        8883,
        "line-3",
        "plant/v1",
    )
    assert (broker.username, broker.password) == ("camera", "s3cret")
    assert broker.uses_tls and describe(broker) == "mqtt.lan:8883 (TLS)"
    # The agent reads the same flags into the same section of its settings.
    agent = _parse("agent", [*flags, "--id", "pi-1"])
    settings = load_settings(None, {"device_id": "pi-1", "broker": connection_overrides(agent)}, {})
    assert settings.broker.password == "s3cret"
    assert settings.broker.tls_certfile == files["client.crt"]


def test_flags_beat_the_environment_which_beats_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.yaml"
    # An agent's file: the client takes its broker section and ignores the rest.
    config.write_text(
        "device_id: pi-1\ncompute:\n  threads: 2\n"
        "broker:\n  host: from-file\n  port: 1884\n  cluster: file-cluster\n  username: pi-1\n"
    )
    monkeypatch.setenv("EDGEDI_BROKER__PORT", "1885")
    monkeypatch.setenv("EDGEDI_BROKER__CLUSTER", "env-cluster")
    broker = load_connection(config, {"broker": {"cluster": "flag-cluster"}}, environ={})
    assert (broker.host, broker.port, broker.cluster, broker.username) == (
        "from-file",
        1885,
        "flag-cluster",
        "pi-1",
    )
    assert not broker.uses_tls


def test_bad_files_are_reported_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_connection(
            None,
            {"broker": {"tls_ca_file": tmp_path / "nowhere.crt", "password_file": tmp_path}},
            environ={},
        )
    assert any("no such file" in line for line in raised.value.lines), raised.value.lines
    key = tmp_path / "client.key"
    key.write_text("k")
    with pytest.raises(ConfigError, match="tls_keyfile needs tls_certfile"):
        load_connection(None, {"broker": {"tls_keyfile": key}}, environ={})
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_connection(tmp_path / "absent.yaml", {}, environ={})


def test_the_systemd_credential_is_used_unless_a_password_file_is_named(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("from-systemd\n")
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert load_connection(None, {}, environ).password == "from-systemd"
    named = load_connection(None, {"broker": {"password_file": files["password"]}}, environ)
    assert named.password == "s3cret"


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key (openssl)."""
    certificate, key = folder / "self.crt", folder / "self.key"
    try:
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-subj", "/CN=edgedi-test", "-days", "1",
                "-keyout", str(key), "-out", str(certificate),
            ],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"openssl cannot make a certificate here: {error}")
    return certificate, key


def test_tls_context_checks_the_broker_and_presents_the_client_certificate(
    tmp_path: Path,
) -> None:
    certificate, key = _certificate(tmp_path)
    broker = BrokerSettings(tls_ca_file=certificate, tls_certfile=certificate, tls_keyfile=key)
    context = tls_context(broker)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "edgedi-test"),),)]
    assert tls_context(BrokerSettings()) is None
    assert tls_context(BrokerSettings(tls=True)) is not None
    settings = session_settings(broker.model_copy(update={"password": "pw"}), "client-1")
    assert settings.password is not None and settings.password.get_secret_value() == "pw"


def test_a_refused_subscription_is_remembered_until_granted() -> None:
    root = TopicRoot("test", "unit")
    session = MqttSession(session_settings(BrokerSettings(), "unit"), root)
    birth, plan = DEVICE_BIRTH.filter(root), PLAN_CURRENT.filter(root)
    session._note_granted([birth, plan], [1, 0x80])
    assert session.refused_subscriptions == {plan: 0x80}
    session._note_granted([plan], [1])  # granted on a later connection
    assert session.refused_subscriptions == {}
