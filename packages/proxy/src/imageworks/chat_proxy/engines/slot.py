"""A slot: the place one managed model runs, and the state machine that owns it.

A slot holds at most one running model (the vLLM executor is one slot for every vLLM model;
each llama.cpp model has a slot of its own). Only the slot's own methods change its state, all
on the event loop, so no caller ever checks a state and then acts on it.

A request ``acquire``s its model. If another model holds the slot, the request claims the
slot's next turn; new requests for the running model then wait too, the running model drains
(it is never stopped while it serves anyone), and the slot switches. Requests waiting when a
model becomes ready are all admitted before another model may claim the slot, so swaps always
make progress. There is at most one start in flight per slot (``switch_task``).

Any exception during a start is a failure, never a retry loop: the engine is reaped, waiting
requests get the error at once, and the next start waits for the model's backoff. An engine
that dies while ready (its supervisor says so, or a reconcile finds it gone) is ``crashed``:
the slot reaps it and the next request restarts it, until a crash loop halts it.

vLLM sleep mode: the arbiter may evict a sleep-able model by ``sleep`` instead of a stop (its
weights go to host RAM, its engine stays): the model stays the slot's active one, ``sleeping``,
and the next request for it wakes it (``waking``, after room is made on the GPU again) rather
than starting it. Collation (``turns.Collation``): a bounded run of requests for the running
model may still go first once another model has claimed the slot, so alternating clients do
not swap on every request.

The state of the slot's models lives in the ``StatusBook`` the slot is given (``state`` is its
active model's entry there): the slot moves it, the lifecycle reads it, nobody copies it. What
the slot may ask of its owner is ``owner.SlotOwner``: may this model start, make room and say how to
start it, learn what it holds, and hear of a start, a failed start, a crash, a sleep or a wake.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from imageworks.chat_proxy.engines.backends import Backend
from imageworks.chat_proxy.engines.modelstate import (
    CRASHED,
    FAILED,
    READY,
    SLEEPING,
    STARTING,
    STOPPED,
    STOPPING,
    WAKING,
    State,
    StatusBook,
)
from imageworks.chat_proxy.engines.owner import SlotOwner
from imageworks.chat_proxy.engines.sleepmode import SleepMode
from imageworks.chat_proxy.engines.turns import Ticket, Waiter, exception_text, wait_error
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    InsufficientVram,
    ModelStartFailed,
    ProxyError,
    QueueFull,
)
from imageworks.model_loader.schema import ModelEntry

log = logging.getLogger(__name__)


class Slot(SleepMode):
    def __init__(self, key: str, backend: Backend, owner: SlotOwner, book: StatusBook) -> None:
        self.key = key
        self.backend = backend
        self.owner = owner
        self.book = book
        self.active: str | None = None
        self.entry: ModelEntry | None = None
        self.base_url: str | None = None
        self.in_flight = 0
        self.target: str | None = None  # the model that has claimed the next turn
        self.waiters: list[Waiter] = []
        self.reserved: set[Waiter] = set()  # admitted before anyone may claim the slot
        self.switch_task: asyncio.Task[None] | None = None
        self.switch_started = 0.0
        self.making_room = False  # starting, but not on the GPU yet
        self.failures: dict[str, int] = {}
        self.errors: dict[str, ProxyError] = {}
        self.collated = 0  # requests for the active model admitted past another's claim
        self._changed = asyncio.Event()

    @property
    def state(self) -> State:
        """The state of the active model (stopped when there is none)."""
        return STOPPED if self.active is None else self.book.state(self.active)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _admissible(self, name: str, waiter: Waiter) -> bool:
        if self.active != name or self.state != READY:
            return False
        return self.target in (None, name) or waiter in self.reserved or self._collate()

    def _collate(self) -> bool:
        """May a request for the running model go before the claimed swap (collation)?"""
        if self.switch_task is not None:
            return False
        claimants = (w.since for w in self.waiters if w.name == self.target)
        if not self.owner.collation.allows(self.collated, claimants, time.monotonic()):
            return False
        self.collated += 1
        return True

    async def acquire(self, entry: ModelEntry, *, autostart: bool, queue_timeout: float) -> Ticket:
        name = entry.name
        started = time.monotonic()
        deadline = started + queue_timeout
        failures_seen = self.failures.get(name, 0)
        loaded = False
        waiter = Waiter(name, started)
        self.waiters.append(waiter)
        try:
            while True:
                if self._admissible(name, waiter):
                    self.in_flight += 1
                    self._leave_reserved(waiter)
                    assert self.base_url is not None
                    wait_ms = round((time.monotonic() - started) * 1000, 2)
                    return Ticket(name, self.base_url, wait_ms, loaded, self._release_one)
                if self.failures.get(name, 0) != failures_seen:
                    raise self.errors[name]
                waking = self.active == name and self.state == SLEEPING  # resident: it wakes
                if self.target is None and not (self.active == name and self.state == STARTING):
                    if not autostart and not waking:
                        raise BackendUnavailable(
                            f"model {name!r} is not running and autostart is disabled; start it "
                            f"with 'imageworks-models activate-model {name}' or "
                            "POST /admin/activate, or enable autostart (PUT /admin/autostart)"
                        )
                    self.owner.may_start(entry)  # backoff, crash loop, restart policy
                    if self.active not in (None, name) and self.entry and self.entry.pinned:
                        raise InsufficientVram(  # a swap would evict it: never a pinned model
                            f"model {name!r} would replace pinned model {self.active!r} in "
                            f"its {self.backend.kind} slot, and a pinned model is never "
                            "evicted (unpin it or stop it by hand)",
                            status=409,
                        )
                    self.target = name
                if (
                    self.target == name
                    and self.switch_task is None
                    and self.state != STOPPING
                    and self.in_flight == 0
                ):
                    loaded = True
                    self.switch_task = asyncio.create_task(self._switch(entry))
                if self.active == name and self.state in (STARTING, WAKING):
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
        loading = self.active == name and self.state in (STARTING, WAKING)
        return wait_error(
            name, queue_timeout, loading=loading, active=self.active, in_flight=self.in_flight
        )

    def _leave_reserved(self, waiter: Waiter) -> None:
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

    # --- starting ------------------------------------------------------------------------------

    async def _switch(self, entry: ModelEntry) -> None:
        name = entry.name
        self.collated = 0
        try:
            if self.active == name and self.state == SLEEPING:
                await self._wake(entry)
                return
            if self.active is not None:
                await self._stop_active("swap")
            self.active, self.entry, self.base_url = name, entry, None
            self.book.move(name, STARTING)
            self.switch_started = time.monotonic()
            self._notify()
            self.making_room = True  # not on the GPU yet: a declared budget must not count it
            try:
                request = await self.owner.room_for(entry)
            except Exception as exc:  # no room: nothing was started, so no backoff either
                await self._start_failed(entry, exc, backoff=False)
                return
            finally:
                self.making_room = False
            try:
                base_url = await self.backend.start(request)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await self.backend.stop(name)  # an abandoned start leaves no child
                self.book.move(name, STOPPED)
                self.active, self.entry = None, None
                raise
            except Exception as exc:
                await self._start_failed(entry, exc)
                return
            load_ms = round((time.monotonic() - self.switch_started) * 1000, 1)
            with contextlib.suppress(Exception):  # learning a footprint is best effort
                await self.owner.learn(entry, self.backend.pid_of(name))
            self.base_url = base_url
            self.book.move(name, READY, load_ms=load_ms, error=None)  # the old error is history
            self.owner.started(entry, load_ms)
            self._reserve(name)
            # Last, with no await after it: an exit from here on is seen once this switch is
            # over (the watch reports an engine that is already gone at once).
            self.backend.supervise(name, functools.partial(self.crashed, name))
        finally:
            self.switch_task = None
            self._notify()

    def _reserve(self, name: str) -> None:
        """``name`` just became ready: those waiting for it go before anyone may claim."""
        self.reserved = {w for w in self.waiters if w.name == name}
        if not self.reserved:
            self.target = None

    async def _start_failed(
        self, entry: ModelEntry, exc: Exception, *, backoff: bool = True
    ) -> None:
        name = entry.name
        error = (
            exc
            if isinstance(exc, ProxyError)
            else ModelStartFailed(f"model {name!r} failed to start: {exception_text(exc)}")
        )
        if not isinstance(exc, ProxyError):
            log.warning("starting %s failed: %s", name, exception_text(exc), exc_info=exc)
        # Report first: the waiting requests get the error now, not after the cleanup (which
        # may wait on a slow executor). The slot stays busy (switch_task) until it is done.
        self.failures[name] = self.failures.get(name, 0) + 1
        self.errors[name] = error
        self.target = None
        self.book.move(name, FAILED, error=error.message)
        self.owner.start_failed(entry, error, backoff=backoff)
        self._notify()
        try:
            await self.backend.stop(name)  # reap whatever the start left behind
        except Exception as stop_exc:
            log.warning("cleaning up after %s's failed start: %s", name, exception_text(stop_exc))
        self.active, self.entry = None, None  # the model stays failed

    def adopt(self, entry: ModelEntry, base_url: str) -> None:
        """Take over an engine an earlier proxy started (it answered its health check)."""
        self.active, self.entry, self.base_url = entry.name, entry, base_url
        self.book.move(entry.name, READY)
        self.owner.event("adopt", model=entry.name, base_url=base_url)
        self.backend.supervise(entry.name, functools.partial(self.crashed, entry.name))
        self._notify()

    # --- crashes -------------------------------------------------------------------------------

    def crashed(self, name: str, why: str) -> None:
        """The engine serving ``name`` died while ready: reap it; the next request restarts it."""
        if self.active != name or self.state not in (READY, SLEEPING) or self.switch_task:
            return  # already stopping, swapping or restarting: not a crash of a ready engine
        self.base_url = None
        looping = self.owner.crashed(name, why)
        self.book.move(name, FAILED if looping else CRASHED, error=why)
        self.switch_task = asyncio.get_running_loop().create_task(self._reap(name))
        self._notify()

    async def _reap(self, name: str) -> None:
        try:
            with contextlib.suppress(Exception):
                await self.backend.stop(name)
            self.active, self.entry = None, None  # the model stays crashed (or failed)
        finally:
            self.switch_task = None
            self._notify()

    async def check(self) -> None:
        """Reconcile: is the engine we believe ready still there?"""
        name, entry = self.active, self.entry
        if name is None or entry is None or self.state != READY or self.switch_task is not None:
            return
        try:
            alive = await self.backend.reconcile(entry)
        except Exception as exc:
            log.warning("reconciling %s failed: %s", name, exception_text(exc))
            return
        if alive is False:
            self.crashed(name, f"the {self.backend.kind} engine of {name!r} is no longer running")

    # --- stopping ------------------------------------------------------------------------------

    async def _stop_active(self, reason: str) -> None:
        name = self.active
        assert name is not None
        self.book.move(name, STOPPING)  # a stop in progress holds the slot: nobody starts
        self._notify()
        try:
            await self.backend.stop(name)
        except Exception as exc:  # a failed stop must not wedge the slot
            log.warning("stopping %s failed: %s", name, exc)
        self.book.move(name, STOPPED)
        self.active, self.entry, self.base_url = None, None, None
        self.owner.event("unload", model=name, reason=reason)
        self._notify()

    def _switching(self) -> bool:
        """A start, a reap or a stop is under way."""
        return self.switch_task is not None or self.state == STOPPING

    def idle(self, name: str) -> bool:
        """Is ``name`` the ready model here, serving no one, with nobody waiting for a turn?"""
        return (
            self.active == name
            and self.state == READY
            and not self.in_flight
            and self.switch_task is None
            and self.target in (None, name)
        )

    async def evict(self, name: str, reason: str) -> bool:
        """Stop ``name`` now if it is idle here, or asleep (the arbiter's eviction, or an idle
        TTL: ``reason`` "idle")."""
        asleep = self.active == name and self.state == SLEEPING and self.switch_task is None
        if not self.idle(name) and not asleep:
            return False
        await self._stop_active("idle" if reason == "idle" else f"evict ({reason})")
        self._notify()
        return True

    async def deactivate(self, name: str | None, timeout: float) -> bool:
        """Stop the active model (if it is ``name``, or any when None) once it has drained."""
        deadline = time.monotonic() + timeout
        while self._switching() or (self.active and self.in_flight):
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

    async def shutdown(self) -> None:
        task = self.switch_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task  # its own cleanup stops a half-started engine
        if self.active is not None:
            await self._stop_active("shutdown")
