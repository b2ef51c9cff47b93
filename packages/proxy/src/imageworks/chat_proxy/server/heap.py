"""The proxy process's heap: big blocks given back to the OS when freed, and what the start
built kept out of the garbage collector's way. Both are for the proxy's own process (the command
line, or uvicorn serving ``imageworks.chat_proxy.app:app``), not for a process that imports
``create_app`` (the tests start hundreds)."""

from __future__ import annotations

import ctypes
import gc
import platform

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
BIG_BLOCK = 1024 * 1024


def give_big_blocks_back() -> bool:
    """Blocks of ``BIG_BLOCK`` or more (request bodies, their parsed strings, payloads) are
    mapped and unmapped on their own, so their memory goes back to the OS when the request
    ends. glibc raises this threshold by itself each time such a block is freed (up to 32 MB),
    and then keeps them on its heap: after 8 x 30 MB bodies the process still held 156-217 MB;
    with the threshold fixed, 96-101 MB (docs/performance.md). False: not glibc, nothing done."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, BIG_BLOCK) == 1


def freeze_startup_heap() -> None:
    """Take what the start built (modules, settings, the registry: ~59,000 objects) out of the
    cyclic garbage collector's sight. Every full collection walked all of it again: under load
    that was a 55-107 ms pause of the whole proxy every second or two (every stream stalled),
    for nothing (it found no garbage there); with the start frozen the longest pause measured
    was 9 ms (docs/performance.md). Frozen objects are still freed when nothing refers to them;
    only a reference cycle among them (none is known) would never be collected."""
    gc.collect()
    gc.freeze()
