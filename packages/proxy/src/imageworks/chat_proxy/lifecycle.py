"""Per-model lifecycle: start what a request needs, swap without dropping requests.

Managed models live in *slots*: a slot holds at most one running model (the vLLM executor is
one slot for every vLLM model; each llama.cpp model has a slot of its own). A slot is a state
machine that only its own methods change, all on the event loop, so no caller ever checks a
state and then acts on it:

    stopped -> starting -> ready -> stopping -> stopped        failed(reason) after a bad start

A request ``acquire``s its model. If another model holds the slot, the request claims the
slot's next turn; new requests for the running model then wait too, the running model drains
(it is never stopped while it serves anyone), and the slot switches. Requests waiting when a
model becomes ready are all admitted before another model may claim the slot, so swaps always
make progress. A failed start fails the requests waiting for it at once, and the next request
tries again. Models the proxy does not manage (an entry with an explicit address, Ollama,
``openai``) only get their in-flight count and the passive state the last request saw.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageworks.chat_proxy.backends import Backend
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ModelStartTimeout,
    ProxyError,
    QueueFull,
)
from imageworks.chat_proxy.requestlog import RequestLog
from imageworks.model_loader.schema import ModelEntry

if TYPE_CHECKING:
    from imageworks.chat_proxy.arbiter.arbiter import VramArbiter
    from imageworks.chat_proxy.metrics import Metrics

log = logging.getLogger(__name__)

STOPPED, STARTING, READY, STOPPING, FAILED = "stopped", "starting", "ready", "stopping", "failed"
# States of unmanaged models: what the last request saw.
UNKNOWN, UNREACHABLE = "unknown", "unreachable"


@dataclass
class ModelStatus:
    state: str = STOPPED
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    load_ms: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": self.since,
            "last_error": self.last_error,
            "load_ms": self.load_ms,
        }


@dataclass
class Ticket:
    """One request's hold on a model; ``release`` exactly once when its response is done."""

    name: str
    base_url: str
    wait_ms: float
    loaded: bool
    _on_release: Any = None
    released: bool = False

    def release(self, *, reached: bool | None = None) -> None:
        if not self.released:
            self.released = True
            self._on_release(reached)


@dataclass(eq=False)
class _Waiter:
    name: str


