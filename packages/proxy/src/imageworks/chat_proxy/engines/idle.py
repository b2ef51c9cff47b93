"""Idle unload: a managed model that served no request for its TTL is stopped, and its GPU
memory verified back (``Lifecycle.unload``). The TTL is the entry's ``ttl_s``, else
``CHAT_PROXY_IDLE_TTL_S``; 0 means never; a ``pinned`` entry is never unloaded for idleness
(``lifecycle.ttl_of``). A busy model (a request in flight, a stream open for longer than the
TTL) or one another request is waiting to swap in is never touched: its idle time counts from
the end of its last request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imageworks.chat_proxy.engines.lifecycle import Lifecycle

log = logging.getLogger(__name__)


async def unload_idle(lifecycle: Lifecycle) -> list[str]:
    """Stop every model idle for longer than its TTL, and wait until the GPU shows its memory
    back."""
    unloaded = []
    for slot in list(lifecycle.slots.values()):
        entry = slot.entry
        if entry is None or lifecycle.idle_left(entry) != 0.0:
            continue
        if await lifecycle.unload(slot, "idle"):
            unloaded.append(entry.name)
    return unloaded


async def idle_loop(lifecycle: Lifecycle, interval_s: float = 0.25) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await unload_idle(lifecycle)
        except Exception as exc:  # the loop must outlive any one bad round
            log.warning("idle unload failed: %s", exc)
