"""Membership and election rules, with hand-built state and an explicit clock."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from edgedi.agent.election import Decision, Election, LeaderClaim
from edgedi.agent.membership import Membership


def test_late_will_of_an_old_session_never_evicts_the_live_device() -> None:
    table = Membership()
    table.birth("a", session=1, candidate=True, now=0.0)
    table.birth("a", session=2, candidate=True, now=1.0)  # restarted
    assert table.state("a", session=1, status="offline", now=1.1) is False
    assert table.is_alive("a", now=1.2)
    assert table.state("a", session=2, status="offline", now=1.3) is True
    assert not table.is_alive("a", now=1.4)


def test_retained_birth_of_an_older_session_is_ignored() -> None:
    table = Membership()
    table.birth("a", session=5, candidate=False, now=0.0)
    table.birth("a", session=4, candidate=True, now=0.1)
    record = table.get("a")
    assert record is not None and record.session == 5 and not record.candidate


def test_silent_device_is_not_alive_and_changes_report_it() -> None:
    table = Membership(silent_after_s=3.0)
    table.birth("a", session=1, candidate=True, now=0.0)
    table.birth("b", session=1, candidate=True, now=0.0)
    assert table.changes(now=0.5).joined == ("a", "b")
    table.heartbeat("a", session=1, now=2.0)
    table.heartbeat("b", session=1, now=2.0)
    table.heartbeat("a", session=1, now=4.5)
    assert [r.device for r in table.alive(now=5.5)] == ["a"]
    change = table.changes(now=5.5)
    assert change.left == ("b",) and change.joined == ()
    assert not table.changes(now=5.6)


def test_heartbeat_of_another_session_does_not_keep_a_device_alive() -> None:
    table = Membership(silent_after_s=3.0)
    table.birth("a", session=2, candidate=True, now=0.0)
    table.heartbeat("a", session=1, now=2.9)
    assert not table.is_alive("a", now=3.5)


def _cluster(ids: list[str], now: float = 0.0) -> Membership:
    table = Membership()
    for device in ids:
        table.birth(device, session=1, candidate=True, now=now)
    return table


def test_best_ranked_candidate_claims_and_others_follow() -> None:
    table = _cluster(["b", "a", "c"])
    alive = table.alive(now=0.1)
    elections = {d: Election(d, priority=0, candidate=True, session=1) for d in "abc"}
    decisions = {d: e.decide(alive) for d, e in elections.items()}
    assert decisions == {"a": Decision.CLAIM, "b": Decision.FOLLOW, "c": Decision.FOLLOW}
    claim = elections["a"].make_claim()
    assert claim.epoch == 1
    for election in elections.values():
        election.observe(claim)
    assert [d for d, e in elections.items() if e.decide(alive) == Decision.LEAD] == ["a"]
    assert all(e.leader == "a" for e in elections.values())


def test_leader_death_hands_over_with_a_higher_epoch() -> None:
    table = _cluster(["a", "b", "c"])
    elections = {d: Election(d, priority=0, candidate=True, session=1) for d in "abc"}
    claim = elections["a"].make_claim()
    for election in elections.values():
        election.observe(claim)
    table.state("a", session=1, status="offline", now=1.0)
    alive = table.alive(now=1.0)
    assert elections["b"].decide(alive) == Decision.CLAIM
    assert elections["c"].decide(alive) == Decision.FOLLOW
    new = elections["b"].make_claim()
    assert new.epoch == 2
    elections["c"].observe(new)
    assert not elections["c"].accepts_epoch(1) and elections["c"].accepts_epoch(2)


def test_a_better_device_joining_later_does_not_take_over() -> None:
    table = _cluster(["b"])
    late = Election("a", priority=0, candidate=True, session=1)
    late.observe(LeaderClaim(3, 0, "b", 1))
    table.birth("a", session=1, candidate=True, now=0.0)
    assert late.decide(table.alive(now=0.1)) == Decision.FOLLOW


def test_racing_claims_resolve_to_exactly_one_leader() -> None:
    """Two candidates claim the same epoch; whichever order records arrive in, one leads."""
    table = _cluster(["a", "b"])
    alive = table.alive(now=0.1)
    claim_b = LeaderClaim(4, 0, "b", 1)
    claim_a = LeaderClaim(4, 0, "a", 1)
    for order in itertools.permutations([claim_a, claim_b]):
        a = Election("a", 0, True, session=1, highest_epoch=3)
        b = Election("b", 0, True, session=1, highest_epoch=3)
        a.my_claim, b.my_claim = claim_a, claim_b
        for claim in order:
            a.observe(claim)
            b.observe(claim)
        # The winner says its claim once more (the loser's may be the retained one).
        assert {a.decide(alive), b.decide(alive)} == {Decision.REASSERT, Decision.FOLLOW}
        assert a.is_leader() and not b.is_leader()
        assert {a.decide(alive), b.decide(alive)} == {Decision.LEAD, Decision.FOLLOW}


def test_rightful_leader_reasserts_over_a_worse_retained_record() -> None:
    table = _cluster(["a", "b"])
    a = Election("a", 0, True, session=1)
    claim = a.make_claim()
    a.current = LeaderClaim(claim.epoch, 5, "z", 1)  # a worse record overwrote ours
    assert a.decide(table.alive(now=0.1)) == Decision.REASSERT


def test_a_leader_reasserts_when_a_rival_of_its_epoch_wrote_last() -> None:
    # Both saw the old leader die and claimed epoch 2 at once; b wins on priority, but
    # if a's record reaches the broker last it is the retained one newcomers believe.
    table = _cluster(["a", "b"])
    b = Election("b", 0, True, session=1)
    a_claim = LeaderClaim(2, 5, "a", 1)
    b.observe(LeaderClaim(1, 0, "old", 1))
    mine = b.make_claim()
    assert mine.epoch == 2 and b.decide(table.alive(now=0.1)) == Decision.LEAD
    b.observe(a_claim)  # the loser's record, live or retained
    assert b.is_leader()
    assert b.decide(table.alive(now=0.2)) == Decision.REASSERT
    b.observe(mine)  # our own record coming back is no contest
    assert b.decide(table.alive(now=0.3)) == Decision.LEAD


@settings(max_examples=60, deadline=None)
@given(
    priorities=st.lists(st.integers(0, 3), min_size=1, max_size=6),
    dead=st.sets(st.integers(0, 5)),
)
def test_at_most_one_claimant_in_any_cluster(priorities: list[int], dead: set[int]) -> None:
    ids = [f"d{i}" for i in range(len(priorities))]
    table = Membership()
    for device, priority in zip(ids, priorities, strict=True):
        table.birth(device, session=1, candidate=True, priority=priority, now=0.0)
    for i in dead:
        if i < len(ids):
            table.state(ids[i], session=1, status="offline", now=0.0)
    alive = table.alive(now=0.1)
    claimants = [
        d
        for d, p in zip(ids, priorities, strict=True)
        if Election(d, p, True, session=1).decide(alive) == Decision.CLAIM
    ]
    assert len(claimants) == (1 if alive else 0)
    assert all(table.is_alive(d, 0.1) for d in claimants)


def test_the_device_table_is_bounded_and_keeps_live_devices() -> None:
    table = Membership(max_devices=4)
    for number in range(4):
        table.birth(f"d{number}", 1, candidate=True, now=0.0)
    table.heartbeat("d0", 1, now=9.0)  # d0 alive at t=10, the others long silent
    for number in range(4, 10):
        table.birth(f"d{number}", 1, candidate=False, now=10.0)
    assert len(table) == 4
    assert "d0" in table  # never evicted while alive
    assert table.refused == 3  # d4..d6 replaced the gone ones; then only live devices
    assert not table.state("d99", 1, "online", now=10.0)
    assert {record.device for record in table.alive(now=10.0)} == {"d0", "d4", "d5", "d6"}
