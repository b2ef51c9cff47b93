"""vLLM's sleep mode, as only the executor calls it: ``POST /sleep?level=1``, ``POST /wake_up``
and ``GET /is_sleeping`` on a child it launched with ``--enable-sleep-mode`` and dev mode.

Those routes are unauthenticated (vLLM's dev mode opens them and other control routes), so the
child binds loopback only and the executor alone reaches them, on the loopback address; the
proxy asks the executor (``/admin/sleep``, ``/admin/wake``), never vLLM.

Level 1 moves the weights to host RAM and frees the VRAM (the KV cache is discarded); a wake
takes the VRAM back in a fraction of a cold start. What a sleeping child holds in host RAM is
measured, not assumed: its resident set (``/proc/<pid>/status``), or on the simulated GPU what
the fake engine says it holds there.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp

from imageworks.chat_proxy.arbiter.simgpu import SIM_VARIABLE, SimGpu, SimGpuError


class SleepError(RuntimeError):
    """The child refused or did not answer; the message says what it said."""


async def _call(method: str, url: str, timeout: float) -> tuple[int, str]:
    try:
        limit = aiohttp.ClientTimeout(total=timeout)
        async with (
            aiohttp.ClientSession(timeout=limit) as session,
            session.request(method, url) as response,
        ):
            return response.status, (await response.text())[:300]
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SleepError(f"vLLM did not answer {method} {url.rsplit('/', 1)[-1]}: {exc}") from None


async def is_sleeping(root: str, timeout: float = 10.0) -> bool | None:
    """The child's word (None: it does not say: no dev mode, or not answering)."""
    try:
        status, text = await _call("GET", f"{root}/is_sleeping", timeout)
    except SleepError:
        return None
    if status != 200:
        return None
    try:
        answer = json.loads(text)
    except ValueError:
        return None
    value = answer.get("is_sleeping") if isinstance(answer, dict) else None
    return value if isinstance(value, bool) else None


async def sleep(root: str, level: int, timeout: float) -> float:
    """Put the child to sleep; returns the seconds it took."""
    started = time.monotonic()
    status, text = await _call("POST", f"{root}/sleep?level={level}", timeout)
    if status != 200:
        raise SleepError(f"vLLM refused to sleep (HTTP {status}): {text}")
    if await is_sleeping(root) is not True:
        raise SleepError("vLLM answered the sleep but does not say it is sleeping")
    return time.monotonic() - started


async def wake(root: str, timeout: float) -> float:
    """Wake the child and wait until it says it is awake; returns the seconds it took."""
    started = time.monotonic()
    status, text = await _call("POST", f"{root}/wake_up", timeout)
    if status != 200:
        raise SleepError(f"vLLM failed to wake (HTTP {status}): {text}")
    deadline = started + timeout
    while await is_sleeping(root) is not False:
        if time.monotonic() >= deadline:
            raise SleepError(f"vLLM still says it is sleeping {timeout:.0f} s after the wake")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def host_mb(pid: int | None) -> int | None:
    """Host RAM the process holds, MiB: on the simulated GPU what it holds there, else its
    resident set. None: cannot tell (no such process)."""
    if pid is None:
        return None
    sim_path = os.environ.get(SIM_VARIABLE)
    if sim_path:
        try:
            return SimGpu(Path(sim_path)).host_held().get(pid, 0)
        except SimGpuError:
            return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
