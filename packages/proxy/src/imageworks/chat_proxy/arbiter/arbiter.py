"""The VRAM arbiter: one ledger of GPU memory per device across vLLM, Ollama and llama.cpp.

Before a model starts, ``make_room`` places it (``placement.place``: its pinned devices, else
the device where it fits with the least eviction), evicts the idle models the pure policy
chose there, and waits until the probe shows the memory back on those devices. What a model
needs is its own ``gpu_memory_utilization`` of its device, else its learned footprint, else
the estimate read from its files before its first start (``estimate``), else
``vram_estimate_mb``; vLLM is then told that need over its device's total.
Busy models are never evicted: the arbiter waits for them (bounded) instead. Models someone
else loaded (a foreign Ollama model) are never evicted either; they are foreign memory.

What holds the GPU comes from the lifecycle through ``seams.Residency``; leases live in
``leases.LeaseDesk``, which asks this arbiter to free memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageworks.chat_proxy.arbiter import ledger, memory, sizing
from imageworks.chat_proxy.arbiter.estimate import Estimate, estimate
from imageworks.chat_proxy.arbiter.eviction import Evictions
from imageworks.chat_proxy.arbiter.gpu import GpuProbe, GpuSnapshot
from imageworks.chat_proxy.arbiter.leases import LeaseDesk
from imageworks.chat_proxy.arbiter.placement import Device, Placement, place
from imageworks.chat_proxy.arbiter.policy import Plan, only_pinned_block
from imageworks.chat_proxy.arbiter.seams import Holding, Residency
from imageworks.chat_proxy.arbiter.tiers import SleepBook
from imageworks.chat_proxy.errors import InvalidRequest
from imageworks.chat_proxy.observe.progress import SLOW_FACTOR
from imageworks.chat_proxy.supervision.procfs import pid_alive
from imageworks.model_loader.schema import ModelEntry

if TYPE_CHECKING:
    from imageworks.chat_proxy.observe.metrics import Metrics
    from imageworks.chat_proxy.observe.requestlog import RequestLog

log = logging.getLogger(__name__)


class VramArbiter(Evictions):
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
        sleep_ram_mb: int | None = None,
    ) -> None:
        self.probe = probe
        self.sleeps = SleepBook(sleep_ram_mb)  # eviction by sleep: its budget and measures
        self.residency = residency
        self.headroom_mb = headroom_mb
        self.vram_timeout_s = vram_timeout_s
        self.wait_timeout_s = wait_timeout_s
        self.request_log = request_log
        self.metrics = metrics
        self.learned_mb: dict[str, int] = {}
        # Read from the model's files before its first start (``estimate``), by what was read.
        self.estimates: dict[tuple[str, str | None, tuple[str, ...]], Estimate | None] = {}
        # Measured seconds from room made to ready (a cold start): the cost of evicting it.
        self.load_s: dict[str, float] = {}
        self._room_made: dict[str, float] = {}
        self.placements: dict[str, tuple[int, ...]] = {}
        self.last_devices: list[GpuSnapshot] = []
        self.last_holdings: list[Holding] = []
        # Our engines' pids, when last seen holding: memory of one that has since exited is
        # on its way back (see ``_exiting``).
        self._engine_pids: dict[int, float] = {}
        self._room_lock = asyncio.Lock()
        self.leases = LeaseDesk(
            staging_dir,
            free=self._free_for_lease,
            choose=self._device_for_lease,
            restore=residency.restore,
            default_ttl_s=default_ttl_s,
            request_log=request_log,
            metrics=metrics,
        )

    @property
    def last_snapshot(self) -> GpuSnapshot | None:
        """Device 0, as last probed (a one-GPU view)."""
        return self.last_devices[0] if self.last_devices else None

    # --- the GpuGate the lifecycle uses --------------------------------------------------------

    def admit(self, entry: ModelEntry, token: str | None) -> None:
        """Refuse ``entry`` while a device it would use is lent. A model already running (or
        pinned) uses its devices; one the arbiter may still place is refused only when every
        device is lent."""
        lent = self.leases.lent()
        running = any(h.name == entry.name for h in self.last_holdings)
        devices = tuple(entry.gpus or ()) or (self.placements.get(entry.name) if running else ())
        if devices:
            self.leases.admit(token, devices)
            return
        every = {s.index for s in self.last_devices} or {0}
        self.leases.admit(token, None if (-1 in lent or every <= lent) else ())

    def _total_of(self, device: int) -> int:
        return next((s.total_mb for s in self.last_devices if s.index == device), 0)

    def _devices_of(self, entry: ModelEntry) -> tuple[int, ...]:
        return self.placements.get(entry.name) or tuple(entry.gpus or ()) or (0,)

    def need_mb(self, entry: ModelEntry) -> int:
        """What ``entry`` takes over all its devices: its own share of each when it sets one
        (vLLM reserves exactly that), else its learned footprint, else its estimate."""
        devices = self._devices_of(entry)
        total = self._total_of(devices[0])
        learned, found = self.learned_mb.get(entry.name), self.estimate_of(entry)
        return sizing.need_mb(entry, devices, total, learned, found)

    def estimate_of(self, entry: ModelEntry) -> Estimate | None:
        """The estimate read from ``entry``'s files, once ``estimate_now`` has read them."""
        return self.estimates.get(sizing.estimate_key(entry))

    async def estimate_now(self, entry: ModelEntry) -> Estimate | None:
        """Read ``entry``'s files (once per model path and arguments), off the event loop."""
        key = sizing.estimate_key(entry)
        if key not in self.estimates:
            self.estimates[key] = await asyncio.to_thread(estimate, entry)
        return self.estimates[key]

    def sizing(self, entry: ModelEntry) -> dict[str, Any]:
        """What ``/admin/state`` shows of a model's size: declared, estimated, learned, and
        which one placement uses now."""
        found = self.estimate_of(entry)
        learned = self.learned_mb.get(entry.name)
        return {
            "need_mb": self.need_mb(entry) or None,
            "from": sizing.source(entry, learned, found),
            "declared_mb": entry.vram_estimate_mb,
            "estimate": found.public() if found else None,
            "learned_mb": learned,
            "load_s": self.load_s.get(entry.name),
            "wake_s": self.sleeps.wake_s.get(entry.name),
            "sleep_host_mb": self.sleeps.host_mb.get(entry.name),
        }

    def held_mb(self, holding: Holding) -> int:
        if holding.entry is None or holding.sleeping:  # asleep: only its residue
            return holding.vram_mb
        return self.need_mb(holding.entry)

    def slept(self, entry: ModelEntry, host_mb: int | None) -> None:
        self.sleeps.slept(entry.name, host_mb)

    def woke(self, entry: ModelEntry, wake_s: float) -> None:
        self.sleeps.woke(entry.name, wake_s)

    def share_of(self, entry: ModelEntry) -> float | None:
        """The fraction of its device ``entry`` needs (vLLM's ``--gpu-memory-utilization``), so
        that vLLM reserves what the ledger budgets, not a fixed 90%; None without a known
        total or need."""
        devices = self._devices_of(entry)
        return sizing.share(self.need_mb(entry), len(devices), self._total_of(devices[0]))

    def placement_of(self, entry: ModelEntry) -> tuple[int, ...] | None:
        return self.placements.get(entry.name)

    async def make_room(self, entry: ModelEntry, need_mb: int | None = None) -> None:
        """Before ``entry`` starts: place it, evict idle models there until it fits, and wait
        for the memory."""
        pin = tuple(entry.gpus) if entry.gpus else None
        if need_mb is None and entry.name not in self.learned_mb:
            await self.estimate_now(entry)  # a model never run here: its files say its size
        async with self._room_lock:  # two starts must not both count the same free memory
            await self.snapshot()
            need = need_mb if need_mb is not None else self.need_mb(entry)
            if need <= 0:  # nothing to budget: a pin still says where it runs
                if pin:
                    self.placements[entry.name] = pin
                return
            devices, _ = await self._free(
                need, reason=f"start {entry.name}", exclude=entry.name, pin=pin, span=entry.gpu_span
            )
            if devices:
                self.placements[entry.name] = devices
                self._event("place", model=entry.name, devices=list(devices), need_mb=need)
        self._room_made[entry.name] = time.monotonic()

    async def learn(self, entry: ModelEntry, pid: int | None) -> None:
        """After a model is ready: remember what it really holds (per-process use on its
        devices) and how long it took to start (what evicting it will cost)."""
        made = self._room_made.pop(entry.name, None)
        if made is not None:
            took = round(time.monotonic() - made, 3)
            before = self.load_s.get(entry.name)
            if before and took > SLOW_FACTOR * before:  # said so, in the JSONL and the stream
                self._event("slow_start", model=entry.name, load_s=took, expected_s=before)
            self.load_s[entry.name] = took
        if pid is None or not self.probe.measures:
            return
        snaps = await self.snapshot()
        used = sum(int(s.processes.get(pid, 0)) for s in snaps)
        if used:
            self.learned_mb[entry.name] = used

    async def released(self, pid: int | None) -> bool:
        """Verify an engine's memory came back: its pid gone from every device."""
        if pid is None or not self.probe.measures:
            return True
        deadline = time.monotonic() + self.vram_timeout_s
        while time.monotonic() < deadline:
            if not any(pid in s.processes for s in await self.snapshot()):
                return True
            await asyncio.sleep(0.1)
        log.warning("[gpu-arbiter] pid %s still holds GPU memory after it stopped", pid)
        return False

    # --- what holds the GPU ------------------------------------------------------------------

    async def snapshot(self) -> list[GpuSnapshot]:
        """Every device now (empty: no budget)."""
        snaps = await self.probe.devices()
        self.last_devices = snaps
        if self.metrics is not None:
            self.metrics.gpu_read(snaps)
        return snaps

    async def holdings(self) -> list[Holding]:
        self.last_holdings = await self.residency.holdings()
        now = time.monotonic()
        for holding in self.last_holdings:
            if holding.pid is not None and not holding.foreign:
                self._engine_pids[holding.pid] = now
        return self.last_holdings

    def _exiting(self, holdings: list[Holding]) -> frozenset[int]:
        """Pids of our engines that are no longer holdings and whose process is gone (a crash,
        a kill -9): the memory the probe still shows for them is coming back, as it does a
        moment after any process exits. Past ``vram_timeout_s`` it counts as a stranger's
        again (memory that never came back is not ours to wait for)."""
        current = {h.pid for h in holdings}
        return memory.exiting_pids(self._engine_pids, current, self.vram_timeout_s, pid_alive)

    def _views(
        self, snaps: list[GpuSnapshot], held: list[ledger.Held], lent: Collection[int]
    ) -> list[Device]:
        return ledger.devices_for_placement(
            snaps,
            held,
            lent,
            measured=self.probe.measures,
            exiting=self._exiting([h.holding for h in held]),
        )

    def _locate(self, holdings: list[Holding], snaps: list[GpuSnapshot]) -> list[ledger.Held]:
        def placed(holding: Holding) -> tuple[int, ...] | None:
            if holding.entry is None:
                return None  # Ollama places its own models: learned from its process's use
            return self.placements.get(holding.name) or tuple(holding.entry.gpus or ()) or None

        held = ledger.locate(holdings, snaps, placed, self.held_mb, self.cost_of)
        ledger.adopt(held, snaps, self.placements)
        return held

    # --- making room ---------------------------------------------------------------------------

    async def _device_for_lease(self, need: int | None, device: int | None) -> int:
        snaps = await self.snapshot()
        indexes = [s.index for s in snaps] or [0]
        if device is not None:
            if device not in indexes:
                raise InvalidRequest(
                    f"there is no GPU {device} (devices: {indexes})", param="device"
                )
            return device
        if need is None:
            return 0
        held = self._locate(await self.holdings(), snaps)
        lent = self.leases.lent()
        views = self._views(snaps, held, lent)
        found = place(views, need, headroom_mb=self.headroom_mb)
        return found.devices[0] if found.devices else 0

    async def _free_for_lease(self, need: int | None, reason: str, device: int) -> list[str]:
        async with self._room_lock:
            _, evicted = await self._free(need, reason=reason, pin=(device,), lease=True)
            return evicted

    def _plan(
        self,
        snaps: list[GpuSnapshot],
        held: list[ledger.Held],
        need: int | None,
        pin: tuple[int, ...] | None,
        span: int,
        lease: bool,
    ) -> Placement:
        lent = set() if lease else self.leases.lent()
        views = functools.partial(self._views, snaps, held)
        return ledger.plan(snaps, held, need, pin, span, lent, views, self.headroom_mb)

    async def _free(
        self,
        need: int | None,
        *,
        reason: str,
        exclude: str | None = None,
        pin: tuple[int, ...] | None = None,
        span: int = 1,
        lease: bool = False,
    ) -> tuple[tuple[int, ...], list[str]]:
        """Place ``need`` MB (None: a whole device) and evict there until it fits; returns the
        devices and what was evicted."""
        deadline = time.monotonic() + self.wait_timeout_s
        evicted: list[str] = []
        while True:
            snaps = await self.snapshot()
            if not snaps and need is not None:
                # No budget to enforce, nor devices to choose from: only a pin places it (an
                # engine that is not placed sees every GPU, as it would without the proxy).
                return tuple(pin or ()), evicted
            if need is not None:
                ledger.never_fits(snaps, need, reason, pin, span, self.headroom_mb)
            holdings = [h for h in await self.holdings() if h.name != exclude]
            held = self._locate(holdings, snaps)
            found = self._plan(snaps, held, need, pin, span, lease)
            plan: Plan = found.plan
            evictors = {h.name: h for h in holdings if h.evict is not None}
            # Evict only when that achieves something: for a lease of a whole device every
            # idle model there goes anyway; for a need, only a plan that fits is worth it.
            # A lease takes the whole device: nothing sleeps there, everything stops.
            if plan.sufficient or need is None:
                evicted += await self._evict(
                    plan.evict, evictors, reason, None if need is None else held
                )
            if need is not None and found.devices and only_pinned_block(plan):
                raise ledger.pinned_refusal(need, reason, plan)
            if need is None and plan.pinned:
                raise ledger.pinned_refusal(need, reason, plan)
            if plan.sufficient:
                await self._await_memory(
                    ledger.wait_targets(snaps, held, found, need, self.headroom_mb),
                    reason,
                    need is None,
                )
                return found.devices, evicted
            if not found.devices or not plan.blocked_by or time.monotonic() >= deadline:
                raise ledger.refusal(self._views(snaps, held, ()), need, reason, found)
            log.info(
                "[gpu-arbiter] %s waits for busy models: %s", reason, ", ".join(plan.blocked_by)
            )
            await asyncio.sleep(0.5)

    def cost_of(self, name: str) -> float | None:
        """What evicting ``name`` costs: the measured time to wake it (when it would sleep),
        else to start it again."""
        sleepable = any(h.name == name and h.sleep is not None for h in self.last_holdings)
        return self.sleeps.cost_s(name, sleepable, self.load_s.get(name))

    async def _await_memory(self, targets: dict[int, int], reason: str, whole: bool) -> None:
        """Evicted processes take a moment to give memory back: wait until the probe agrees
        on every device of the placement."""
        await memory.await_memory(
            self.snapshot,
            targets,
            reason,
            whole,
            timeout_s=self.vram_timeout_s,
            headroom_mb=self.headroom_mb,
            log=log,
        )

    # --- reporting -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        held = self._locate(self.last_holdings, self.last_devices)
        leases = self.leases.public()
        devices = ledger.report(self.last_devices, held, leases["leases"])
        if self.metrics is not None:
            self.metrics.gpu_ledger(devices)
        budget = "measured" if self.probe.measures else "declared"
        return {
            **leases,
            "probe": self.probe.kind,
            "budget": budget if self.last_devices else "none",
            **ledger.status(self.last_snapshot, held),
            "devices": devices,
            "host_ram": self.sleeps.public(held),
        }

    def _event(self, event: str, **fields: Any) -> None:
        if self.request_log is not None:
            self.request_log.event(event, "gpu-arbiter", **fields)
