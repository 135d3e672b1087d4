"""Session counters and duplicate ids (edgedi.agent.identity), without a broker."""

from __future__ import annotations

from pathlib import Path

from edgedi.agent.identity import IdentityCheck, loses_to, new_instance, next_session
from edgedi.broker.ids import DeviceId
from edgedi.broker.messages import DeviceState, Heartbeat


def _beat(device: str, session: int, instance: str | None) -> Heartbeat:
    return Heartbeat(
        sender=device,
        device=DeviceId(device),
        session=session,
        sequence=1,
        load=0.0,
        busy_tiles=0,
        instance=instance,
    )


def test_sessions_count_up_across_starts_in_the_state_directory(tmp_path: Path) -> None:
    assert [next_session(tmp_path) for _ in range(3)] == [1, 2, 3]
    assert (tmp_path / "session").read_text().strip() == "3"


def test_a_session_climbs_above_one_the_broker_still_holds(tmp_path: Path) -> None:
    # A re-flashed card (no counter) whose id has a retained birth of session 41.
    assert next_session(tmp_path, at_least=42) == 42
    assert next_session(tmp_path) == 43


def test_a_corrupt_counter_starts_over_without_failing(tmp_path: Path) -> None:
    (tmp_path / "session").write_text("not a number")
    assert next_session(tmp_path, at_least=5) == 5
    assert next_session(None, at_least=7) == 7  # no state directory: only the broker's


def test_a_heartbeat_of_our_id_is_a_live_holder() -> None:
    check = IdentityCheck("pi-1")
    state = DeviceState(sender="pi-1", device=DeviceId("pi-1"), session=9, status="online")
    check.observe(state)
    check.observe(_beat("pi-2", 50, None))  # another device: not ours
    assert check.highest_session == 9
    assert check.problem() is None  # a retained record alone may be a dead agent's
    check.observe(_beat("pi-1", 9, new_instance()))
    problem = check.problem()
    assert problem is not None and "device id pi-1 is already in use" in problem


def test_of_two_running_agents_exactly_one_stops() -> None:
    for a, b in [((3, "aa"), (4, "bb")), ((4, "aa"), (4, "bb")), ((5, "ff"), (4, "00"))]:
        a_stops = loses_to(a, _beat("pi-1", b[0], b[1]))
        b_stops = loses_to(b, _beat("pi-1", a[0], a[1]))
        assert a_stops != b_stops, (a, b)
