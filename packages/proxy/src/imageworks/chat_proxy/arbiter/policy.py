"""Which models to evict so that a model (or a lease) fits: a pure function over plain data.

Rules, in order: never a model serving a request; never a protected one (starting or
stopping: its slot owns it; or one the arbiter cannot evict); least recently used first; stop
as soon as enough is free. The plan says whether the need can
be met at all, so the caller can refuse early instead of evicting for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    name: str
    vram_mb: int
    last_used: float  # monotonic seconds; lower is older
    in_flight: int = 0
    protected: bool = False  # starting, stopping, or with no way to evict it

    @property
    def evictable(self) -> bool:
        return self.in_flight == 0 and not self.protected


@dataclass(frozen=True)
class Plan:
    evict: tuple[str, ...]
    freed_mb: int
    sufficient: bool
    blocked_by: tuple[str, ...] = ()  # busy or protected models that hold memory


def plan_evictions(
    residents: list[Resident], need_mb: int, free_mb: int, headroom_mb: int = 0
) -> Plan:
    """Evict least-recently-used idle models until ``free - headroom >= need``."""
    shortfall = need_mb + headroom_mb - free_mb
    if shortfall <= 0:
        return Plan((), 0, True)
    chosen: list[str] = []
    freed = 0
    for resident in sorted(
        (r for r in residents if r.evictable), key=lambda r: (r.last_used, r.name)
    ):
        if freed >= shortfall:
            break
        chosen.append(resident.name)
        freed += resident.vram_mb
    blocked = tuple(sorted(r.name for r in residents if not r.evictable and r.vram_mb > 0))
    return Plan(tuple(chosen), freed, freed >= shortfall, blocked)


def plan_exclusive(residents: list[Resident]) -> Plan:
    """Everything that can go, goes (an exclusive GPU lease)."""
    idle = sorted((r for r in residents if r.evictable), key=lambda r: (r.last_used, r.name))
    blocked = tuple(sorted(r.name for r in residents if not r.evictable))
    return Plan(tuple(r.name for r in idle), sum(r.vram_mb for r in idle), not blocked, blocked)
