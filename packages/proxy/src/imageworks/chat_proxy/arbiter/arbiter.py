"""The VRAM arbiter: one ledger of GPU memory across vLLM, Ollama and llama.cpp.

Before a model starts, ``make_room`` compares free memory (minus ``headroom``) with what the
model needs (its learned footprint, else ``vram_estimate_mb``), evicts idle models chosen by
the pure policy (``policy.plan_evictions``), and waits until the probe shows the memory back.
Busy models are never evicted: the arbiter waits for them (bounded) instead. Models someone
else loaded (a foreign Ollama model) are never evicted either; they are foreign memory.

What holds the GPU comes from the lifecycle through ``seams.Residency``; leases live in
``leases.LeaseDesk``, which asks this arbiter to free memory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageworks.chat_proxy.arbiter.gpu import GpuProbe, GpuSnapshot
from imageworks.chat_proxy.arbiter.leases import LeaseDesk
from imageworks.chat_proxy.arbiter.policy import Plan, Resident, plan_evictions, plan_exclusive
from imageworks.chat_proxy.arbiter.seams import Holding, Residency
from imageworks.chat_proxy.errors import InsufficientVram
from imageworks.model_loader.schema import ModelEntry

if TYPE_CHECKING:
    from imageworks.chat_proxy.metrics import Metrics
    from imageworks.chat_proxy.requestlog import RequestLog

log = logging.getLogger("imageworks.chat_proxy.arbiter")


class VramArbiter:
    def __init__(
        self,
        probe: GpuProbe,
        residency: Residency,
        *,
        staging_dir: Path,
        headroom_mb: int = 1024,
        vram_timeout_s: float = 60.0,
        wait_timeout_s: float = 120.0,
        default_ttl_s: float = 900.0,
        request_log: RequestLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.probe = probe
        self.residency = residency
        self.headroom_mb = headroom_mb
        self.vram_timeout_s = vram_timeout_s
        self.wait_timeout_s = wait_timeout_s
        self.request_log = request_log
        self.metrics = metrics
        self.learned_mb: dict[str, int] = {}
        self.last_snapshot: GpuSnapshot | None = None
        self.last_holdings: list[Holding] = []
        self._room_lock = asyncio.Lock()
        self.leases = LeaseDesk(
            staging_dir,
            free=self._free_for_lease,
            restore=residency.restore,
            default_ttl_s=default_ttl_s,
            request_log=request_log,
            metrics=metrics,
        )

    # --- the GpuGate the lifecycle uses --------------------------------------------------------

    def admit(self, entry: ModelEntry, token: str | None) -> None:
        self.leases.admit(token)

    def need_mb(self, entry: ModelEntry) -> int:
        """What ``entry`` takes: its own share of the card when it sets one (vLLM reserves
        exactly that), else its learned footprint, else its estimate."""
        own = entry.backend_config.gpu_memory_utilization
        total = self.last_snapshot.total_mb if self.last_snapshot is not None else 0
        if own and total:
            return math.ceil(own * total)
        return self.learned_mb.get(entry.name) or entry.vram_estimate_mb or 0

    def held_mb(self, holding: Holding) -> int:
        return self.need_mb(holding.entry) if holding.entry is not None else holding.vram_mb

    def share_of(self, entry: ModelEntry) -> float | None:
        """The fraction of the card ``entry`` needs (vLLM's ``--gpu-memory-utilization``), so
        that vLLM reserves what the ledger budgets, not a fixed 90%; None without a known
        total or need."""
        total = self.last_snapshot.total_mb if self.last_snapshot is not None else 0
        need = self.need_mb(entry)
        if not total or need <= 0:
            return None
        return min(1.0, math.ceil(need / total * 100) / 100)

    async def make_room(self, entry: ModelEntry, need_mb: int | None = None) -> None:
        """Before ``entry`` starts: evict idle models until it fits, and wait for the memory."""
        need = need_mb if need_mb is not None else self.need_mb(entry)
        if need <= 0:
            return
        async with self._room_lock:  # two starts must not both count the same free memory
            await self._free(need, reason=f"start {entry.name}", exclude=entry.name)

    async def learn(self, entry: ModelEntry, pid: int | None) -> None:
        """After a model is ready: remember what it really holds (per-process NVML usage)."""
        if pid is None or not self.probe.measures:
            return
        snap = await self.snapshot()
        used = snap.processes.get(pid) if snap else None
        if used:
            self.learned_mb[entry.name] = used

    async def released(self, pid: int | None) -> bool:
        """Verify an engine's memory came back: its pid gone from the per-process usage."""
        if pid is None or not self.probe.measures:
            return True
        deadline = time.monotonic() + self.vram_timeout_s
        while time.monotonic() < deadline:
            snap = await self.snapshot()
            if snap is None or pid not in snap.processes:
                return True
            await asyncio.sleep(0.1)
        log.warning("[gpu-arbiter] pid %s still holds GPU memory after it stopped", pid)
        return False

    # --- what holds the GPU ------------------------------------------------------------------

    async def snapshot(self) -> GpuSnapshot | None:
        snap = await self.probe.snapshot()
        self.last_snapshot = snap
        if snap is not None and self.metrics is not None:
            self.metrics.vram_total.set(snap.total_mb)
            self.metrics.vram_used.set(snap.used_mb)
        return snap

    async def holdings(self) -> list[Holding]:
        self.last_holdings = await self.residency.holdings()
        return self.last_holdings

    # --- making room ---------------------------------------------------------------------------

    async def _free_for_lease(self, need: int | None, reason: str) -> list[str]:
        async with self._room_lock:
            return await self._free(need, reason=reason)

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
            holdings = [h for h in await self.holdings() if h.name != exclude and not h.foreign]
            residents = [
                Resident(
                    h.name,
                    self.held_mb(h),
                    h.last_used,
                    h.in_flight,
                    h.protected or not h.evict,
                )
                for h in holdings
            ]
            evictors = {h.name: h.evict for h in holdings if h.evict is not None}
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

    # --- reporting -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        snap = self.last_snapshot
        foreign = [{"name": h.name, "vram_mb": h.vram_mb} for h in self.last_holdings if h.foreign]
        return {
            **self.leases.public(),
            "probe": self.probe.kind,
            "gpu": None
            if snap is None
            else {
                "name": snap.name,
                "total_mb": snap.total_mb,
                "used_mb": snap.used_mb,
                "free_mb": snap.free_mb,
            },
            "models": [
                {"name": h.name, "vram_mb": self.held_mb(h), "in_flight": h.in_flight}
                for h in self.last_holdings
                if not h.foreign
            ],
            "foreign": foreign,
        }

    def _event(self, event: str, **fields: Any) -> None:
        if self.request_log is not None:
            self.request_log.event(event, "gpu-arbiter", **fields)
