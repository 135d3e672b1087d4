"""How every command reaches the broker: one set of flags, one settings object.

`edgedi agent`, `infer`, `status` and `watch` take the same connection flags
(`add_connection_arguments`): broker address, cluster and topic root, user name,
password file, TLS (CA bundle, client certificate and key). They fill the
`broker` section of the settings (`edgedi.agent.config.BrokerSettings`), which
the `EDGEDI_BROKER__*` environment variables and the `broker:` section of the
YAML file given with `--config` fill too: flags first, then the environment, then
the file. The agent's own file serves a client command on the same device.

`session_settings` and `tls_context` turn those settings into what
`edgedi.broker.connection.MqttSession` takes, for the agent and the clients alike.
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgedi.agent.config import BrokerSettings, load_connection

if TYPE_CHECKING:
    from edgedi.broker.connection import SessionSettings
    from edgedi.broker.topics import TopicRoot

__all__ = [
    "add_connection_arguments",
    "broker_address",
    "connection_overrides",
    "describe",
    "load_from_arguments",
    "session_settings",
    "tls_context",
    "topic_root",
]


def broker_address(text: str) -> tuple[str, int | None]:
    """`HOST`, `HOST:PORT` or `[IPv6]:PORT`."""
    host, port = text, None
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0:
            raise argparse.ArgumentTypeError(f"bad broker address {text!r}")
        host, rest = text[1:closing], text[closing + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"bad broker address {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise argparse.ArgumentTypeError(f"bad broker address {text!r}: no host")
    if port is None:
        return host, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"bad broker port in {text!r}")
    return host, int(port)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection flags every command that talks to a cluster shares.

    Every default is None ("not given"), so the environment and the file can set
    what the command line does not."""
    group = parser.add_argument_group(
        "connection", "the broker and the cluster (also EDGEDI_BROKER__* and --config's broker:)"
    )
    group.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML settings file (its broker: section)"
    )
    group.add_argument(
        "--broker",
        type=broker_address,
        metavar="HOST[:PORT]",
        help="MQTT broker (default 127.0.0.1:1883)",
    )
    group.add_argument(
        "--cluster", metavar="NAME", help="cluster name (one topic level; default 'default')"
    )
    group.add_argument(
        "--topic-root", metavar="PREFIX", help="topic prefix of the fleet (default edgedi/v1)"
    )
    group.add_argument("--username", metavar="NAME", help="MQTT user name")
    group.add_argument(
        "--password-file", type=Path, metavar="FILE", help="file holding the MQTT password"
    )
    group.add_argument(
        "--tls",
        action="store_const",
        const=True,
        default=None,
        help="connect with TLS (implied by --tls-ca and --tls-cert; without --tls-ca the "
        "system's CA store checks the broker)",
    )
    group.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="CA bundle that signed the broker's certificate"
    )
    group.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="client certificate, for brokers that ask"
    )
    group.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="private key of --tls-cert (PEM)"
    )


def connection_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `broker` section's values given on the command line (None: not given)."""
    host, port = args.broker if args.broker is not None else (None, None)
    return {
        "host": host,
        "port": port,
        "cluster": args.cluster,
        "topic_root": args.topic_root,
        "username": args.username,
        "password_file": args.password_file,
        "tls": args.tls,
        "tls_ca_file": args.tls_ca,
        "tls_certfile": args.tls_cert,
        "tls_keyfile": args.tls_key,
    }


def load_from_arguments(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> BrokerSettings:
    """The broker settings of a client command; `ConfigError` with readable lines."""
    return load_connection(args.config, {"broker": connection_overrides(args)}, environ)


def tls_context(broker: BrokerSettings) -> ssl.SSLContext | None:
    """A client TLS context for `broker`, or None for plain MQTT.

    Certificate and host name checks stay on: the broker's certificate must name the
    host the settings give (the role's certificate names the broker's host)."""
    if not broker.uses_tls:
        return None
    context = ssl.create_default_context(
        cafile=str(broker.tls_ca_file) if broker.tls_ca_file is not None else None
    )
    if broker.tls_certfile is not None:
        context.load_cert_chain(
            str(broker.tls_certfile),
            str(broker.tls_keyfile) if broker.tls_keyfile is not None else None,
        )
    return context


def session_settings(broker: BrokerSettings, client_id: str, **extra: Any) -> SessionSettings:
    """`SessionSettings` for `broker` under `client_id` (`extra`: its other fields)."""
    from edgedi.broker.connection import SessionSettings

    return SessionSettings(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        username=broker.username,
        password=broker.password,  # type: ignore[arg-type]  # pydantic: str -> SecretStr
        keepalive_seconds=broker.keepalive_s,
        **extra,
    )


def topic_root(broker: BrokerSettings) -> TopicRoot:
    """The cluster's topic root; `BrokerError` (UnknownTopic) when it is not a valid one."""
    from edgedi.broker.topics import TopicRoot

    return TopicRoot(broker.topic_root, broker.cluster)


def describe(broker: BrokerSettings) -> str:
    """`host:port` (and `, TLS`) for messages to the user."""
    host = f"[{broker.host}]" if ":" in broker.host else broker.host
    return f"{host}:{broker.port}" + (" (TLS)" if broker.uses_tls else "")
