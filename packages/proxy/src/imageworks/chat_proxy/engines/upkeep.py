"""The two loops that keep the engines true, the one way a model is unloaded unasked, and the
preload at start-up.

- **Idle unload**: a managed model that served no request for its TTL is stopped, and its GPU
  memory verified back. The TTL is the entry's ``ttl_s``, else ``CHAT_PROXY_IDLE_TTL_S``; 0
  means never; a ``pinned`` entry is never unloaded for idleness (``lifecycle.ttl_of``). A busy
  model (a request in flight, a stream open for longer than the TTL) or one another request is
  waiting to swap in is never touched: its idle time counts from the end of its last request.
- **Reconcile**, every ``CHAT_PROXY_RECONCILE_S``: every engine believed ready is asked whether
  it still runs (a crash otherwise unseen), a model whose entry left the registry is stopped
  once idle (nothing may hide a running engine), and unmanaged engines say what they hold.

Both unload through ``unload``, which waits (bounded) for the GPU to show the memory back.
Each loop outlives any one bad round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from imageworks.chat_proxy.engines.modelstate import State
from imageworks.chat_proxy.engines.slot import Slot

if TYPE_CHECKING:
    from imageworks.chat_proxy.engines.lifecycle import Lifecycle

log = logging.getLogger(__name__)


async def unload(lifecycle: Lifecycle, slot: Slot, reason: str) -> bool:
    """Stop the slot's model now if it is idle ("idle": its TTL ran out; else why it goes),
    and wait (bounded) until the GPU shows its memory back."""
    entry = slot.entry
    if entry is None:
        return False
    pid = slot.backend.pid_of(entry.name)
    if not await slot.evict(entry.name, reason):
        return False
    label = "idle" if reason == "idle" else "removed"
    lifecycle.metrics.idle_unloads.labels(entry.name, label).inc()
    await lifecycle.gpu_for(entry).released(pid)
    return True


async def unload_idle(lifecycle: Lifecycle) -> list[str]:
    """Stop every model idle for longer than its TTL."""
    unloaded = []
    for slot in list(lifecycle.slots.values()):
        entry = slot.entry
        if entry is None or lifecycle.idle_left(entry) != 0.0:
            continue
        if await unload(lifecycle, slot, "idle"):
            unloaded.append(entry.name)
    return unloaded


async def reconcile(lifecycle: Lifecycle) -> None:
    """One round of the truth loop (see the module's docstring)."""
    names = set(lifecycle.registry().names)
    for slot in list(lifecycle.slots.values()):
        if slot.active is not None and slot.active not in names:
            if await unload(lifecycle, slot, "removed from the registry"):
                log.info("stopped %s: it is no longer in the registry", slot.key)
            continue
        await slot.check()
    entries = [e for e in lifecycle.registry() if e.servable and not lifecycle.managed(e)]
    for backend in lifecycle.backends.values():
        mine = [e for e in entries if e.backend == backend.kind]
        if not mine:
            continue
        with contextlib.suppress(Exception):
            for name, state in (await backend.observed(mine)).items():
                lifecycle.book.move(name, State(state))


async def preload(lifecycle: Lifecycle, names: Iterable[str]) -> None:
    """Start the named models and those marked ``preload`` (at proxy start)."""
    wanted = set(names)
    for entry in lifecycle.registry():
        if not entry.servable or not lifecycle.managed(entry):
            continue
        if entry.preload or entry.name in wanted:
            try:
                await lifecycle.activate(entry)
                lifecycle.event("preload", model=entry.name, result="ready")
            except Exception as exc:
                lifecycle.event("preload", model=entry.name, result="failed", error=str(exc))


async def idle_loop(lifecycle: Lifecycle, interval_s: float = 0.25) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await unload_idle(lifecycle)
        except Exception as exc:  # the loop must outlive any one bad round
            log.warning("idle unload failed: %s", exc)


async def reconcile_loop(lifecycle: Lifecycle, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await reconcile(lifecycle)
        except Exception as exc:  # the loop must outlive any one bad round
            log.warning("reconcile failed: %s", exc)
