"""Where the coordinator sends whole images (`images` plans): every device is kept two
deep (the image it computes and the next), the faster first, a device whose image
came back refilled first; round robin among equals."""

from __future__ import annotations

from collections import Counter

from edgedi.agent.coordinator import _image_device

# The demo cluster: two devices at 0.4 of a core, two at 0.25.
SHARES = {"a": 0.4 / 1.3, "b": 0.4 / 1.3, "c": 0.25 / 1.3, "d": 0.25 / 1.3}


def dispatch(count: int, in_hand: dict[str, int], credit: dict[str, float]) -> list[str]:
    """`count` images sent one after the other, none of them answered meanwhile."""
    chosen = []
    for _ in range(count):
        device = _image_device(SHARES, in_hand, credit)
        in_hand[device] += 1
        chosen.append(device)
    return chosen


def test_every_device_holds_two_images_before_any_holds_a_third() -> None:
    in_hand = dict.fromkeys(SHARES, 0)
    credit: dict[str, float] = {}
    first = dispatch(8, in_hand, credit)
    assert first[:2] == ["a", "b"]  # the faster ones first
    assert set(first[2:4]) == {"c", "d"}  # then the slower: each has one before any two
    assert Counter(first) == dict.fromkeys(SHARES, 2)
    # Beyond two each: to whoever finishes first, so the faster devices take more.
    assert Counter(dispatch(6, in_hand, credit)) == {"a": 2, "b": 2, "c": 1, "d": 1}


def test_a_device_whose_image_came_back_gets_the_next_one() -> None:
    for device in SHARES:
        in_hand = dict.fromkeys(SHARES, 2)
        in_hand[device] = 1
        assert _image_device(SHARES, in_hand, {}) == device


def test_an_image_at_a_time_goes_to_the_fastest_devices_in_turn() -> None:
    credit: dict[str, float] = {}
    chosen = [_image_device(SHARES, dict.fromkeys(SHARES, 0), credit) for _ in range(6)]
    assert chosen == ["a", "b", "a", "b", "a", "b"]


def test_equal_devices_take_turns() -> None:
    shares = dict.fromkeys(("w", "x", "y", "z"), 0.25)
    credit: dict[str, float] = {}
    chosen = [_image_device(shares, dict.fromkeys(shares, 0), credit) for _ in range(8)]
    assert Counter(chosen) == dict.fromkeys(shares, 2)
    assert chosen[:4] == chosen[4:]
