"""Where a model (or a lease) goes on a box with several GPUs: a pure function over plain data.

Candidates are the devices an entry pins (``gpus``), else every set of ``span`` devices that is
not lent out. On each candidate the eviction policy (``policy.plan_evictions``) says what must
go for the model's share of the need to fit. The best candidate is the one that fits with the
least eviction: fits without evicting before evicting; less memory evicted (a model spanning
several devices counts with all it holds); fewer models evicted; more memory left free
(spreading models over the cards); lower index. A candidate that
cannot fit even after evicting every idle model loses to any that can; if none can, the answer
says what blocks the best one, so the caller can wait for busy models or refuse.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from imageworks.chat_proxy.arbiter.policy import Plan, Resident, plan_evictions


@dataclass(frozen=True)
class Device:
    index: int
    free_mb: int
    residents: tuple[Resident, ...] = ()  # what holds memory here (a model spanning devices
    # appears on each, with its share there)
    available: bool = True  # False: lent out (a lease holds it)


@dataclass(frozen=True)
class Placement:
    devices: tuple[int, ...]  # empty: no candidate device at all
    plan: Plan  # evictions over all of them


NOWHERE = Placement((), Plan((), 0, False))


def share_mb(need_mb: int, span: int) -> int:
    """What a model spanning ``span`` devices needs on each."""
    return math.ceil(need_mb / max(1, span))


def _footprints(devices: Sequence[Device]) -> dict[str, int]:
    """What each model holds over every device: evicting one that spans several frees (and
    stops) all of it, not just its share on the device that asked."""
    whole: dict[str, int] = {}
    for device in devices:
        for resident in device.residents:
            whole[resident.name] = whole.get(resident.name, 0) + resident.vram_mb
    return whole


def _plan_on(
    devices: Sequence[Device], need_mb: int, headroom_mb: int, whole: dict[str, int]
) -> Plan:
    evict: list[str] = []
    blocked: set[str] = set()
    pinned: set[str] = set()
    freed = 0
    sufficient = True
    for device in devices:
        plan = plan_evictions(list(device.residents), need_mb, device.free_mb, headroom_mb)
        for name in plan.evict:
            if name not in evict:  # a model spanning devices is planned on each of them
                evict.append(name)
                freed += whole[name]
        blocked.update(plan.blocked_by)
        pinned.update(plan.pinned)
        sufficient = sufficient and plan.sufficient
    return Plan(tuple(evict), freed, sufficient, tuple(sorted(blocked)), tuple(sorted(pinned)))


def place(
    devices: Sequence[Device],
    need_mb: int,
    *,
    pin: Sequence[int] | None = None,
    span: int = 1,
    headroom_mb: int = 0,
) -> Placement:
    by_index = {d.index: d for d in devices}
    if pin:
        if any(i not in by_index or not by_index[i].available for i in pin):
            return NOWHERE
        candidates = [tuple(by_index[i] for i in pin)]
    else:
        usable = [d for d in devices if d.available]
        candidates = list(itertools.combinations(usable, span))
    if not candidates:
        return NOWHERE
    each = share_mb(need_mb, len(candidates[0]))
    whole = _footprints(devices)

    def score(option: tuple[Device, ...]) -> tuple[object, ...]:
        plan = _plan_on(option, each, headroom_mb, whole)
        return (
            not plan.sufficient,
            plan.freed_mb,
            len(plan.evict),
            -sum(d.free_mb for d in option),
            tuple(d.index for d in option),
        )

    best = min(candidates, key=score)
    return Placement(tuple(d.index for d in best), _plan_on(best, each, headroom_mb, whole))
