"""Per-model lifecycle: start what a request needs, swap without dropping requests, and keep the
truth about every engine.

Managed models live in slots (``slot.Slot``: the state machine). This module owns the slots, the
per-model status and restart accounting (``modelstate``), and the loops that keep them true:
engine exits are reported by each backend's supervisor the moment they happen, a reconcile loop
(``upkeep``) asks every backend every ``CHAT_PROXY_RECONCILE_S`` whether what we believe ready
still runs (and what Ollama holds), and a refused connection to a ready engine triggers a check
at once.
Models the proxy does not manage (an entry with an explicit address, Ollama, ``openai``) only
get their in-flight count and the passive state the last request or reconcile saw. Every
model's state is in one ``StatusBook`` (``modelstate``): the slots move managed models' states,
this module the passive ones.

The GPU arbiter is reached only through ``arbiter.seams.GpuGate`` (``NO_GPU`` when there is
none, or for a model that takes no GPU), and it reaches back only through
``holdings``/``restore`` (``seams.Residency``). The gate is made at construction, from the
lifecycle itself (``gpu_gate=``): the arbiter needs the lifecycle as its residency.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageworks.chat_proxy.arbiter.seams import NO_GPU, GpuGate, Holding
from imageworks.chat_proxy.engines.backends import Backend, StartRequest
from imageworks.chat_proxy.engines.modelstate import (
    CRASHED,
    LOADED,
    READY,
    SLEEPING,
    STOPPED,
    UNKNOWN,
    UNREACHABLE,
    ModelStatus,
    Restarts,
    State,
    StatusBook,
    start_refusal,
)
from imageworks.chat_proxy.engines.slot import Slot
from imageworks.chat_proxy.engines.turns import STRICT_TURNS, Collation, Ticket
from imageworks.chat_proxy.errors import ProxyError
from imageworks.chat_proxy.observe.metrics import Metrics
from imageworks.chat_proxy.observe.requestlog import RequestLog, utc_now_iso
from imageworks.chat_proxy.supervision.process import safe_name
from imageworks.model_loader.registry import Registry
from imageworks.model_loader.schema import ModelEntry

log = logging.getLogger(__name__)


def ttl_of(entry: ModelEntry, default_s: float) -> float:
    """Seconds of idleness before ``entry`` is unloaded; 0: never."""
    if entry.pinned:
        return 0.0
    return entry.ttl_s if entry.ttl_s is not None else default_s


class Lifecycle:
    def __init__(
        self,
        backends: dict[str, Backend],
        *,
        staging_dir: Path,
        registry: Callable[[], Registry],
        start_timeout: float = 600.0,
        queue_timeout: float = 120.0,
        request_log: RequestLog | None = None,
        restarts: Callable[[], Restarts] = Restarts,
        idle_ttl_s: float = 0.0,
        metrics: Metrics | None = None,
        gpu_gate: Callable[[Lifecycle], GpuGate] | None = None,
        collation: Collation = STRICT_TURNS,
    ) -> None:
        self.backends = backends
        self.staging_dir = staging_dir
        self.registry = registry
        self.start_timeout = start_timeout
        self.queue_timeout = queue_timeout
        self.request_log = request_log
        self.new_restarts = restarts
        self.idle_ttl_s = idle_ttl_s
        self.collation = collation  # in shared slots: see turns.Collation
        self.metrics = metrics if metrics is not None else Metrics()
        self.slots: dict[str, Slot] = {}
        self._last_used: dict[str, float] = {}
        self.book = StatusBook(on_change=self._publish)
        self.restarts: dict[str, Restarts] = {}
        self.in_flight: Counter[str] = Counter()
        self._checks: set[asyncio.Task[None]] = set()
        self.gpu_gate: GpuGate = gpu_gate(self) if gpu_gate is not None else NO_GPU

    @property
    def version(self) -> int:
        """Moves on with every state change, so cached views (the model list) refresh."""
        return self.book.version

    def backend(self, entry: ModelEntry) -> Backend:
        return self.backends[entry.backend]

    def slot(self, entry: ModelEntry) -> Slot | None:
        key = self.backend(entry).slot_key(entry)
        if key is None:
            return None
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key, self.backend(entry), self, self.book)
        return slot

    def gpu_for(self, entry: ModelEntry) -> GpuGate:
        """The gate for ``entry``: the arbiter's, unless serving it takes no GPU."""
        return self.gpu_gate if self.backend(entry).uses_gpu(entry) else NO_GPU

    def start_log(self, name: str) -> Path:
        return self.staging_dir / "autostart" / f"{safe_name(name)}.log"

    def needs_start(self, entry: ModelEntry) -> bool:
        """Would a request for ``entry`` wait for a start or a swap right now?"""
        slot = self.slot(entry)
        return slot is not None and not (
            slot.active == entry.name and slot.state == READY and slot.target in (None, entry.name)
        )

    # --- requests ------------------------------------------------------------------------------

    async def acquire(
        self, entry: ModelEntry, *, autostart: bool, lease_token: str | None = None
    ) -> Ticket:
        backend = self.backend(entry)
        self.gpu_for(entry).admit(entry, lease_token)
        slot = self.slot(entry)
        if slot is None:
            await backend.prepare(entry, self.gpu_gate.make_room)
            return self._hold(entry, Ticket(entry.name, backend.base_url(entry), 0.0, False), None)
        ticket = await slot.acquire(entry, autostart=autostart, queue_timeout=self.queue_timeout)
        return self._hold(entry, ticket, slot)

    def _hold(self, entry: ModelEntry, ticket: Ticket, slot: Slot | None) -> Ticket:
        """Count the request in flight; its release also updates the slot or passive state."""
        name = entry.name
        self.in_flight[name] += 1
        slot_release = ticket._on_release

        def release(reached: bool | None) -> None:
            self.touch(name)
            self.in_flight[name] -= 1
            if self.in_flight[name] <= 0:
                del self.in_flight[name]
            if slot is not None:
                slot_release(reached)
                if reached is False:  # refused by an engine we believe ready: look now
                    self._check_soon(slot)
            elif reached is not None:
                self.book.move(name, READY if reached else UNREACHABLE)

        ticket._on_release = release
        return ticket

    def _check_soon(self, slot: Slot) -> None:
        task = asyncio.get_running_loop().create_task(slot.check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def may_start(self, entry: ModelEntry) -> None:
        """Raise if ``entry`` must not be started automatically now."""
        refusal = start_refusal(entry, self.restarts_of(entry.name), self.book.get(entry.name))
        if refusal is not None:
            raise refusal

    # --- operator actions ----------------------------------------------------------------------

    async def activate(self, entry: ModelEntry) -> ModelStatus:
        """Start ``entry`` (swapping if needed) regardless of autostart, backoff and crash
        loops (an operator's explicit request); returns once ready."""
        self.restarts_of(entry.name).reset()
        if self.state(entry) == CRASHED:
            self.book.move(entry.name, STOPPED)  # the operator's word overrides 'never'
        ticket = await self.acquire(entry, autostart=True)
        ticket.release()
        return self.status(entry)

    async def restore(self, name: str) -> None:
        """Start ``name`` again after a lease that evicted it ended (Ollama: load it)."""
        registry = self.registry()
        if name not in registry.names:
            return
        entry = registry.get(name)
        if self.managed(entry):
            await self.activate(entry)
        else:
            await self.backend(entry).load(entry)

    async def deactivate(self, entry: ModelEntry | None = None) -> list[str]:
        """Stop one managed model, or every one; each waits for its requests to drain."""
        slots = [self.slot(entry)] if entry is not None else list(self.slots.values())
        stopped = []
        for slot in slots:
            if slot is None:
                continue
            name = slot.active
            if await slot.deactivate(entry.name if entry else None, self.queue_timeout):
                stopped.append(name or "")
        return stopped

    async def recover(self) -> list[str]:
        """At start-up: adopt the engines an earlier proxy left running for our entries."""
        entries = [e for e in self.registry() if e.servable]
        adopted: list[str] = []
        for backend in self.backends.values():
            try:
                found = await backend.recover([e for e in entries if e.backend == backend.kind])
            except Exception as exc:
                log.warning("recovering %s engines failed: %s", backend.kind, exc)
                continue
            for name, base_url in found.items():
                slot = self.slot(self.registry().get(name))
                if slot is not None:
                    slot.adopt(self.registry().get(name), base_url)
                    adopted.append(name)
        return adopted

    async def shutdown(self) -> None:
        for slot in self.slots.values():
            await slot.shutdown()
        for task in list(self._checks):
            task.cancel()
        for backend in self.backends.values():
            await backend.close()

    def idle_left(self, entry: ModelEntry) -> float | None:
        """Seconds until ``entry`` is unloaded for idleness, if it is ready and idle now."""
        slot, ttl = self.slot(entry), ttl_of(entry, self.idle_ttl_s)
        if slot is None or ttl <= 0 or not slot.idle(entry.name):
            return None
        return max(0.0, ttl - (time.monotonic() - self.last_used(entry.name)))

    # --- the Residency the arbiter sees --------------------------------------------------------

    async def holdings(self) -> list[Holding]:
        registry = self.registry()
        found: list[Holding] = []
        for slot in self.slots.values():
            entry = slot.entry
            if slot.active is None or entry is None or not slot.backend.uses_gpu(entry):
                continue
            asleep, status = slot.state == SLEEPING, self.status(entry)
            can_sleep = slot.state == READY and slot.backend.sleepable(entry)
            found.append(
                Holding(
                    entry.name,
                    0 if asleep else entry.vram_estimate_mb or 0,  # the arbiter measures better
                    self.last_used(entry.name),
                    slot.in_flight,
                    # starting, stopping, waking or a sleep under way: its slot's business
                    protected=slot.state not in (READY, SLEEPING) or slot.switch_task is not None,
                    evict=functools.partial(slot.evict, entry.name, "vram"),
                    pid=slot.backend.pid_of(entry.name),
                    entry=entry,
                    sleep=functools.partial(slot.sleep, entry.name) if can_sleep else None,
                    sleeping=asleep,
                    host_mb=(status.host_mb or 0) if asleep else 0,
                )
            )
        entries = [e for e in registry if e.servable and not self.managed(e)]
        for backend in self.backends.values():
            found += await backend.holdings(
                [e for e in entries if e.backend == backend.kind], self.usage
            )
        return found

    def usage(self, name: str) -> tuple[float, int]:
        return self.last_used(name), self.in_flight.get(name, 0)

    def declared_mb(self) -> list[tuple[tuple[int, ...], int]]:
        """Where what runs now was placed, with its declared size (the budget when there is no
        GPU to measure)."""
        return [
            (self.gpu_devices(slot.entry) or (), slot.entry.vram_estimate_mb or 0)
            for slot in self.slots.values()
            if slot.active is not None and slot.entry is not None and not slot.making_room
        ]

    def gpu_devices(self, entry: ModelEntry) -> tuple[int, ...] | None:
        """The devices ``entry`` was placed on (its engine's CUDA_VISIBLE_DEVICES)."""
        return self.gpu_for(entry).placement_of(entry)

    # --- what the slots ask (``slot.SlotOwner``) and report --------------------------------------

    async def room_for(self, entry: ModelEntry) -> StartRequest:
        gpu = self.gpu_for(entry)
        await gpu.make_room(entry)
        return StartRequest(
            entry,
            self.start_log(entry.name),
            self.start_timeout,
            gpu_share=gpu.share_of(entry),
            devices=gpu.placement_of(entry),
        )

    async def learn(self, entry: ModelEntry, pid: int | None) -> None:
        await self.gpu_for(entry).learn(entry, pid)

    def started(self, entry: ModelEntry, load_ms: float) -> None:
        self.restarts_of(entry.name).started()
        self.touch(entry.name)  # its idle time counts from now
        self.event("autostart", model=entry.name, result="ready", load_ms=load_ms)
        self.count_load(entry.name, "ready", load_ms)

    def start_failed(self, entry: ModelEntry, error: ProxyError, *, backoff: bool = True) -> None:
        restarts = self.restarts_of(entry.name)
        if backoff:
            restarts.start_failed(time.monotonic())
        self.event(
            "autostart",
            model=entry.name,
            result="failed",
            error=error.message,
            retry_in_s=round(restarts.wait_s(time.monotonic()), 2),
        )
        self.count_load(entry.name, "failed", None)

    def slept(self, entry: ModelEntry, found: dict[str, Any]) -> None:
        self.event("sleep", model=entry.name, **found)
        self.gpu_for(entry).slept(entry, found.get("host_mb"))

    def woke(self, entry: ModelEntry, wake_ms: float) -> None:
        self.touch(entry.name)
        self.event("wake", model=entry.name, wake_ms=wake_ms)
        self.gpu_for(entry).woke(entry, wake_ms / 1000)

    def crashed(self, name: str, why: str) -> bool:
        looping = self.restarts_of(name).crashed(time.monotonic())
        log.warning("engine of %s crashed: %s", name, why)
        self.event("crash", model=name, error=why, crash_loop=looping)
        self.metrics.engine_crashes.labels(name).inc()
        return looping

    def restarts_of(self, name: str) -> Restarts:
        if name not in self.restarts:
            self.restarts[name] = self.new_restarts()
        return self.restarts[name]

    def touch(self, name: str) -> None:
        self._last_used[name] = time.monotonic()

    def last_used(self, name: str) -> float:
        return self._last_used.get(name, 0.0)

    def count_load(self, name: str, result: str, load_ms: float | None) -> None:
        self.metrics.model_loads.labels(name, result).inc()
        if load_ms is not None:
            self.metrics.model_load_seconds.labels(name).observe(load_ms / 1000)

    def status(self, entry: ModelEntry) -> ModelStatus:
        default = STOPPED if self.managed(entry) else UNKNOWN
        return self.book.get(entry.name) or ModelStatus(state=default)

    def state(self, entry: ModelEntry) -> State:
        return self.status(entry).state

    def describe(self, entry: ModelEntry) -> dict[str, Any]:
        """The status as ``/admin/state`` shows it, with the restart accounting."""
        view = self.status(entry).public()
        if self.managed(entry):
            left = self.idle_left(entry)
            view["idle_unload_in_s"] = None if left is None else round(left, 1)
            view["pinned"] = entry.pinned
            used = self.last_used(entry.name)
            view["last_used_s_ago"] = round(time.monotonic() - used, 1) if used else None
            view["restart"] = entry.restart
            view["restarts"] = self.restarts_of(entry.name).public(time.monotonic())
        view["devices"] = self.devices_of(entry)
        return view

    def devices_of(self, entry: ModelEntry) -> list[int]:
        """Where ``entry`` runs now; [] when it is not loaded or nobody knows."""
        if self.state(entry) not in LOADED:
            return []
        return list(self.gpu_gate.placement_of(entry) or ())

    def managed(self, entry: ModelEntry) -> bool:
        return self.backend(entry).slot_key(entry) is not None

    def _publish(self, name: str, state: State) -> None:
        """The event stream (``/admin/events``) shows each change of a model's state."""
        bus = self.request_log.bus if self.request_log is not None else None
        if bus is not None:
            bus.publish({"ts": utc_now_iso(), "event": "state", "model": name, "state": state})

    def event(self, event: str, **fields: Any) -> None:
        if self.request_log is not None:
            self.request_log.event(event, "lifecycle", **fields)
