"""The eviction policy is a pure function: a table of situations and the plan for each."""

from __future__ import annotations

import pytest

from imageworks.chat_proxy.arbiter.policy import (
    Resident,
    cost_band,
    only_pinned_block,
    plan_evictions,
    plan_exclusive,
)

A_OLD = Resident("a", 8000, last_used=1.0)
B_MID = Resident("b", 6000, last_used=2.0)
C_NEW = Resident("c", 4000, last_used=3.0)
BUSY = Resident("busy", 20000, last_used=0.5, in_flight=2)
HELD = Resident("held", 10000, last_used=0.1, protected=True)


@pytest.mark.parametrize(
    ("residents", "need", "free", "headroom", "evict", "sufficient", "blocked"),
    [
        # Enough free already: nothing is touched.
        ([A_OLD, B_MID], 4000, 5000, 1000, (), True, ()),
        # Exactly enough counts as enough.
        ([A_OLD], 4000, 5000, 1000, (), True, ()),
        # Headroom counts against free memory.
        ([A_OLD, B_MID], 4000, 4500, 1000, ("a",), True, ()),
        # Least recently used first, and only as many as needed.
        ([C_NEW, A_OLD, B_MID], 10000, 1000, 0, ("a", "b"), True, ()),
        ([C_NEW, B_MID], 5000, 0, 0, ("b",), True, ()),
        # A busy model is never chosen, even if it is the oldest and the biggest.
        ([BUSY, C_NEW], 3000, 0, 0, ("c",), True, ("busy",)),
        # Not enough without the busy one: evict nothing useful can't replace, say so.
        ([BUSY, C_NEW], 10000, 0, 0, ("c",), False, ("busy",)),
        # A protected model (the lease holder's) is never chosen.
        ([HELD, A_OLD], 8000, 0, 0, ("a",), True, ("held",)),
        ([HELD], 1000, 0, 0, (), False, ("held",)),
        # Nothing resident and not enough free: cannot be met.
        ([], 1000, 500, 0, (), False, ()),
        # Ties on age are broken by name, so the plan is deterministic.
        ([Resident("y", 1000, 1.0), Resident("x", 1000, 1.0)], 1000, 0, 0, ("x",), True, ()),
        # An exact fit touches nothing and reports nothing blocking, busy models or not.
        ([BUSY, A_OLD], 4000, 5000, 1000, (), True, ()),
        # One megabyte short is short.
        ([A_OLD], 4001, 5000, 1000, ("a",), True, ()),
        # A busy model holding nothing blocks nothing; holding 1 MB, it does.
        ([Resident("idle-cpu", 0, 0.1, in_flight=1)], 1000, 0, 0, (), False, ()),
        ([Resident("tiny", 1, 0.1, in_flight=1)], 1000, 0, 0, (), False, ("tiny",)),
    ],
)
def test_plan_evictions(residents, need, free, headroom, evict, sufficient, blocked) -> None:
    plan = plan_evictions(residents, need, free, headroom)
    assert (plan.evict, plan.sufficient, plan.blocked_by) == (evict, sufficient, blocked)
    assert plan.freed_mb == sum(r.vram_mb for r in residents if r.name in evict)


@pytest.mark.parametrize(
    ("residents", "evict", "sufficient", "blocked"),
    [
        ([C_NEW, A_OLD, B_MID], ("a", "b", "c"), True, ()),
        ([A_OLD, BUSY], ("a",), False, ("busy",)),
        ([], (), True, ()),
    ],
)
def test_plan_exclusive(residents, evict, sufficient, blocked) -> None:
    plan = plan_exclusive(residents)
    assert (plan.evict, plan.sufficient, plan.blocked_by) == (evict, sufficient, blocked)
    assert plan.freed_mb == sum(r.vram_mb for r in residents if r.name in evict)


