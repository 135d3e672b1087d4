"""`SideBySide`: candidates handed out in turn, judged when each has its jobs."""

from __future__ import annotations

import pytest
from plan_builders import one_tile_plan

from edgedi.agent.exploration import SideBySide
from edgedi.broker.plan import Plan


def plan(plan_id: str) -> Plan:
    return one_tile_plan(
        plan_id=plan_id, strategy=f"auto:{plan_id}", input_shape=(3, 40, 40), created_at=0.0
    )


def test_candidates_are_handed_out_in_turn_until_each_has_its_jobs() -> None:
    round_ = SideBySide([("a", plan("a")), ("b", plan("b")), ("c", plan("c"))], jobs=2)
    assert round_.first.plan_id == "a"
    handed = [round_.next_plan().plan_id for _ in range(6)]
    assert handed == ["a", "b", "c", "a", "b", "c"]
    over = [round_.record(plan_id, 0.1 * (1 + i)) for i, plan_id in enumerate(handed)]
    assert over == [False] * 5 + [True]
    medians = {name: median for name, (_, median) in round_.medians().items()}
    assert medians == pytest.approx({"a": 0.25, "b": 0.35, "c": 0.45})
    assert round_.holds("a") and not round_.holds("z")


def test_a_candidate_whose_jobs_never_finish_does_not_hold_the_round_up() -> None:
    round_ = SideBySide([("a", plan("a")), ("b", plan("b"))], jobs=2)
    over = False
    while not over:
        handed = round_.next_plan()
        if handed.plan_id == "a":  # b's jobs all fail: never observed
            over = round_.record("a", 0.1)
        # Over at the first job observed once 3 turns per wanted measurement are out.
        assert round_.handed <= 3 * 2 * 2 + 2
    assert set(round_.medians()) == {"a"}


def test_a_round_needs_two_candidates() -> None:
    with pytest.raises(ValueError, match="two candidates"):
        SideBySide([("a", plan("a"))], jobs=2)
