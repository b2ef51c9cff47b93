"""The eviction policy is a pure function: a table of situations and the plan for each."""

from __future__ import annotations

import pytest

from imageworks.chat_proxy.arbiter.policy import Resident, plan_evictions, plan_exclusive

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
