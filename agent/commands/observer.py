"""Connection flags and session set-up shared by the read-only commands (status, watch)."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from edgedi.agent.commands.agent import broker_address

if TYPE_CHECKING:
    from edgedi.broker.connection import MqttSession
    from edgedi.broker.topics import TopicRoot


class Observer(NamedTuple):
    session: MqttSession
    root: TopicRoot
    address: str  # host:port, for messages to the user


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker", type=broker_address, default=("127.0.0.1", 1883), metavar="HOST:PORT"
    )
    parser.add_argument("--cluster", default="default", help="cluster name")
    parser.add_argument("--topic-root", default="edgedi/v1", help="topic prefix")
    parser.add_argument("--username", help="MQTT user name")
    parser.add_argument("--password-file", type=Path, help="file holding the MQTT password")


def observer_session(args: argparse.Namespace, client_prefix: str) -> Observer | None:
    """An MQTT session for the flags above; None (after saying why) on a bad topic root."""
    from edgedi.broker.connection import MqttSession, SessionSettings
    from edgedi.broker.errors import BrokerError
    from edgedi.broker.topics import TopicRoot

    host, port = args.broker
    password = args.password_file.read_text().strip() if args.password_file else None
    settings = SessionSettings(
        host=host,
        port=port or 1883,
        client_id=f"{client_prefix}-{uuid.uuid4().hex[:12]}",
        username=args.username,
        password=password,  # pydantic turns a str into a SecretStr
    )
    try:
        root = TopicRoot(args.topic_root, args.cluster)
    except BrokerError as error:
        print(f"bad topic root: {error}", file=sys.stderr)
        return None
    return Observer(MqttSession(settings, root), root, f"{host}:{settings.port}")
