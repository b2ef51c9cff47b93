"""Idle unload: a managed model that served no request for its TTL is stopped, and its GPU
memory verified back. The TTL is the entry's ``ttl_s``, else ``CHAT_PROXY_IDLE_TTL_S``; 0 means
never; a ``pinned`` entry is never unloaded for idleness. A busy model (a request in flight, a
stream open for longer than the TTL) or one another request is waiting to swap in is never
touched: its idle time counts from the end of its last request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from imageworks.model_loader.schema import ModelEntry

if TYPE_CHECKING:
    from imageworks.chat_proxy.engines.lifecycle import Lifecycle

log = logging.getLogger("imageworks.chat_proxy.engines.idle")


def ttl_of(entry: ModelEntry, default_s: float) -> float:
    """Seconds of idleness before ``entry`` is unloaded; 0: never."""
    if entry.pinned:
        return 0.0
    return entry.ttl_s if entry.ttl_s is not None else default_s


def time_left(lifecycle: Lifecycle, entry: ModelEntry) -> float | None:
    """Seconds until ``entry`` is unloaded for idleness, if it is ready and idle now."""
    slot, ttl = lifecycle.slot(entry), ttl_of(entry, lifecycle.idle_ttl_s)
    if slot is None or ttl <= 0 or not slot.idle(entry.name):
        return None
    return max(0.0, ttl - (time.monotonic() - lifecycle.last_used(entry.name)))


async def unload_idle(lifecycle: Lifecycle) -> list[str]:
    """Stop every model idle for longer than its TTL, and wait until the GPU shows its memory
    back."""
    unloaded = []
    for slot in list(lifecycle.slots.values()):
        entry = slot.entry
        if entry is None or time_left(lifecycle, entry) != 0.0:
            continue
        pid = slot.backend.pid_of(entry.name)
        if await slot.evict(entry.name, "idle"):
            unloaded.append(entry.name)
            if lifecycle.metrics is not None:
                lifecycle.metrics.idle_unloads.labels(entry.name, "idle").inc()
            if lifecycle.gate is not None and slot.backend.uses_gpu(entry):
                await lifecycle.gate.released(pid)
    return unloaded


async def idle_loop(lifecycle: Lifecycle, interval_s: float = 0.25) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await unload_idle(lifecycle)
        except Exception as exc:  # the loop must outlive any one bad round
            log.warning("idle unload failed: %s", exc)
