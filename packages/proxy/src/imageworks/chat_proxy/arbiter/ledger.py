"""The per-device ledger: what each GPU holds, whose it is, over plain data.

The probe says what each device holds per process; the lifecycle says what our engines hold
(``Holding``) and where the arbiter placed them. Models that share one server process (Ollama
places its own models) are located from that process's use on each device: all on the one
device it uses, or, when it spreads over several, each model on the device with the most of
the process's memory still unaccounted for, largest model first. Memory held by processes
that are not ours is foreign. Effective free memory also subtracts what models still loading
are booked for but do not hold yet, so two starts never count the same memory. Sleeping models
(vLLM sleep mode) hold host RAM, counted against the sleep budget (``host_used``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot
from imageworks.chat_proxy.arbiter.placement import Device, Placement, place, share_mb
from imageworks.chat_proxy.arbiter.policy import Plan, Resident, plan_exclusive
from imageworks.chat_proxy.arbiter.seams import Holding
from imageworks.chat_proxy.errors import InsufficientVram


@dataclass(frozen=True)
class Held:
    holding: Holding
    mb: int  # over all its devices
    devices: tuple[int, ...]
    cost_s: float | None = None  # measured time to bring it back (wake or load)

    @property
    def name(self) -> str:
        return self.holding.name

    def on(self, device: int) -> int:
        """Its share on ``device`` (0 when it is not there)."""
        return share_mb(self.mb, len(self.devices)) if device in self.devices else 0

    def resident(self, device: int | None) -> Resident:
        """As the eviction policy sees it on ``device`` (None: wherever it is, all of it)."""
        h = self.holding
        mb = self.mb if device is None else self.on(device)
        pinned = h.pinned or (h.entry is not None and h.entry.pinned)
        priority = h.entry.priority if h.entry is not None else h.priority
        return Resident(
            h.name,
            mb,
            h.last_used,
            h.in_flight,
            h.protected or not h.evict,
            pinned=pinned,
            priority=priority,
            cost_s=self.cost_s,
        )


def locate(
    holdings: Sequence[Holding],
    snapshots: Sequence[GpuSnapshot],
    placed: Callable[[Holding], tuple[int, ...] | None],
    size: Callable[[Holding], int],
    cost: Callable[[str], float | None] | None = None,
) -> list[Held]:
    """Each holding with its size and devices: where the arbiter placed it, else where its
    process holds memory, else device 0 (a budget with devices) or nowhere."""
    by_pid: dict[int, list[Holding]] = {}
    found: dict[str, tuple[int, ...]] = {}
    for holding in holdings:
        where = placed(holding)
        if where:
            found[holding.name] = where
        elif holding.pid is not None:
            by_pid.setdefault(holding.pid, []).append(holding)
    for pid, group in by_pid.items():
        left = {s.index: int(s.processes.get(pid, 0)) for s in snapshots if s.processes.get(pid)}
        for holding in sorted(group, key=lambda h: (-size(h), h.name)):
            if left:
                device = max(left, key=lambda d: (left[d], -d))
                left[device] -= size(holding)
                found[holding.name] = (device,)
    default = (0,) if snapshots else ()
    return [
        Held(h, size(h), found.get(h.name, default), cost(h.name) if cost else None)
        for h in holdings
    ]


def host_used(held: Sequence[Held]) -> int:
    """Host RAM our sleeping models hold, MiB (what the sleep budget has spent)."""
    return sum(h.holding.host_mb for h in held if h.holding.sleeping)


def adopt(
    held: Sequence[Held], snaps: Sequence[GpuSnapshot], placements: dict[str, tuple[int, ...]]
) -> None:
    """Record in ``placements`` where located models are that the arbiter did not place: an
    Ollama model (where Ollama put it shows in /admin/state), an engine adopted after a restart
    (where its process holds memory: the earlier proxy's placement died with it)."""
    for item in held:
        pid = item.holding.pid
        if not item.devices:
            continue
        if item.holding.entry is None or (
            item.name not in placements and any(pid in s.processes for s in snaps)
        ):
            placements[item.name] = item.devices


def plan(
    snaps: Sequence[GpuSnapshot],
    held: Sequence[Held],
    need: int | None,
    pin: tuple[int, ...] | None,
    span: int,
    lent: Collection[int],
    views: Callable[[Collection[int]], list[Device]],
    headroom_mb: int,
) -> Placement:
    """Where ``need`` MB goes (None: a whole device, for a lease) and what must be evicted
    there; ``views``: the devices as placement sees them with the given devices lent."""
    if need is None:  # a whole device for a lease: everything idle there goes
        device = (pin or (0,))[0]
        mine = [h.resident(device) for h in held if not h.holding.foreign and h.on(device)]
        if not snaps:  # no budget: the whole GPU is everything idle, wherever it is
            mine = [h.resident(None) for h in held if not h.holding.foreign]
        return Placement((device,), plan_exclusive(mine))
    found = place(views(lent), need, pin=pin, span=span, headroom_mb=headroom_mb)
    if not found.devices and lent:
        # Only lent devices could take it: the request was admitted with the lease's
        # token (``admit`` refuses anyone else), so the holder's model may use its device.
        found = place(views(()), need, pin=pin, span=span, headroom_mb=headroom_mb)
    return found


def effective_free(
    snapshot: GpuSnapshot,
    held: Sequence[Held],
    *,
    measured: bool = True,
    exiting: Collection[int] = (),
) -> int:
    """Free memory as the probe says, less what models still loading are booked for beyond
    what their processes hold yet (a measured probe only: a declared budget already counts
    them), so that two starts never count the same memory; plus what engines of ours that
    have exited still hold (``exiting``): the driver gives it back a moment after the process
    is gone, so it is waited for, not made room for by evicting a healthy model."""
    coming_back = sum(int(snapshot.processes.get(pid, 0)) for pid in exiting)
    pending = 0
    if measured:
        for item in held:
            if item.holding.protected and (booked := item.on(snapshot.index)):
                pid = item.holding.pid
                holds = int(snapshot.processes.get(pid, 0)) if pid is not None else 0
                pending += max(0, booked - holds)
    return max(0, snapshot.free_mb + coming_back - pending)


def strangers_on(snapshot: GpuSnapshot, held: Sequence[Held]) -> list[tuple[str, int]]:
    """Memory on the device held by processes that are not ours, as ("pid N", MiB). (A fake
    probe that keys memory by holder name rather than pid tells nothing about strangers.)"""
    ours = {h.holding.pid for h in held if h.holding.pid is not None}
    return [
        (f"pid {key}", mb)
        for key, mb in sorted(snapshot.processes.items(), key=lambda item: str(item[0]))
        if isinstance(key, int) and key not in ours
    ]


def devices_for_placement(
    snapshots: Sequence[GpuSnapshot],
    held: Sequence[Held],
    lent: Collection[int],
    *,
    measured: bool = True,
    exiting: Collection[int] = (),
) -> list[Device]:
    return [
        Device(
            s.index,
            effective_free(s, held, measured=measured, exiting=exiting),
            tuple(h.resident(s.index) for h in held if not h.holding.foreign and h.on(s.index)),
            available=s.index not in lent,
        )
        for s in snapshots
    ]


def report(
    snapshots: Sequence[GpuSnapshot], held: Sequence[Held], leases: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``/v1/gpu/status`` ``devices``: one entry per device."""
    rows = []
    for snap in snapshots:
        here = [h for h in held if h.on(snap.index)]
        models = [
            {
                "name": h.name,
                "vram_mb": h.on(snap.index),
                "in_flight": h.holding.in_flight,
                **({"sleeping": True, "host_mb": h.holding.host_mb} if h.holding.sleeping else {}),
            }
            for h in here
            if not h.holding.foreign
        ]
        foreign = [{"name": h.name, "vram_mb": h.on(snap.index)} for h in here if h.holding.foreign]
        foreign += [{"name": key, "vram_mb": mb} for key, mb in strangers_on(snap, held)]
        ours = sum(h.on(snap.index) for h in here if not h.holding.foreign)
        rows.append(
            {
                "index": snap.index,
                "name": snap.name,
                "total_mb": snap.total_mb,
                "used_mb": snap.used_mb,
                "free_mb": snap.free_mb,
                "ours_mb": ours,
                "foreign_mb": max(0, snap.used_mb - ours),
                "models": models,
                "foreign": foreign,
                "lease": next((le for le in leases if le.get("device") == snap.index), None),
                "utilization_pct": snap.utilization_pct,
                "temperature_c": snap.temperature_c,
                "power_w": snap.power_w,
            }
        )
    return rows


def never_fits(
    snaps: list[GpuSnapshot],
    need: int,
    reason: str,
    pin: tuple[int, ...] | None,
    span: int,
    headroom_mb: int,
) -> None:
    """Refuse at once, and not as a 503 to retry, what no eviction or wait could ever
    place: a pin to a GPU the box lacks, more GPUs than it has, a share bigger than a whole
    card. (These read "cannot free 1000 MB: GPU 0 free=8000 MB, busy: none", Retry-After.)"""
    indexes = [s.index for s in snaps]
    wanted = len(pin) if pin else span
    problem = None
    if pin and (missing := [i for i in pin if i not in indexes]):
        problem = f"it is pinned to GPU {missing} (the entry's gpus), and this box has GPUs"
    elif wanted > len(indexes):
        problem = f"it spans {wanted} GPUs, and this box has GPUs"
    else:
        totals = sorted((s.total_mb for s in snaps if not pin or s.index in pin), reverse=True)
        each = share_mb(need, wanted)
        if totals[wanted - 1] < each + headroom_mb:
            room = f" (+{headroom_mb} MB headroom)" if headroom_mb else ""
            problem = (
                f"it needs {each} MB{room} on each of {wanted} GPU(s), more than a whole "
                f"card holds ({', '.join(f'{t} MB' for t in totals)}), on GPUs"
            )
    if problem is not None:
        raise InsufficientVram(
            f"[gpu-arbiter] {reason} can never be placed here: {problem} {indexes}",
            status=409,
        )


def wait_targets(
    snaps: list[GpuSnapshot],
    held: list[Held],
    found: Placement,
    need: int | None,
    headroom_mb: int,
) -> dict[int, int]:
    """Free memory to wait for on each device of the placement."""
    targets = {}
    for snap in snaps:
        if snap.index not in found.devices:
            continue
        if need is not None:
            targets[snap.index] = share_mb(need, len(found.devices)) + headroom_mb
        else:
            # A whole device: never all of it (the driver and strangers hold some), so
            # wait for what the evicted models held there, less 10% for estimates.
            freed = sum(h.on(snap.index) for h in held if h.name in found.plan.evict)
            targets[snap.index] = snap.free_mb + int(freed * 0.9)
    return targets


def refusal(
    views: list[Device], need: int | None, reason: str, found: Placement
) -> InsufficientVram:
    """No room now, and none to be made by evicting: a 503 to retry later."""
    free = ", ".join(f"GPU {v.index} free={v.free_mb} MB" for v in views)
    if len(views) == 1:
        free = f"free={views[0].free_mb} MB"
    busy = ", ".join(found.plan.blocked_by) or "none"
    return InsufficientVram(
        f"[gpu-arbiter] cannot free {need if need is not None else 'the GPU'} MB for "
        f"{reason}: {free}, busy: {busy}",
        headers={"Retry-After": "30"},
    )


def status(snap: GpuSnapshot | None, held: list[Held]) -> dict[str, Any]:
    """Device 0 and what holds memory, as ``/v1/gpu/status`` shows them."""
    return {
        "gpu": None
        if snap is None
        else {
            "name": snap.name,
            "total_mb": snap.total_mb,
            "used_mb": snap.used_mb,
            "free_mb": snap.free_mb,
        },
        "models": [
            {"name": h.name, "vram_mb": h.mb, "in_flight": h.holding.in_flight}
            for h in held
            if not h.holding.foreign
        ],
        "foreign": [{"name": h.name, "vram_mb": h.mb} for h in held if h.holding.foreign],
    }


def pinned_refusal(need: int | None, reason: str, plan: Plan) -> InsufficientVram:
    """Room only evicting a pinned model could make: refused, never done."""
    pinned = ", ".join(plan.pinned)
    what = "the whole GPU" if need is None else f"{need} MB"
    return InsufficientVram(
        f"[gpu-arbiter] {reason} refused: {what} could only be freed by evicting pinned "
        f"model(s) {pinned}, and a pinned model is never evicted (unpin it or stop it by "
        "hand)",
        status=409,
    )
