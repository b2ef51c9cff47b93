"""The VRAM arbiter: one ledger of GPU memory across vLLM, Ollama and llama.cpp.

Before a model starts, ``make_room`` compares free memory (minus ``headroom``) with what the
model needs (its learned footprint, else ``vram_estimate_mb``), evicts idle models chosen by
the pure policy (``policy.plan_evictions``), and waits until the probe shows the memory back.
Busy models are never evicted: the arbiter waits for them (bounded) instead.

It also lends the GPU: a lease evicts what it needs, waits for the memory, and while it is held
any request that would use the GPU gets 423 unless it carries the lease's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from imageworks.chat_proxy.arbiter.gpu import GpuProbe, GpuSnapshot
from imageworks.chat_proxy.arbiter.leases import Lease, LeaseStore, new_token
from imageworks.chat_proxy.arbiter.ollama import OllamaManager
from imageworks.chat_proxy.arbiter.policy import Plan, Resident, plan_evictions, plan_exclusive
from imageworks.chat_proxy.errors import GpuLeaseActive, InsufficientVram, InvalidRequest
from imageworks.model_loader.schema import ModelEntry

if TYPE_CHECKING:
    from imageworks.chat_proxy.lifecycle import Lifecycle
    from imageworks.chat_proxy.metrics import Metrics
    from imageworks.chat_proxy.requestlog import RequestLog

log = logging.getLogger("imageworks.chat_proxy.arbiter")


def uses_gpu(entry: ModelEntry) -> bool:
    """vLLM always does; other engines when the entry declares a VRAM need (the embedded
    CPU model declares 0 and keeps working while the GPU is lent out)."""
    return entry.backend == "vllm" or (entry.vram_estimate_mb or 0) > 0


class VramArbiter:
    def __init__(
        self,
        probe: GpuProbe,
        lifecycle: Lifecycle,
        *,
        staging_dir: Any,
        ollama: Callable[[ModelEntry], OllamaManager],
        registry: Callable[[], Any],
        headroom_mb: int = 1024,
        vram_timeout_s: float = 60.0,
        wait_timeout_s: float = 120.0,
        default_ttl_s: float = 900.0,
        request_log: RequestLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.probe = probe
        self.lifecycle = lifecycle
        self.ollama_for = ollama
        self.registry = registry
        self.headroom_mb = headroom_mb
        self.vram_timeout_s = vram_timeout_s
        self.wait_timeout_s = wait_timeout_s
        self.default_ttl_s = default_ttl_s
        self.request_log = request_log
        self.metrics = metrics
        self.learned_mb: dict[str, int] = {}
        self.ollama_recent: dict[str, float] = {}  # entry name -> when it was last seen loaded
        self.store = LeaseStore(staging_dir)
        self.lease: Lease | None = self.store.load()
        self.pending_lease: str | None = None  # owner of a lease being granted
        self.last_snapshot: GpuSnapshot | None = None
        self._lease_lock = asyncio.Lock()
        self._room_lock = asyncio.Lock()
        self._restoring: set[asyncio.Task[None]] = set()
        if self.lease is not None and self.lease.expired():
            self._event("lease_expired", owner=self.lease.owner, while_down=True)
            self.lease = None
            self.store.save(None)

    # --- what holds the GPU ------------------------------------------------------------------

    def need_mb(self, entry: ModelEntry) -> int:
        return self.learned_mb.get(entry.name) or entry.vram_estimate_mb or 0

    async def snapshot(self) -> GpuSnapshot | None:
        snap = await self.probe.snapshot()
        self.last_snapshot = snap
        if snap is not None and self.metrics is not None:
            self.metrics.vram_total.set(snap.total_mb)
            self.metrics.vram_used.set(snap.used_mb)
        return snap

    async def residents(self) -> tuple[list[Resident], dict[str, Callable[[], Awaitable[bool]]]]:
        """Everything on the GPU that could be evicted, and how to evict each."""
        residents: list[Resident] = []
        evictors: dict[str, Callable[[], Awaitable[bool]]] = {}
        registry = self.registry()
        for slot in self.lifecycle.slots.values():
            name = slot.active
            if name is None or name not in registry.names:
                continue
            entry = registry.get(name)
            if not uses_gpu(entry):
                continue
            # A model that is starting or stopping is not idle: leave it to its slot.
            residents.append(
                Resident(
                    name,
                    self.need_mb(entry),
                    self.lifecycle.last_used(name),
                    slot.in_flight,
                    protected=slot.state != "ready",
                )
            )
            evictors[name] = functools.partial(slot.evict, name, "vram")
        managers: dict[str, OllamaManager] = {}
        for entry in registry:
            if entry.backend == "ollama":
                manager = self.ollama_for(entry)
                managers.setdefault(manager.base_url, manager)
        for manager in managers.values():
            for tag, loaded in (await manager.loaded()).items():
                entry = next(
                    (e for e in registry if e.backend == "ollama" and e.upstream_id == tag), None
                )
                name = entry.name if entry is not None else f"ollama:{tag}"
                residents.append(
                    Resident(
                        name,
                        loaded.vram_mb or (entry and self.need_mb(entry)) or 0,
                        self.lifecycle.last_used(name),
                        self.lifecycle.in_flight.get(name, 0),
                    )
                )
                evictors[name] = functools.partial(manager.unload, tag)
        return residents, evictors

    # --- making room ---------------------------------------------------------------------------

    async def make_room(self, entry: ModelEntry) -> None:
        """Before ``entry`` starts: evict idle models until it fits, and wait for the memory."""
        need = self.need_mb(entry)
        if not uses_gpu(entry) or need <= 0:
            return
        async with self._room_lock:  # two starts must not both count the same free memory
            await self._free(need, reason=f"start {entry.name}", exclude=entry.name)

    async def _free(
        self, need: int | None, *, reason: str, exclude: str | None = None
    ) -> list[str]:
        """Evict until ``need`` MB (None: everything) is free; returns what was evicted."""
        deadline = time.monotonic() + self.wait_timeout_s
        evicted: list[str] = []
        while True:
            snap = await self.snapshot()
            if snap is None and need is not None:
                return evicted  # no budget to enforce
            residents, evictors = await self.residents()
            residents = [r for r in residents if r.name != exclude]
            plan: Plan
            if need is None:
                plan = plan_exclusive(residents)
            else:
                assert snap is not None
                plan = plan_evictions(residents, need, snap.free_mb, self.headroom_mb)
            # Evict only when that achieves something: for a lease of the whole GPU every
            # idle model goes anyway; for a need, only a plan that fits is worth its evictions.
            if plan.sufficient or need is None:
                evicted += await self._evict(plan.evict, evictors, reason)
            if plan.sufficient:
                if need is not None:
                    target = need + self.headroom_mb
                else:
                    # The whole GPU: never all of it (the driver and strangers hold some), so
                    # wait for what the evicted models held, less 10% for estimates.
                    target = (snap.free_mb if snap else 0) + int(plan.freed_mb * 0.9)
                await self._await_memory(target, reason)
                return evicted
            free = snap.free_mb if snap else 0
            if not plan.blocked_by or time.monotonic() >= deadline:
                busy = ", ".join(plan.blocked_by) or "none"
                raise InsufficientVram(
                    f"[gpu-arbiter] cannot free {need if need is not None else 'the GPU'} MB for "
                    f"{reason}: free={free} MB, busy: {busy}",
                    headers={"Retry-After": "30"},
                )
            log.info(
                "[gpu-arbiter] %s waits for busy models: %s", reason, ", ".join(plan.blocked_by)
            )
            await asyncio.sleep(0.5)

    async def _evict(
        self,
        names: tuple[str, ...],
        evictors: dict[str, Callable[[], Awaitable[bool]]],
        reason: str,
    ) -> list[str]:
        evicted = []
        for name in names:
            if await evictors[name]():
                evicted.append(name)
                self._event("evict", model=name, reason=reason)
                if self.metrics is not None:
                    self.metrics.evictions.labels(reason.split()[0]).inc()
        return evicted

    async def _await_memory(self, target_free_mb: int, reason: str) -> None:
        """Evicted processes take a moment to give memory back: wait until the probe agrees."""
        deadline = time.monotonic() + self.vram_timeout_s
        logged = False
        while True:
            snap = await self.snapshot()
            if snap is None or snap.free_mb >= target_free_mb:
                return
            if not logged:
                log.info(
                    "[gpu-arbiter] waiting for VRAM need=%s free=%s (%s)",
                    target_free_mb - self.headroom_mb,
                    snap.free_mb,
                    reason,
                )
                logged = True
            if time.monotonic() >= deadline:
                raise InsufficientVram(
                    f"[gpu-arbiter] VRAM did not come back within {self.vram_timeout_s:.0f} s for "
                    f"{reason}: need={target_free_mb} MB free={snap.free_mb} MB",
                    headers={"Retry-After": "30"},
                )
            await asyncio.sleep(0.2)

    async def learn(self, entry: ModelEntry, pid: int | None) -> None:
        """After a model is ready: remember what it really holds (per-process NVML usage)."""
        if pid is None or not self.probe.measures:
            return
        snap = await self.snapshot()
        used = snap.processes.get(pid) if snap else None
        if used:
            self.learned_mb[entry.name] = used

    async def before_ollama(self, entry: ModelEntry) -> None:
        """Ollama loads models itself on first use: make room first if it is not loaded."""
        if not uses_gpu(entry):
            return
        if time.monotonic() - self.ollama_recent.get(entry.name, -1e9) < 30:
            return
        loaded = await self.ollama_for(entry).loaded()
        if entry.upstream_id not in loaded:
            await self.make_room(entry)
        self.ollama_recent[entry.name] = time.monotonic()

    # --- leases --------------------------------------------------------------------------------

    def admit(self, entry: ModelEntry, token: str | None) -> None:
        """Refuse GPU work while the GPU is lent, unless the request carries the lease token."""
        if not uses_gpu(entry):
            return
        self._expire_if_due()
        if self.pending_lease is not None:
            raise GpuLeaseActive(
                f"the GPU is being lent to {self.pending_lease!r}; retry later",
                headers={"Retry-After": "30"},
            )
        lease = self.lease
        if lease is not None and token != lease.token:
            left = max(0, int(lease.expires_at - time.time()))
            raise GpuLeaseActive(
                f"the GPU is leased to {lease.owner!r} ({lease.reason or 'no reason given'}) for "
                f"up to {left} s more; requests that need it must send X-GPU-Lease-Token",
                headers={"Retry-After": str(min(left, 60) or 1)},
            )

    async def grant(
        self,
        owner: str,
        reason: str,
        *,
        restart_model: bool,
        ttl_s: float | None,
        need_mb: int | None,
    ) -> Lease:
        async with self._lease_lock:
            self._expire_if_due()
            if self.lease is not None:
                raise GpuLeaseActive(
                    f"the GPU is already leased to {self.lease.owner!r}",
                    headers={"Retry-After": "30"},
                )
            self.pending_lease = owner
            try:
                async with self._room_lock:
                    evicted = await self._free(need_mb, reason=f"lease {owner}")
            finally:
                self.pending_lease = None
            lease = Lease(
                new_token(),
                owner,
                reason,
                restart_model,
                ttl_s or self.default_ttl_s,
                need_mb,
                evicted=evicted,
            )
            self.lease = lease
            self.store.save(lease)
            self._lease_changed("lease_granted", lease)
            return lease

    def renew(self, token: str) -> Lease:
        lease = self._held(token)
        lease.renewed_at = time.time()
        self.store.save(lease)
        self._event("lease_renewed", owner=lease.owner)
        return lease

    def release(self, token: str, *, restart_model: bool | None = None) -> list[str]:
        return self._end(self._held(token), "lease_released", restart_model)

    def force_release(
        self,
        *,
        owner: str | None = None,
        max_age_s: float | None = None,
        restart_model: bool | None = None,
    ) -> list[str] | None:
        self._expire_if_due()
        lease = self.lease
        if lease is None:
            return None
        if owner is not None and owner != lease.owner:
            raise InvalidRequest(
                f"the lease belongs to {lease.owner!r}, not {owner!r}", param="owner"
            )
        if max_age_s is not None and time.time() - lease.granted_at < max_age_s:
            raise InvalidRequest(f"the lease is younger than {max_age_s:.0f} s", param="max_age_s")
        return self._end(lease, "lease_force_released", restart_model)

    def status(self) -> dict[str, Any]:
        self._expire_if_due()
        snap = self.last_snapshot
        return {
            "leased": self.lease is not None,
            "lease": self.lease.public() if self.lease else None,
            "pending": self.pending_lease,
            "probe": self.probe.kind,
            "gpu": None
            if snap is None
            else {
                "name": snap.name,
                "total_mb": snap.total_mb,
                "used_mb": snap.used_mb,
                "free_mb": snap.free_mb,
            },
        }

    def _held(self, token: str) -> Lease:
        self._expire_if_due()
        if self.lease is None or token != self.lease.token:
            raise InvalidRequest(
                "the lease token is invalid or the lease has expired", param="token"
            )
        return self.lease

    def _expire_if_due(self) -> None:
        if self.lease is not None and self.lease.expired():
            self._end(self.lease, "lease_expired", None)

    def _end(self, lease: Lease, event: str, restart_model: bool | None) -> list[str]:
        self.lease = None
        self.store.save(None)
        self._lease_changed(event, lease)
        restore = (
            lease.restart_model
            if restart_model is None
            else (restart_model and lease.restart_model)
        )
        if not restore:
            return []
        registry = self.registry()
        names = [
            n
            for n in lease.evicted
            if n in registry.names and self.lifecycle.managed(registry.get(n))
        ]
        for name in names:
            task = asyncio.get_running_loop().create_task(self._restore(registry.get(name)))
            self._restoring.add(task)
            task.add_done_callback(self._restoring.discard)
        return names

    async def _restore(self, entry: ModelEntry) -> None:
        try:
            await self.lifecycle.activate(entry)
            self._event("restore", model=entry.name, result="ready")
        except Exception as exc:
            self._event("restore", model=entry.name, result="failed", error=str(exc))

    async def expiry_loop(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self._expire_if_due()

    async def close(self, *, release_lease: bool = True) -> None:
        for task in list(self._restoring):
            task.cancel()
        if release_lease and self.lease is not None:
            self._end(self.lease, "lease_released_at_shutdown", False)

    def _lease_changed(self, event: str, lease: Lease) -> None:
        self._event(event, owner=lease.owner, reason=lease.reason, evicted=lease.evicted)
        if self.metrics is not None:
            self.metrics.lease_active.set(1 if self.lease is not None else 0)
            self.metrics.lease_events.labels(event.removeprefix("lease_")).inc()

    def _event(self, event: str, **fields: Any) -> None:
        if self.request_log is not None:
            self.request_log.event(event, "gpu-arbiter", **fields)


async def unload_ollama_everywhere(managers: list[OllamaManager]) -> list[str]:
    unloaded: list[str] = []
    for manager in managers:
        with contextlib.suppress(Exception):
            unloaded += await manager.unload_all()
    return unloaded
