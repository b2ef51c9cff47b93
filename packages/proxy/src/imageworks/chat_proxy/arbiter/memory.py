"""GPU memory on its way back: the wait after an eviction until the probe shows it free, and
the pids of our engines whose memory is coming back (a crash, a kill -9). Helpers of the
arbiter (``arbiter.py``), over plain data and the probe's snapshot."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection

from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot
from imageworks.chat_proxy.errors import InsufficientVram


async def await_memory(
    snapshot: Callable[[], Awaitable[list[GpuSnapshot]]],
    targets: dict[int, int],
    reason: str,
    whole: bool,
    *,
    timeout_s: float,
    headroom_mb: int,
    log: logging.Logger,
) -> None:
    """Evicted processes take a moment to give memory back: wait until the probe agrees
    on every device of the placement. ``log``: the arbiter's logger (the wait is its own, and
    an operator's log filter names it)."""
    deadline = time.monotonic() + timeout_s
    logged = False
    while True:
        snaps = {s.index: s for s in await snapshot()}
        short = {
            d: (want, snaps[d].free_mb)
            for d, want in targets.items()
            if d in snaps and snaps[d].free_mb < want
        }
        if not short:
            return
        device, (want, free) = next(iter(short.items()))
        if not logged:
            log.info(
                "[gpu-arbiter] waiting for VRAM need=%s free=%s (%s, GPU %s)",
                want - (0 if whole else headroom_mb),
                free,
                reason,
                device,
            )
            logged = True
        if time.monotonic() >= deadline:
            raise InsufficientVram(
                f"[gpu-arbiter] VRAM did not come back within {timeout_s:.0f} s for "
                f"{reason}: need={want} MB free={free} MB",
                headers={"Retry-After": "30"},
            )
        await asyncio.sleep(0.2)


def exiting_pids(
    engine_pids: dict[int, float],
    current: Collection[int | None],
    timeout_s: float,
    alive: Callable[[int], bool],
) -> frozenset[int]:
    """Pids of our engines (``engine_pids``: when each was last seen holding) that are no longer
    holdings (``current``) and whose process is gone (``alive`` says no): the memory the probe
    still shows for them is coming back, as it does a moment after any process exits. Past
    ``timeout_s`` a pid is dropped from ``engine_pids``, and its memory counts as a stranger's
    again (memory that never came back is not ours to wait for)."""
    now = time.monotonic()
    exiting = set()
    for pid, seen in list(engine_pids.items()):
        if now - seen > timeout_s:
            del engine_pids[pid]
        elif pid not in current and not alive(pid):
            exiting.add(pid)
    return frozenset(exiting)
