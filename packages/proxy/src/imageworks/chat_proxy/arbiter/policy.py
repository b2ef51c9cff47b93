"""Which models to evict so that a model (or a lease) fits: a pure function over plain data.

Rules, in order: never a model serving a request; never a protected one (starting or
stopping: its slot owns it; or one the arbiter cannot evict); never a pinned one (``pinned:
true``: nothing evicts it, and a need that only evicting it could meet is refused, not waited
for); then the cheapest to lose first: the lowest ``priority``, then the cheapest to bring
back (its measured wake or load time, in coarse bands so that noise does not reorder models
that cost about the same), then the least recently used; stop as soon as enough is free. The
plan says whether the need can be met at all, so the caller can refuse early instead of
evicting for nothing, and which pinned models stand in the way.

How each chosen model goes is ``choose_tier``: sleep (vLLM sleep level 1: its weights parked in
host RAM, its VRAM freed, woken in a fraction of a cold start) or stop, by what was measured
for that model (its cold start against its wake) and the host RAM left in the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    name: str
    vram_mb: int
    last_used: float  # monotonic seconds; lower is older
    in_flight: int = 0
    protected: bool = False  # starting, stopping, or with no way to evict it
    pinned: bool = False  # never evicted by anything
    priority: int = 0  # higher: kept longer
    cost_s: float | None = None  # measured time to bring it back (wake or load); None: unknown

    @property
    def evictable(self) -> bool:
        return self.in_flight == 0 and not self.protected and not self.pinned


@dataclass(frozen=True)
class Plan:
    evict: tuple[str, ...]
    freed_mb: int
    sufficient: bool
    blocked_by: tuple[str, ...] = ()  # busy or protected models that hold memory (they may go)
    pinned: tuple[str, ...] = ()  # pinned models that hold memory (they never go)


def cost_band(cost_s: float | None) -> int:
    """Coarse bands of the cost to bring a model back: 0 for under 3 s (or unknown), 1 under
    15 s, 2 under 63 s, ... (powers of four), so a 0.3 s wake and a 40 s cold start differ but
    two loads of 11 s and 12 s do not."""
    if not cost_s or cost_s <= 0:
        return 0
    return math.floor(math.log(1 + cost_s, 4))


def eviction_order(resident: Resident) -> tuple[int, int, float, str]:
    return (resident.priority, cost_band(resident.cost_s), resident.last_used, resident.name)


def _holders(residents: list[Resident]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    blocked = sorted(r.name for r in residents if not r.evictable and not r.pinned and r.vram_mb)
    pinned = sorted(r.name for r in residents if r.pinned and r.vram_mb > 0)
    return tuple(blocked), tuple(pinned)


def plan_evictions(
    residents: list[Resident], need_mb: int, free_mb: int, headroom_mb: int = 0
) -> Plan:
    """Evict the cheapest idle models (``eviction_order``) until ``free - headroom >= need``."""
    shortfall = need_mb + headroom_mb - free_mb
    if shortfall <= 0:
        return Plan((), 0, True)
    chosen: list[str] = []
    freed = 0
    for resident in sorted((r for r in residents if r.evictable), key=eviction_order):
        if freed >= shortfall:
            break
        chosen.append(resident.name)
        freed += resident.vram_mb
    blocked, pinned = _holders(residents)
    return Plan(tuple(chosen), freed, freed >= shortfall, blocked, pinned)


def plan_exclusive(residents: list[Resident]) -> Plan:
    """Everything that can go, goes (an exclusive GPU lease); a pinned model there refuses it."""
    idle = sorted((r for r in residents if r.evictable), key=eviction_order)
    blocked, pinned = _holders(residents)
    return Plan(
        tuple(r.name for r in idle),
        sum(r.vram_mb for r in idle),
        not blocked and not pinned,
        blocked,
        pinned,
    )


def only_pinned_block(plan: Plan) -> bool:
    """The need cannot be met, nothing busy could free it by finishing, and a pinned model
    holds memory there: waiting is pointless, the answer is a refusal that names it."""
    return not plan.sufficient and not plan.blocked_by and bool(plan.pinned)


SLEEP, STOP = "sleep", "stop"


@dataclass(frozen=True)
class Tier:
    """How a model leaves the GPU, and why (said in the event stream and the JSONL)."""

    how: str  # SLEEP or STOP
    why: str


def choose_tier(
    *,
    sleepable: bool,
    load_s: float | None,
    wake_s: float | None,
    host_mb: int,
    host_free_mb: int,
) -> Tier:
    """Sleep or stop a model being evicted. ``sleepable``: its engine runs with sleep mode;
    ``load_s``/``wake_s``: its measured cold start and wake (None: never measured);
    ``host_mb``: the host RAM it will hold asleep (measured last time, else its weights);
    ``host_free_mb``: what the sleep budget has left. Sleep unless it cannot, its host RAM
    does not fit the budget, or its measured wake is no cheaper than its measured cold start
    (before either is measured, sleep: vLLM documents a wake far below a reload, and the
    first one measures it)."""
    if not sleepable:
        return Tier(STOP, "no sleep mode")
    if host_mb > host_free_mb:
        return Tier(
            STOP, f"host RAM budget full: asleep it holds {host_mb} MB, {host_free_mb} MB left"
        )
    if wake_s is not None and load_s is not None and wake_s >= load_s:
        return Tier(
            STOP, f"waking ({wake_s:.1f} s) is no cheaper than a cold start ({load_s:.1f} s)"
        )
    if wake_s is None:
        return Tier(SLEEP, "wake not measured yet")
    cold = "unmeasured" if load_s is None else f"{load_s:.1f} s"
    return Tier(SLEEP, f"wake {wake_s:.2f} s against a cold start of {cold}")
