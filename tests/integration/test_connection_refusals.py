"""A broker that refuses subscriptions in its SUBACK: the commands say so.

The embedded amqtt broker with its topic ACL plugin answers a subscription the
account may not make with the MQTT 3.1.1 failure code 0x80. `edgedi status`,
`watch` and `infer` must then report "not authorised for TOPIC" and fail, instead
of showing an empty cluster. (Mosquitto grants every subscription and filters on
delivery: tests/system/test_system_acl.py covers that case.)
"""

from __future__ import annotations

import argparse
import importlib
import uuid
import warnings
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from edgedi.broker.server import EmbeddedBroker, _tidy_broker_class, free_port
from edgedi.broker.topics import JOB_RESULT, PLAN_CURRENT, TopicRoot

ROOT = TopicRoot(prefix=f"edgedi-refusals/{uuid.uuid4().hex[:8]}", cluster="acl")


@pytest_asyncio.fixture
async def refusing_broker() -> AsyncIterator[EmbeddedBroker]:
    """amqtt that lets anonymous clients subscribe to results and births only."""
    port = free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
                # amqtt 0.12 calls the subscribe ACL `acl` (and warns that it is deprecated).
                "acl": {
                    "anonymous": [
                        JOB_RESULT.filter(ROOT),
                        f"{ROOT.base}/devices/+/birth",
                    ]
                }
            },
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        broker = _tidy_broker_class()(config)
        await broker.start()
    handle = EmbeddedBroker("127.0.0.1", port, broker)
    try:
        yield handle
    finally:
        await handle.stop()


def _arguments(command: str, broker: EmbeddedBroker, *extra: str) -> argparse.Namespace:
    module = importlib.import_module(f"edgedi.agent.commands.{command}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(
        [
            "--broker",
            f"{broker.host}:{broker.port}",
            "--topic-root",
            ROOT.prefix,
            "--cluster",
            ROOT.cluster,
            *extra,
        ]
    )


async def test_status_watch_and_infer_report_a_refused_subscription(
    refusing_broker: EmbeddedBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgedi.agent.commands import infer, status, watch

    code = await status._collect(_arguments("status", refusing_broker, "--wait", "0.2"))
    error = capsys.readouterr().err
    assert code == 1
    assert "not authorised for edgedi-refusals/" in error, error
    assert "refused the subscription (reason code 0x80)" in error, error

    code = await watch._watch(_arguments("watch", refusing_broker, "--duration", "0.2"))
    error = capsys.readouterr().err
    assert code == 1 and "not authorised for" in error, error

    code = await infer._main(_arguments("infer", refusing_broker, "--synthetic", "1"))
    error = capsys.readouterr().err
    assert code == 1, error
    assert f"not authorised for {PLAN_CURRENT.filter(ROOT)}" in error, error