def test_headroom_defaults_to_zero() -> None:
    assert plan_evictions([A_OLD], 4000, 4000) == plan_evictions([A_OLD], 4000, 4000, 0)
    assert plan_evictions([A_OLD], 4000, 4000).evict == ()


PINNED = Resident("pinned", 8000, last_used=0.0, pinned=True)
LOW = Resident("low", 6000, last_used=9.0, priority=-1)
HIGH = Resident("high", 6000, last_used=0.0, priority=5)
SLOW = Resident("slow", 6000, last_used=0.0, cost_s=40.0)  # a cold start of 40 s
QUICK = Resident("quick", 6000, last_used=9.0, cost_s=0.3)  # a wake of 0.3 s


@pytest.mark.parametrize(
    ("residents", "need", "free", "evict", "sufficient", "blocked", "pinned"),
    [
        # A pinned model is never chosen, even the oldest; it is named, apart from busy ones.
        ([PINNED, C_NEW], 4000, 0, ("c",), True, (), ("pinned",)),
        # Only evicting the pinned model would do: not sufficient, nothing busy to wait for.
        ([PINNED, C_NEW], 10000, 0, ("c",), False, (), ("pinned",)),
        ([PINNED], 1000, 0, (), False, (), ("pinned",)),
        # Pinned and busy: named as pinned (it will not go when it finishes).
        ([Resident("pb", 5000, 0.0, in_flight=1, pinned=True)], 1000, 0, (), False, (), ("pb",)),
        # Busy and pinned side by side: the busy one may still free it.
        ([PINNED, BUSY], 1000, 0, (), False, ("busy",), ("pinned",)),
        # Lower priority goes first, however recently used.
        ([A_OLD, LOW], 5000, 0, ("low",), True, (), ()),
        # Higher priority goes last, however old.
        ([HIGH, C_NEW], 4000, 0, ("c",), True, (), ()),
        ([HIGH, C_NEW], 9000, 0, ("c", "high"), True, (), ()),
        # Same priority: the cheaper to bring back goes first, however recently used.
        ([SLOW, QUICK], 5000, 0, ("quick",), True, (), ()),
        # Costs in the same band (both under 3 s, or unknown) leave least-recently-used order.
        (
            [Resident("p", 1000, 2.0, cost_s=2.5), Resident("q", 1000, 1.0, cost_s=0.1)],
            1000,
            0,
            ("q",),
            True,
            (),
            (),
        ),
        (
            [Resident("u", 1000, 2.0), Resident("v", 1000, 1.0, cost_s=1.0)],
            1000,
            0,
            ("v",),
            True,
            (),
            (),
        ),
        # Priority outweighs cost: a slow, low-priority model goes before a quick, high one.
        (
            [
                Resident("s", 1000, 0.0, cost_s=100.0, priority=-1),
                Resident("f", 1000, 0.0, cost_s=0.1, priority=1),
            ],
            1000,
            0,
            ("s",),
            True,
            (),
            (),
        ),
    ],
)
def test_pins_priority_and_cost(residents, need, free, evict, sufficient, blocked, pinned) -> None:
    plan = plan_evictions(residents, need, free)
    assert (plan.evict, plan.sufficient, plan.blocked_by, plan.pinned) == (
        evict,
        sufficient,
        blocked,
        pinned,
    )
    assert only_pinned_block(plan) == (not sufficient and not blocked and bool(pinned))


@pytest.mark.parametrize(
    ("cost", "band"),
    [(None, 0), (0.0, 0), (0.3, 0), (2.9, 0), (3.0, 1), (14.9, 1), (15.0, 2), (62.0, 2), (63, 3)],
)
def test_cost_bands(cost, band) -> None:
    assert cost_band(cost) == band


def test_an_exclusive_lease_is_refused_by_a_pinned_model() -> None:
    plan = plan_exclusive([PINNED, A_OLD])
    assert (plan.evict, plan.sufficient, plan.pinned) == (("a",), False, ("pinned",))
