"""GPU probes: how much memory the GPU has, uses and gives to each process.

Two implementations behind one interface, chosen by ``CHAT_PROXY_GPU_PROBE``: ``nvml``
(nvidia-ml-py; every call runs in a thread, off the event loop) and ``none`` (no GPU: budgets
come from the models' declared ``vram_estimate_mb`` against ``CHAT_PROXY_GPU_TOTAL_MB`` when it
is set, otherwise nothing is gated). Tests bring their own (``testkit.gpu.FakeProbe``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GpuSnapshot:
    total_mb: int
    used_mb: int
    # Memory held per process id (NVML) or per holder name (fake); empty when unknown.
    processes: dict[int | str, int] = field(default_factory=dict)
    name: str = ""

    @property
    def free_mb(self) -> int:
        return max(0, self.total_mb - self.used_mb)


class GpuProbe(Protocol):
    kind: str
    measures: bool  # False: free memory is only an estimate from declared model sizes

    async def snapshot(self) -> GpuSnapshot | None:
        """The GPU now; None when there is no budget to enforce."""


class NvmlProbe:
    kind = "nvml"
    measures = True

    def __init__(self, index: int = 0) -> None:
        import pynvml  # from nvidia-ml-py

        self._nvml: Any = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        raw_name = pynvml.nvmlDeviceGetName(self._handle)
        self.name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)

    def _read(self) -> GpuSnapshot:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        processes: dict[int | str, int] = {}
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            used = getattr(proc, "usedGpuMemory", None)
            if isinstance(used, int):
                processes[int(proc.pid)] = used // (1024 * 1024)
        return GpuSnapshot(
            memory.total // (1024 * 1024), memory.used // (1024 * 1024), processes, self.name
        )

    async def snapshot(self) -> GpuSnapshot | None:
        return await asyncio.to_thread(self._read)


class NoGpuProbe:
    """No GPU to measure: the ledger of declared model sizes stands in for one, if a total is
    configured. ``resident`` returns the estimates of what is loaded now."""

    kind = "none"
    measures = False

    def __init__(self, total_mb: int | None, resident: Callable[[], Iterable[int]]) -> None:
        self.total_mb = total_mb
        self.resident = resident

    async def snapshot(self) -> GpuSnapshot | None:
        if self.total_mb is None:
            return None
        return GpuSnapshot(self.total_mb, sum(self.resident()), {}, "declared budget")


def nvml_available() -> bool:
    try:
        NvmlProbe()
    except Exception:  # no library, no driver, no device: all mean "no NVML here"
        return False
    return True