class Slot:
    def __init__(self, key: str, backend: Backend, owner: Lifecycle) -> None:
        self.key = key
        self.backend = backend
        self.owner = owner
        self.active: str | None = None
        self.state = STOPPED
        self.base_url: str | None = None
        self.in_flight = 0
        self.target: str | None = None  # the model that has claimed the next turn
        self.waiters: list[_Waiter] = []
        self.reserved: set[_Waiter] = set()  # admitted before anyone may claim the slot
        self.switch_task: asyncio.Task[None] | None = None
        self.switch_started = 0.0
        self.failures: Counter[str] = Counter()
        self.errors: dict[str, ProxyError] = {}
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _admissible(self, name: str, waiter: _Waiter) -> bool:
        if self.active != name or self.state != READY:
            return False
        return self.target in (None, name) or waiter in self.reserved

    async def acquire(self, entry: ModelEntry, *, autostart: bool, queue_timeout: float) -> Ticket:
        name = entry.name
        started = time.monotonic()
        deadline = started + queue_timeout
        failures_seen = self.failures[name]
        loaded = False
        waiter = _Waiter(name)
        self.waiters.append(waiter)
        try:
            while True:
                if self._admissible(name, waiter):
                    self.in_flight += 1
                    self._leave_reserved(waiter)
                    assert self.base_url is not None
                    wait_ms = round((time.monotonic() - started) * 1000, 2)
                    return Ticket(name, self.base_url, wait_ms, loaded, self._release_one)
                if self.failures[name] != failures_seen:
                    raise self.errors[name]
                if self.target is None and not (self.active == name and self.state == STARTING):
                    if not autostart:
                        raise BackendUnavailable(
                            f"model {name!r} is not running and autostart is disabled; start it "
                            f"with 'imageworks-models activate-model {name}' or "
                            "POST /admin/activate, or enable autostart (PUT /admin/autostart)"
                        )
                    self.target = name
                if self.target == name and self.switch_task is None and self.in_flight == 0:
                    loaded = True
                    self.switch_task = asyncio.create_task(self._switch(entry))
                if self.active == name and self.state == STARTING:
                    loaded = True
                    # Once our model is loading, its own start timeout is what bounds the wait.
                    deadline = max(deadline, self.switch_started + self.owner.start_timeout + 5)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await self._wait(remaining):
                    raise self._timeout_error(name, queue_timeout)
        finally:
            self.waiters.remove(waiter)
            self._leave_reserved(waiter)
            if (
                self.target == name
                and self.switch_task is None
                and not any(w.name == name for w in self.waiters)
            ):
                self.target = None  # nobody is left who wanted this model: free the claim
                self._notify()

    async def _wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _timeout_error(self, name: str, queue_timeout: float) -> ProxyError:
        if self.active == name and self.state == STARTING:
            return ModelStartTimeout(
                f"model {name!r} is still loading; try again shortly", headers={"Retry-After": "10"}
            )
        busy = (
            f"{self.active!r} is still serving {self.in_flight} request(s)"
            if self.active and self.in_flight
            else "the backend is busy switching models"
        )
        return QueueFull(
            f"model {name!r} waited {queue_timeout:.0f} s for its turn: {busy}",
            headers={"Retry-After": "10"},
        )

    def _leave_reserved(self, waiter: _Waiter) -> None:
        if waiter in self.reserved:
            self.reserved.discard(waiter)
            if not self.reserved and self.target == waiter.name:
                self.target = None
                self._notify()

    def _release_one(self, reached: bool | None) -> None:
        self.in_flight -= 1
        if self.active is not None:
            self.owner.touch(self.active)
        if self.in_flight == 0:
            self._notify()

    async def _switch(self, entry: ModelEntry) -> None:
        name = entry.name
        try:
            if self.active is not None:
                await self._stop_active("swap")
            self.active, self.state, self.base_url = name, STARTING, None
            self.switch_started = time.monotonic()
            self.owner._set(name, STARTING)
            self._notify()
            try:
                if self.owner.arbiter is not None:
                    await self.owner.arbiter.make_room(entry)
                base_url = await self.backend.start(
                    entry, self.owner.start_log(name), self.owner.start_timeout
                )
            except ProxyError as exc:
                self.active, self.state = None, STOPPED
                self.failures[name] += 1
                self.errors[name] = exc
                self.target = None
                self.owner._set(name, FAILED, error=exc.message)
                self.owner.event("autostart", model=name, result="failed", error=exc.message)
                self.owner.count_load(name, "failed", None)
                return
            load_ms = round((time.monotonic() - self.switch_started) * 1000, 1)
            self.state, self.base_url = READY, base_url
            self.owner._set(name, READY, load_ms=load_ms)
            self.owner.event("autostart", model=name, result="ready", load_ms=load_ms)
            self.owner.count_load(name, "ready", load_ms)
            if self.owner.arbiter is not None:
                await self.owner.arbiter.learn(entry, self.backend.pid_of(name))
            self.reserved = {w for w in self.waiters if w.name == name}
            if not self.reserved:
                self.target = None
        finally:
            self.switch_task = None
            self._notify()

    async def _stop_active(self, reason: str) -> None:
        name = self.active
        assert name is not None
        self.state = STOPPING
        self.owner._set(name, STOPPING)
        self._notify()
        try:
            await self.backend.stop(name)
        except Exception as exc:  # a failed stop must not wedge the slot
            log.warning("stopping %s failed: %s", name, exc)
        self.active, self.state, self.base_url = None, STOPPED, None
        self.owner._set(name, STOPPED)
        self.owner.event("unload", model=name, reason=reason)

    async def evict(self, name: str, reason: str) -> bool:
        """Stop ``name`` now if it is the idle, ready model here (the arbiter's eviction)."""
        if (
            self.active != name
            or self.state != READY
            or self.in_flight
            or self.switch_task is not None
            or self.target not in (None, name)
        ):
            return False
        await self._stop_active(f"evict ({reason})")
        self._notify()
        return True

    async def deactivate(self, name: str | None, timeout: float) -> bool:
        """Stop the active model (if it is ``name``, or any when None) once it has drained."""
        deadline = time.monotonic() + timeout
        while self.switch_task is not None or (self.active and self.in_flight):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._wait(remaining):
                raise QueueFull(
                    f"{self.active!r} is still serving {self.in_flight} request(s)",
                    headers={"Retry-After": "10"},
                )
        if self.active is None or (name is not None and self.active != name):
            return False
        await self._stop_active("deactivate")
        self._notify()
        return True


