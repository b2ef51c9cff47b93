"""Placement is a pure function: a table of devices and what is on them, and where a model goes
(with what it evicts there)."""

from __future__ import annotations

import pytest

from imageworks.chat_proxy.arbiter.placement import Device, place, share_mb
from imageworks.chat_proxy.arbiter.policy import Resident

OLD = Resident("old", 8000, last_used=1.0)
NEW = Resident("new", 8000, last_used=5.0)
SMALL = Resident("small", 2000, last_used=2.0)
BUSY = Resident("busy", 20000, last_used=0.5, in_flight=1)


def dev(index: int, free: int, *residents: Resident, available: bool = True) -> Device:
    return Device(index, free, tuple(residents), available)


@pytest.mark.parametrize(
    ("devices", "need", "pin", "span", "where", "evict", "sufficient"),
    [
        # One device with room: it goes there, nothing is evicted (the one-GPU case).
        ([dev(0, 20000)], 14000, None, 1, (0,), (), True),
        # Room on both: the one with more free memory (spreads models over the cards).
        ([dev(0, 10000), dev(1, 20000)], 8000, None, 1, (1,), (), True),
        # Equal: the lower index.
        ([dev(0, 20000), dev(1, 20000)], 8000, None, 1, (0,), (), True),
        # Fits without eviction somewhere beats evicting elsewhere, even with less free.
        ([dev(0, 1000, OLD), dev(1, 9000, SMALL)], 8000, None, 1, (1,), (), True),
        # Nowhere without eviction: the device where the least memory must go.
        ([dev(0, 2000, OLD), dev(1, 2000, SMALL, NEW)], 4000, None, 1, (1,), ("small",), True),
        # Equal memory to free: the least recently used model's device is no better, but
        # fewer models evicted wins.
        (
            [dev(0, 0, OLD), dev(1, 0, Resident("a", 4000, 0.1), Resident("b", 4000, 0.2))],
            8000,
            None,
            1,
            (0,),
            ("old",),
            True,
        ),
        # A busy model is never evicted: the device where it runs cannot take the model,
        # the other one can by evicting its idle one.
        ([dev(0, 0, BUSY), dev(1, 0, NEW)], 8000, None, 1, (1,), ("new",), True),
        # Nowhere even after evicting: the answer says what blocks it.
        ([dev(0, 0, BUSY)], 8000, None, 1, (0,), (), False),
        # A lent device is not a candidate.
        ([dev(0, 24000, available=False), dev(1, 10000)], 8000, None, 1, (1,), (), True),
        ([dev(0, 24000, available=False)], 8000, None, 1, (), (), False),
        # A pin is obeyed even when another device has more room.
        ([dev(0, 24000), dev(1, 9000)], 8000, [1], 1, (1,), (), True),
        # A pin that has to evict evicts there, never elsewhere.
        ([dev(0, 24000, SMALL), dev(1, 0, OLD)], 8000, [1], 1, (1,), ("old",), True),
        # A pin to a device that does not exist, or is lent: nowhere.
        ([dev(0, 24000)], 8000, [3], 1, (), (), False),
        ([dev(0, 24000), dev(1, 24000, available=False)], 8000, [1], 1, (), (), False),
        # Tensor parallel: half the need on each of two devices.
        ([dev(0, 9000), dev(1, 9000), dev(2, 3000)], 16000, None, 2, (0, 1), (), True),
        ([dev(0, 9000), dev(1, 1000, SMALL), dev(2, 9000)], 16000, None, 2, (0, 2), (), True),
        # Not enough devices to span: nowhere.
        ([dev(0, 48000)], 16000, None, 2, (), (), False),
    ],
)
def test_placement(
    devices: list[Device],
    need: int,
    pin: list[int] | None,
    span: int,
    where: tuple[int, ...],
    evict: tuple[str, ...],
    sufficient: bool,
) -> None:
    found = place(devices, need, pin=pin, span=span)
    assert found.devices == where
    assert found.plan.evict == evict
    assert found.plan.sufficient is sufficient


def test_headroom_counts_on_every_device_of_the_placement() -> None:
    found = place([dev(0, 8500), dev(1, 9500)], 16000, span=2, headroom_mb=1000)
    assert found.devices == (0, 1) and not found.plan.sufficient
    assert place([dev(0, 9000), dev(1, 9000)], 16000, span=2, headroom_mb=1000).plan.sufficient


def test_a_blocked_placement_names_the_busy_model() -> None:
    found = place([dev(0, 0, BUSY, SMALL)], 8000)
    assert found.plan.blocked_by == ("busy",) and not found.plan.sufficient


def test_share_per_device_rounds_up() -> None:
    assert share_mb(14001, 2) == 7001 and share_mb(14000, 1) == 14000


def test_the_plan_reports_what_it_frees() -> None:
    assert place([dev(0, 20000)], 8000).plan.freed_mb == 0
    found = place([dev(0, 2000, OLD), dev(1, 2000, SMALL, NEW)], 4000)
    assert found.plan.freed_mb == 2000


WIDE = Resident("wide", 8000, last_used=0.1)  # tensor parallel: 8000 on each of two devices


def test_a_model_spanning_the_devices_is_evicted_once_and_counted_whole() -> None:
    found = place([dev(0, 0, WIDE), dev(1, 0, WIDE)], 16000, span=2)
    assert found.devices == (0, 1)
    assert found.plan.evict == ("wide",) and found.plan.freed_mb == 16000


def test_evicting_a_spanning_model_costs_all_it_holds() -> None:
    """Evicting "wide" stops 16000 MB (8000 on each card); two models of 5000 on the other two
    cards cost 10000: they go, although they are two."""
    y, z = Resident("y", 5000, last_used=0.2), Resident("z", 5000, last_used=0.3)
    devices = [dev(0, 0, WIDE), dev(1, 0, WIDE), dev(2, 3000, y), dev(3, 3000, z)]
    found = place(devices, 16000, span=2)
    assert found.devices == (2, 3)
    assert found.plan.evict == ("y", "z") and found.plan.freed_mb == 10000
