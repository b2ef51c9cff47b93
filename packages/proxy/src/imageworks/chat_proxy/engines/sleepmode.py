"""vLLM sleep mode, the slot's part: put its model to sleep (the arbiter's eviction by sleep)
and wake it for the next request. A mixin of ``slot.Slot``; what it uses of the slot is
``SleepHost``.

The model stays the slot's active one while it sleeps (its engine lives, its weights are in
host RAM): ``ready -> sleeping`` (nobody is admitted meanwhile, the sleep holds the slot's
``switch_task``), then a request's switch moves it ``sleeping -> waking -> ready`` once the
owner made room on the GPU again. A sleep that fails stops the model instead; a wake that fails
is a failed start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from imageworks.chat_proxy.engines.backends import Backend
from imageworks.chat_proxy.engines.modelstate import READY, SLEEPING, WAKING, StatusBook
from imageworks.chat_proxy.engines.owner import SlotOwner
from imageworks.chat_proxy.engines.turns import exception_text
from imageworks.model_loader.schema import ModelEntry

log = logging.getLogger(__name__)


class SleepHost(Protocol):
    """What sleep and wake use of the slot."""

    backend: Backend
    owner: SlotOwner
    book: StatusBook
    entry: ModelEntry | None
    switch_task: asyncio.Task[None] | None
    switch_started: float
    making_room: bool

    def _notify(self) -> None: ...

    def idle(self, name: str) -> bool: ...

    def _reserve(self, name: str) -> None: ...

    async def _start_failed(
        self, entry: ModelEntry, exc: Exception, *, backoff: bool = True
    ) -> None: ...

    async def _stop_active(self, reason: str) -> None: ...

    async def _sleep(self, entry: ModelEntry) -> None: ...


class SleepMode:
    """The sleep and wake of ``slot.Slot``."""

    switch_task: asyncio.Task[None] | None

    async def _wake(self: SleepHost, entry: ModelEntry) -> None:
        """A request for the sleeping model: room on the GPU again, then the executor's wake."""
        name = entry.name
        self.book.move(name, WAKING)
        self.switch_started = time.monotonic()
        self._notify()
        self.making_room = True
        try:
            await self.owner.room_for(entry)  # the engine is there: only its room is wanted
        except Exception as exc:
            await self._start_failed(entry, exc, backoff=False)
            return
        finally:
            self.making_room = False
        try:
            wake_ms = await self.backend.wake(name)
        except Exception as exc:
            await self._start_failed(entry, exc)
            return
        self.book.move(name, READY, wake_ms=wake_ms, error=None)
        self.owner.woke(entry, wake_ms)
        self._reserve(name)

    async def sleep(self: SleepHost, name: str) -> bool:
        """Put ``name`` to sleep now if it is idle here (the arbiter's eviction by sleep); a
        sleep that fails stops it instead, so the memory is freed either way."""
        if not self.idle(name) or self.entry is None:
            return False
        task = asyncio.create_task(self._sleep(self.entry))
        self.switch_task = task
        await task  # meanwhile nobody is admitted (it is not ready) nor switched in
        return True

    async def _sleep(self: SleepHost, entry: ModelEntry) -> None:
        name = entry.name
        try:
            self.book.move(name, SLEEPING)
            self._notify()
            try:
                found = await self.backend.sleep(name)
            except Exception as exc:
                log.warning(
                    "putting %s to sleep failed, stopping it: %s", name, exception_text(exc)
                )
                await self._stop_active("evict (the sleep failed)")
                return
            self.book.move(
                name, SLEEPING, sleep_ms=found.get("sleep_ms"), host_mb=found.get("host_mb")
            )
            self.owner.slept(entry, found)
        finally:
            self.switch_task = None
            self._notify()
