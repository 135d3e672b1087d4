"""Session set-up shared by the read-only commands (status, watch).

The connection flags are every command's (`edgedi.agent.connection`). What these
commands subscribe to is mostly retained: where the broker refuses a subscription
(a SUBACK failure code) they say "not authorised for TOPIC"; where it grants the
subscription and then withholds the records (Mosquitto's ACL works on delivery)
they can only say which retained records never came, and that the account may not
be allowed to read them (`missing_records`).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from edgedi.agent.connection import add_connection_arguments

if TYPE_CHECKING:
    from edgedi.agent.config import BrokerSettings
    from edgedi.broker.connection import MqttSession
    from edgedi.broker.topics import TopicRoot, TopicSpec

__all__ = [
    "Observer",
    "add_connection_arguments",
    "missing_records",
    "observer_session",
    "refusal",
]


class Observer(NamedTuple):
    session: MqttSession
    root: TopicRoot
    address: str  # host:port, for messages to the user
    broker: BrokerSettings


def observer_session(args: argparse.Namespace, client_prefix: str) -> Observer | None:
    """An MQTT session for the connection flags; None (after saying why) on bad settings."""
    from edgedi.agent.config import ConfigError
    from edgedi.agent.connection import (
        describe,
        load_from_arguments,
        session_settings,
        tls_context,
        topic_root,
    )
    from edgedi.broker.connection import MqttSession
    from edgedi.broker.errors import BrokerError

    try:
        broker = load_from_arguments(args)
    except ConfigError as error:
        for line in error.lines:
            print(line, file=sys.stderr)
        return None
    try:
        root = topic_root(broker)
    except BrokerError as error:
        print(f"bad topic root: {error}", file=sys.stderr)
        return None
    settings = session_settings(broker, f"{client_prefix}-{uuid.uuid4().hex[:12]}")
    session = MqttSession(settings, root, tls_context=tls_context(broker))
    return Observer(session, root, describe(broker), broker)


def refusal(session: MqttSession) -> str | None:
    """ "not authorised for TOPIC: ..." for the first subscription the broker refused."""
    from edgedi.broker.errors import NotAuthorised

    for topic_filter, code in session.refused_subscriptions.items():
        return str(
            NotAuthorised(
                topic_filter, f"the broker refused the subscription (reason code {code:#x})"
            )
        )
    return None


def missing_records(observer: Observer, specs: Iterable[TopicSpec], waited_s: float) -> list[str]:
    """One line per retained topic of `specs` of which nothing arrived in `waited_s`."""
    account = observer.broker.username or "anonymous"
    return [
        f"no retained record on {spec.filter(observer.root)} within {waited_s:g} s: none is "
        f"published, or the account {account} is not authorised to read it"
        for spec in specs
    ]