class Lifecycle:
    def __init__(
        self,
        backends: dict[str, Backend],
        *,
        staging_dir: Path,
        start_timeout: float = 600.0,
        queue_timeout: float = 120.0,
        request_log: RequestLog | None = None,
    ) -> None:
        self.backends = backends
        self.staging_dir = staging_dir
        self.start_timeout = start_timeout
        self.queue_timeout = queue_timeout
        self.request_log = request_log
        self.slots: dict[str, Slot] = {}
        self.arbiter: VramArbiter | None = None  # set by the app once both exist
        self.metrics: Metrics | None = None
        self._last_used: dict[str, float] = {}
        self.statuses: dict[str, ModelStatus] = {}
        self.in_flight: Counter[str] = Counter()
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
        return self.staging_dir / "autostart" / f"{name.replace('/', '_')}.log"

    def needs_start(self, entry: ModelEntry) -> bool:
        """Would a request for ``entry`` wait for a start or a swap right now?"""
        slot = self.slot(entry)
        return slot is not None and not (
            slot.active == entry.name and slot.state == READY and slot.target in (None, entry.name)
        )

    async def acquire(
        self, entry: ModelEntry, *, autostart: bool, lease_token: str | None = None
    ) -> Ticket:
        if self.arbiter is not None:
            self.arbiter.admit(entry, lease_token)
        slot = self.slot(entry)
        if slot is None:
            if self.arbiter is not None and entry.backend == "ollama":
                await self.arbiter.before_ollama(entry)
            return self._hold(
                entry.name,
                Ticket(entry.name, self.backend(entry).base_url(entry), 0.0, False),
                None,
            )
        ticket = await slot.acquire(entry, autostart=autostart, queue_timeout=self.queue_timeout)
        return self._hold(entry.name, ticket, slot)

    def _hold(self, name: str, ticket: Ticket, slot: Slot | None) -> Ticket:
        """Count the request in flight; its release also updates the slot or passive state."""
        self.in_flight[name] += 1
        slot_release = ticket._on_release

        def release(reached: bool | None) -> None:
            self.touch(name)
            self.in_flight[name] -= 1
            if self.in_flight[name] <= 0:
                del self.in_flight[name]
            if slot is not None:
                slot_release(reached)
            elif reached is not None:
                self._set(name, READY if reached else UNREACHABLE)

        ticket._on_release = release
        return ticket

    async def activate(self, entry: ModelEntry) -> ModelStatus:
        """Start ``entry`` (swapping if needed) regardless of autostart; returns once ready."""
        ticket = await self.acquire(entry, autostart=True)
        ticket.release()
        return self.status(entry)

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

    async def shutdown(self) -> None:
        for slot in self.slots.values():
            if slot.switch_task is not None:
                slot.switch_task.cancel()
            if slot.active is not None:
                await slot._stop_active("shutdown")
        for backend in self.backends.values():
            await backend.close()

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

    def managed(self, entry: ModelEntry) -> bool:
        return self.backend(entry).slot_key(entry) is not None

    def _set(
        self, name: str, state: str, *, error: str | None = None, load_ms: float | None = None
    ) -> None:
        current = self.statuses.get(name)
        if current is not None and current.state == state and error is None and load_ms is None:
            return
        status = ModelStatus(
            state=state,
            last_error=error if state == FAILED else (current.last_error if current else None),
        )
        status.load_ms = load_ms if load_ms is not None else (current.load_ms if current else None)
        self.statuses[name] = status
        self.version += 1

    def event(self, event: str, **fields: Any) -> None:
        if self.request_log is not None:
            self.request_log.event(event, "lifecycle", **fields)
