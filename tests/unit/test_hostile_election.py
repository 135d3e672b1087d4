"""Election rules against stale and forged leader records (issue 12, item 2).

Whatever the retained record holds, the best alive candidate ends up claiming:
a record is believed only while it names an alive candidate of the session it
carries, and an epoch that would spend the range is not believed at all.
"""

from __future__ import annotations

import aiomqtt
import pytest

from edgedi.agent.election import (
    EPOCH_HEADROOM,
    MAX_EPOCH_STEP,
    Decision,
    Election,
    LeaderClaim,
)
from edgedi.agent.membership import Membership
from edgedi.broker.connection import MqttSession, Received, SessionSettings
from edgedi.broker.messages import WIRE_INT_MAX
from edgedi.broker.topics import (
    DEVICE_BIRTH,
    DEVICE_HEARTBEAT,
    PLANNER_LEADER,
    ParsedTopic,
    TopicRoot,
)

ROOT = TopicRoot(prefix="test", cluster="election")


def _table() -> Membership:
    table = Membership()
    table.birth("a", session=10, candidate=True, priority=0, now=0.0)
    table.birth("b", session=20, candidate=True, priority=1, now=0.0)
    table.birth("w", session=30, candidate=False, now=0.0)
    return table


def _decisions(claim: LeaderClaim) -> dict[str, Decision]:
    alive = _table().alive(now=0.1)
    sessions = {"a": 10, "b": 20, "w": 30}
    decisions = {}
    for device, priority in (("a", 0), ("b", 1), ("w", 5)):
        election = Election(device, priority, device != "w", session=sessions[device])
        assert election.observe(claim)
        decisions[device] = election.decide(alive)
    return decisions


@pytest.mark.parametrize(
    "claim",
    [
        LeaderClaim(5, 1, "b", 19),  # a live device that is not the top, an old session
        LeaderClaim(5, 0, "a", 9),  # the top candidate's earlier session
        LeaderClaim(5, 5, "w", 30),  # a live worker, its own session: not a candidate
        LeaderClaim(5, 0, "ghost", 1),  # an unknown device
    ],
    ids=["not-its-session", "earlier-session", "a-worker", "unknown"],
)
def test_a_record_that_names_no_live_candidate_session_is_no_leader(claim: LeaderClaim) -> None:
    assert _decisions(claim) == {"a": Decision.CLAIM, "b": Decision.FOLLOW, "w": Decision.FOLLOW}


def test_a_record_of_a_live_candidate_session_is_followed() -> None:
    assert _decisions(LeaderClaim(5, 1, "b", 20)) == {
        "a": Decision.FOLLOW,
        "b": Decision.LEAD,
        "w": Decision.FOLLOW,
    }


def test_the_claim_over_a_stale_record_takes_the_next_epoch() -> None:
    election = Election("a", 0, True, session=10)
    election.observe(LeaderClaim(41, 1, "b", 19))
    assert election.decide(_table().alive(now=0.1)) is Decision.CLAIM
    assert election.make_claim().epoch == 42
    assert election.decide(_table().alive(now=0.2)) is Decision.LEAD


@pytest.mark.parametrize(
    "epoch", [WIRE_INT_MAX, WIRE_INT_MAX - 1, WIRE_INT_MAX - EPOCH_HEADROOM + 1, 2**53 - 2]
)
def test_a_first_record_near_the_bound_is_not_believed(epoch: int) -> None:
    election = Election("a", 0, True, session=10)
    assert not election.observe(LeaderClaim(epoch, 0, "b", 20))
    assert election.highest_epoch == 0 and election.current is None
    assert election.decide(_table().alive(now=0.1)) is Decision.CLAIM
    assert election.make_claim().epoch == 1


def test_a_record_far_above_the_highest_epoch_is_not_believed() -> None:
    election = Election("b", 1, True, session=20)
    assert election.observe(LeaderClaim(7, 0, "a", 10))
    assert not election.observe(LeaderClaim(7 + MAX_EPOCH_STEP + 1, 0, "a", 10))
    assert election.observe(LeaderClaim(7 + MAX_EPOCH_STEP, 0, "a", 10))
    assert election.highest_epoch == 7 + MAX_EPOCH_STEP


def test_one_record_leaves_room_for_every_term_to_come() -> None:
    # The worst one record can do to a fresh cluster: the headroom is left.
    election = Election("a", 0, True, session=10)
    assert election.observe(LeaderClaim(WIRE_INT_MAX - EPOCH_HEADROOM, 0, "ghost", 1))
    claim = election.make_claim()
    assert claim.epoch == WIRE_INT_MAX - EPOCH_HEADROOM + 1
    assert election.is_leader()
    assert WIRE_INT_MAX - claim.epoch >= EPOCH_HEADROOM - 1


async def _dispatch(spec_topic: str, payload: bytes, retain: bool) -> list[ParsedTopic]:
    damaged: list[ParsedTopic] = []
    session = MqttSession(
        SessionSettings(client_id="repair"), ROOT, on_retained_damage=damaged.append
    )
    handled: list[Received] = []

    async def handler(received: Received) -> None:
        handled.append(received)

    for spec in (PLANNER_LEADER, DEVICE_BIRTH, DEVICE_HEARTBEAT):
        await session.subscribe(spec, handler)
    message = aiomqtt.Message(spec_topic, payload, qos=1, retain=retain, mid=1, properties=None)
    await session._dispatch(message)
    assert not handled
    return damaged


@pytest.mark.parametrize("payload", [b"", b"\xc1 garbage", b"{}"])
@pytest.mark.parametrize("retain", [True, False])
async def test_a_deleted_or_refused_retained_record_is_reported(
    payload: bytes, retain: bool
) -> None:
    for spec, parameters in ((PLANNER_LEADER, {}), (DEVICE_BIRTH, {"device": "pi-1"})):
        damaged = await _dispatch(spec.topic(ROOT, **parameters), payload, retain)
        assert [(parsed.spec, dict(parsed.parameters)) for parsed in damaged] == [
            (spec, parameters)
        ]


async def test_a_refused_message_on_a_topic_that_is_not_retained_is_no_damage() -> None:
    topic = DEVICE_HEARTBEAT.topic(ROOT, device="pi-1")
    assert await _dispatch(topic, b"\xc1 garbage", retain=False) == []
    assert await _dispatch(topic, b"", retain=False) == []
