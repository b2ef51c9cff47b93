"""GPU probes: how much memory each GPU has, uses and gives to each process.

Implementations behind one interface (``devices()``: every device, in index order), chosen by
``CHAT_PROXY_GPU_PROBE``: ``nvml`` (nvidia-ml-py, every device; every call runs in a thread,
off the event loop), ``sim`` (the simulated GPU file named by ``CHAT_PROXY_GPU_SIM``, which
fake engines allocate from: ``simgpu.SimProbe``) and ``none`` (no GPU: budgets come from the models'
declared ``vram_estimate_mb`` against ``CHAT_PROXY_GPU_TOTAL_MB``, one total per device, when it
is set, otherwise nothing is gated). Tests bring their own (``testkit.gpu.FakeProbe``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GpuSnapshot:
    total_mb: int
    used_mb: int
    # Memory held per process id (NVML) or per holder name (fake); empty when unknown.
    processes: dict[int | str, int] = field(default_factory=dict)
    name: str = ""
    index: int = 0
    # Telemetry, where the probe has it (NVML; the simulated GPU): None when unknown.
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None

    @property
    def free_mb(self) -> int:
        return max(0, self.total_mb - self.used_mb)


class GpuProbe(Protocol):
    kind: str
    measures: bool  # False: free memory is only an estimate from declared model sizes

    async def devices(self) -> list[GpuSnapshot]:
        """Every device now, by index; empty when there is no budget to enforce."""
        ...


class NvmlProbe:
    kind = "nvml"
    measures = True

    def __init__(self) -> None:
        import pynvml  # from nvidia-ml-py

        self._nvml: Any = pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        if not self._handles:
            raise RuntimeError("NVML sees no GPU")
        names = [pynvml.nvmlDeviceGetName(h) for h in self._handles]
        self.names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def _read_one(self, index: int) -> GpuSnapshot:
        nvml, handle = self._nvml, self._handles[index]
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        processes: dict[int | str, int] = {}
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            used = getattr(proc, "usedGpuMemory", None)
            if isinstance(used, int):
                processes[int(proc.pid)] = used // (1024 * 1024)
        utilization, temperature, power = self._telemetry(handle)
        return GpuSnapshot(
            memory.total // (1024 * 1024),
            memory.used // (1024 * 1024),
            processes,
            self.names[index],
            index,
            utilization,
            temperature,
            power,
        )

    def _telemetry(self, handle: Any) -> tuple[float | None, float | None, float | None]:
        """Utilisation (%), temperature (C) and power (W); a reading the card or driver does
        not support is None, never an error."""
        nvml = self._nvml
        readings: list[float | None] = []
        for read in (
            lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # milliwatts
        ):
            try:
                readings.append(read())
            except Exception:  # NVMLError_NotSupported and friends
                readings.append(None)
        return readings[0], readings[1], readings[2]

    def _read(self) -> list[GpuSnapshot]:
        return [self._read_one(i) for i in range(len(self._handles))]

    async def devices(self) -> list[GpuSnapshot]:
        return await asyncio.to_thread(self._read)


# What a declared budget knows of a running model: the devices it runs on and its size.
Declared = tuple[tuple[int, ...], int]


class NoGpuProbe:
    """No GPU to measure: the ledger of declared model sizes stands in for one device per
    configured total (none configured: nothing is gated). ``resident`` returns the placement
    and estimate of each model loaded now; a model spanning devices counts a share on each."""

    kind = "none"
    measures = False

    def __init__(
        self, totals_mb: Sequence[int] | int | None, resident: Callable[[], Iterable[Declared]]
    ) -> None:
        if isinstance(totals_mb, int):
            totals_mb = [totals_mb]
        self.totals_mb = list(totals_mb or ())
        self.resident = resident

    async def devices(self) -> list[GpuSnapshot]:
        used = [0] * len(self.totals_mb)
        for devices, mb in self.resident():
            on = [d for d in devices or (0,) if d < len(used)]
            for device in on:
                used[device] += mb // len(on)
        return [
            GpuSnapshot(total, min(total, used[i]), {}, "declared budget", i)
            for i, total in enumerate(self.totals_mb)
        ]


def nvml_available() -> bool:
    try:
        NvmlProbe()
    except Exception:  # no library, no driver, no device: all mean "no NVML here"
        return False
    return True
