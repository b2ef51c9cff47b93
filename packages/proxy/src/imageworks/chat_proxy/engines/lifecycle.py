"""Per-model lifecycle: start what a request needs, swap without dropping requests, and keep the
truth about every engine.

Managed models live in slots (``slot.Slot``: the state machine). This module owns the slots, the
per-model status and restart accounting (``modelstate``), and the loops that keep them true:
engine exits are reported by each backend's supervisor the moment they happen, a reconcile loop
asks every backend every ``CHAT_PROXY_RECONCILE_S`` whether what we believe ready still runs
(and what Ollama holds), and a refused connection to a ready engine triggers a check at once.
Models the proxy does not manage (an entry with an explicit address, Ollama, ``openai``) only
get their in-flight count and the passive state the last request or reconcile saw.

The GPU arbiter is reached only through ``arbiter.seams.GpuGate``, and it reaches back only
through ``holdings``/``restore`` (``seams.Residency``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageworks.chat_proxy.arbiter.seams import GpuGate, Holding
from imageworks.chat_proxy.engines import idle
from imageworks.chat_proxy.engines.backends import Backend
from imageworks.chat_proxy.engines.modelstate import (
    CRASHED,
    FAILED,
    READY,
    SLEEPING,
    STARTING,
    STOPPED,
    STOPPING,
    UNKNOWN,
    UNREACHABLE,
    ModelStatus,
    Restarts,
)
from imageworks.chat_proxy.engines.slot import Slot, Ticket
from imageworks.chat_proxy.errors import BackendUnavailable, ModelBackoff, ModelStartFailed
from imageworks.chat_proxy.observe.requestlog import RequestLog, utc_now_iso
from imageworks.chat_proxy.supervision.process import safe_name
from imageworks.model_loader.registry import Registry
from imageworks.model_loader.schema import ModelEntry

if TYPE_CHECKING:
    from imageworks.chat_proxy.observe.metrics import Metrics

log = logging.getLogger(__name__)

# Re-exported: callers name states and tickets through this module.
__all__ = ["CRASHED", "FAILED", "READY", "STARTING", "STOPPED", "STOPPING", "UNKNOWN"]
__all__ += ["UNREACHABLE", "Lifecycle", "ModelStatus", "Ticket"]


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
    ) -> None:
        self.backends = backends
        self.staging_dir = staging_dir
        self.registry = registry
        self.start_timeout = start_timeout
        self.queue_timeout = queue_timeout
        self.request_log = request_log
        self.new_restarts = restarts
        self.idle_ttl_s = idle_ttl_s
        self.slots: dict[str, Slot] = {}
        self.gate: GpuGate | None = None  # set by the app once the arbiter exists
        self.metrics: Metrics | None = None
        self._last_used: dict[str, float] = {}
        self.statuses: dict[str, ModelStatus] = {}
        self.restarts: dict[str, Restarts] = {}
        self.in_flight: Counter[str] = Counter()
        self._checks: set[asyncio.Task[None]] = set()
        # Collation: (most requests for the running model admitted past another's claim, the
        # longest the claiming model's requests wait for them); (0, 0): off.
        self.collate: tuple[int, float] = (0, 0.0)
        # Bumped on every state change so cached views (the model list) know to refresh.
        self.version = 0

    def backend(self, entry: ModelEntry) -> Backend:
        return self.backends[entry.backend]

    def slot(self, entry: ModelEntry) -> Slot | None:
        key = self.backend(entry).slot_key(entry)
        if key is None:
            return None
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key, self.backend(entry), self)
        return slot

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
        if self.gate is not None and backend.uses_gpu(entry):
            self.gate.admit(entry, lease_token)
        slot = self.slot(entry)
        if slot is None:
            if self.gate is not None:
                await backend.prepare(entry, self.gate.make_room)
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
                self.set_status(name, READY if reached else UNREACHABLE)

        ticket._on_release = release
        return ticket

    def _check_soon(self, slot: Slot) -> None:
        task = asyncio.get_running_loop().create_task(slot.check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def may_start(self, entry: ModelEntry) -> None:
        """Raise if ``entry`` must not be started automatically now."""
        name = entry.name
        restarts = self.restarts_of(name)
        now = time.monotonic()
        status = self.statuses.get(name)
        last = status.last_error if status else None
        if restarts.halted:
            raise ModelStartFailed(
                f"model {name!r} is failed ({restarts.halted}; last crash: {last}); start it "
                f"with 'imageworks-models activate-model {name}' or POST /admin/activate"
            )
        if status is not None and status.state == CRASHED and entry.restart == "never":
            raise BackendUnavailable(
                f"model {name!r} crashed ({last}) and its restart policy is 'never'; start it "
                f"with 'imageworks-models activate-model {name}' or POST /admin/activate"
            )
        wait = restarts.wait_s(now)
        if wait > 0:
            raise ModelBackoff(
                f"model {name!r} is not restarted for another {wait:.1f} s after "
                f"{'a crash' if status and status.state == CRASHED else 'a failed start'}"
                f" (last error: {last})",
                headers={"Retry-After": restarts.retry_after(now)},
            )

    # --- operator actions ----------------------------------------------------------------------

    async def activate(self, entry: ModelEntry) -> ModelStatus:
        """Start ``entry`` (swapping if needed) regardless of autostart, backoff and crash
        loops (an operator's explicit request); returns once ready."""
        self.restarts_of(entry.name).reset()
        if self.state(entry) == CRASHED:
            self.set_status(entry.name, STOPPED)  # the operator's word overrides 'never'
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

    # --- the truth loop ------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Check every ready engine, stop the ones whose entry left the registry (once idle:
        nothing may hide a running engine), and refresh what unmanaged engines report."""
        names = set(self.registry().names)
        for slot in list(self.slots.values()):
            if slot.active is not None and slot.active not in names:
                name = slot.active
                if await slot.evict(name, "removed from the registry"):
                    log.info("stopped %s: it is no longer in the registry", slot.key)
                    if self.metrics is not None:
                        self.metrics.idle_unloads.labels(name, "removed").inc()
                continue
            await slot.check()
        entries = [e for e in self.registry() if e.servable and not self.managed(e)]
        for backend in self.backends.values():
            mine = [e for e in entries if e.backend == backend.kind]
            if not mine:
                continue
            with contextlib.suppress(Exception):
                for name, state in (await backend.observed(mine)).items():
                    self.set_status(name, state)

    async def reconcile_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reconcile()
            except Exception as exc:  # the loop must outlive any one bad round
                log.warning("reconcile failed: %s", exc)

    # --- preload (idle unload lives in idle.py) ------------------------------------------

    async def preload(self, names: Iterable[str]) -> None:
        """Start the named models and those marked ``preload`` (at proxy start)."""
        registry = self.registry()
        wanted = set(names)
        for entry in registry:
            if not entry.servable or not self.managed(entry):
                continue
            if entry.preload or entry.name in wanted:
                try:
                    await self.activate(entry)
                    self.event("preload", model=entry.name, result="ready")
                except Exception as exc:
                    self.event("preload", model=entry.name, result="failed", error=str(exc))

    # --- the Residency the arbiter sees --------------------------------------------------------

    async def holdings(self) -> list[Holding]:
        registry = self.registry()
        found: list[Holding] = []
        for slot in self.slots.values():
            entry = slot.entry
            if slot.active is None or entry is None or not slot.backend.uses_gpu(entry):
                continue
            asleep = slot.state == SLEEPING
            can_sleep = slot.state == READY and slot.backend.sleepable(entry)
            found.append(
                Holding(
                    entry.name,
                    0 if asleep else entry.vram_estimate_mb or 0,  # the arbiter measures better
                    self.last_used(entry.name),
                    slot.in_flight,
                    # starting, stopping or waking: its slot's business
                    protected=slot.state not in (READY, SLEEPING),
                    evict=functools.partial(slot.evict, entry.name, "vram"),
                    pid=slot.backend.pid_of(entry.name),
                    entry=entry,
                    sleep=functools.partial(slot.sleep, entry.name) if can_sleep else None,
                    sleeping=asleep,
                    host_mb=(slot.host_mb or 0) if asleep else 0,
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

    async def make_room(self, entry: ModelEntry) -> None:
        if self.gate is not None and self.backend(entry).uses_gpu(entry):
            await self.gate.make_room(entry)

    def gpu_share(self, entry: ModelEntry) -> float | None:
        if self.gate is None or not self.backend(entry).uses_gpu(entry):
            return None
        return self.gate.share_of(entry)

    def gpu_devices(self, entry: ModelEntry) -> tuple[int, ...] | None:
        """The devices ``entry`` was placed on (its engine's CUDA_VISIBLE_DEVICES)."""
        if self.gate is None or not self.backend(entry).uses_gpu(entry):
            return None
        return self.gate.placement_of(entry)

    async def learn(self, entry: ModelEntry, pid: int | None) -> None:
        if self.gate is not None and self.backend(entry).uses_gpu(entry):
            await self.gate.learn(entry, pid)

    # --- what the slots report -----------------------------------------------------------------

    def started(self, entry: ModelEntry, load_ms: float) -> None:
        self.restarts_of(entry.name).started()
        self.touch(entry.name)  # its idle time counts from now
        self.set_status(entry.name, READY, load_ms=load_ms)
        self.statuses[entry.name].last_error = None  # running again: the old error is history
        self.event("autostart", model=entry.name, result="ready", load_ms=load_ms)
        self.count_load(entry.name, "ready", load_ms)

    def slept(self, entry: ModelEntry, found: dict[str, Any]) -> None:
        """``entry`` sleeps (weights in host RAM): its status, the event, the arbiter's book."""
        self.set_status(entry.name, SLEEPING)
        status = self.statuses[entry.name]
        status.sleep_ms, status.host_mb = found.get("sleep_ms"), found.get("host_mb")
        self.event("sleep", model=entry.name, **found)
        if self.gate is not None:
            self.gate.slept(entry, found.get("host_mb"))

    def woke(self, entry: ModelEntry, wake_ms: float) -> None:
        self.touch(entry.name)
        self.set_status(entry.name, READY)
        self.statuses[entry.name].wake_ms = wake_ms
        self.event("wake", model=entry.name, wake_ms=wake_ms)
        if self.gate is not None:
            self.gate.woke(entry, wake_ms / 1000)

    def start_failed(self, entry: ModelEntry, error: Any, *, backoff: bool = True) -> None:
        restarts = self.restarts_of(entry.name)
        if backoff:
            restarts.start_failed(time.monotonic())
        self.set_status(entry.name, FAILED, error=error.message)
        self.event(
            "autostart",
            model=entry.name,
            result="failed",
            error=error.message,
            retry_in_s=round(restarts.wait_s(time.monotonic()), 2),
        )
        self.count_load(entry.name, "failed", None)

    def engine_crashed(self, name: str, why: str) -> None:
        restarts = self.restarts_of(name)
        looping = restarts.crashed(time.monotonic())
        log.warning("engine of %s crashed: %s", name, why)
        self.set_status(name, FAILED if looping else CRASHED, error=why)
        self.event("crash", model=name, error=why, crash_loop=looping)
        if self.metrics is not None:
            self.metrics.engine_crashes.labels(name).inc()

    def restarts_of(self, name: str) -> Restarts:
        if name not in self.restarts:
            self.restarts[name] = self.new_restarts()
        return self.restarts[name]

    def touch(self, name: str) -> None:
        self._last_used[name] = time.monotonic()

    def last_used(self, name: str) -> float:
        return self._last_used.get(name, 0.0)

    def count_load(self, name: str, result: str, load_ms: float | None) -> None:
        if self.metrics is not None:
            self.metrics.model_loads.labels(name, result).inc()
            if load_ms is not None:
                self.metrics.model_load_seconds.labels(name).observe(load_ms / 1000)

    def status(self, entry: ModelEntry) -> ModelStatus:
        default = STOPPED if self.managed(entry) else UNKNOWN
        return self.statuses.get(entry.name) or ModelStatus(state=default)

    def state(self, entry: ModelEntry) -> str:
        return self.status(entry).state

    def describe(self, entry: ModelEntry) -> dict[str, Any]:
        """The status as ``/admin/state`` shows it, with the restart accounting."""
        view = self.status(entry).public()
        if self.managed(entry):
            left = idle.time_left(self, entry)
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
        if self.gate is None or self.state(entry) not in (READY, STARTING, STOPPING, SLEEPING):
            return []
        return list(self.gate.placement_of(entry) or ())

    def managed(self, entry: ModelEntry) -> bool:
        return self.backend(entry).slot_key(entry) is not None

    def set_status(
        self, name: str, state: str, *, error: str | None = None, load_ms: float | None = None
    ) -> None:
        current = self.statuses.get(name)
        if current is not None and current.state == state and error is None and load_ms is None:
            return
        status = ModelStatus(
            state=state,
            last_error=error if error is not None else (current.last_error if current else None),
        )
        status.load_ms = load_ms if load_ms is not None else (current.load_ms if current else None)
        if current is not None:
            status.wake_ms, status.sleep_ms, status.host_mb = (
                current.wake_ms,
                current.sleep_ms,
                current.host_mb,
            )
        self.statuses[name] = status
        self.version += 1
        if current is None or current.state != state:  # the event stream shows each change
            bus = self.request_log.bus if self.request_log is not None else None
            if bus is not None:
                bus.publish({"ts": utc_now_iso(), "event": "state", "model": name, "state": state})

    def event(self, event: str, **fields: Any) -> None:
        if self.request_log is not None:
            self.request_log.event(event, "lifecycle", **fields)
