"""GPUs for tests, behind the same probe interface as NVML: a scriptable one for in-process
tests (``FakeProbe``) and the simulated multi-device GPU that real processes allocate from
(``simulated_gpu``: the proxy reads it with ``CHAT_PROXY_GPU_PROBE=sim``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot
from imageworks.chat_proxy.arbiter.simgpu import SIM_VARIABLE, SimGpu


class FakeProbe:
    """A scriptable GPU for tests: memory is what the holder callbacks report, and the test
    can hold memory back (``stuck_mb``) to play a process that never lets go."""

    kind = "fake"
    measures = True

    def __init__(self, total_mb: int, *holders: Callable[[], dict[str, int]]) -> None:
        self.total_mb = total_mb
        self.holders = list(holders)
        self.stuck_mb = 0
        self.reads = 0
        # (utilisation %, temperature C, power W) the card reports; None: it reports none.
        self.telemetry: tuple[float, float, float] | None = None

    async def devices(self) -> list[GpuSnapshot]:
        return [await self.snapshot()]

    async def snapshot(self) -> GpuSnapshot:
        self.reads += 1
        held: dict[int | str, int] = {}
        for holder in self.holders:
            held.update(holder())
        used = sum(held.values()) + self.stuck_mb
        readings = self.telemetry or (None, None, None)
        return GpuSnapshot(self.total_mb, min(used, self.total_mb), held, "fake GPU", 0, *readings)


def simulated_gpu(
    root: Path, totals_mb: list[int], *, release_delay_s: float = 0.3
) -> tuple[SimGpu, dict[str, str]]:
    """A simulated multi-device GPU in ``root``, and the environment that points a proxy (the
    ``sim`` probe) and fake engines at it."""
    sim = SimGpu.create(root / "sim_gpu.json", totals_mb, release_delay_s=release_delay_s)
    return sim, {"CHAT_PROXY_GPU_PROBE": "sim", SIM_VARIABLE: str(sim.path)}


def held_by(sim: SimGpu, pid: int) -> dict[int, int]:
    """What ``pid`` holds on each device of the simulated GPU now."""
    return {s.index: int(s.processes[pid]) for s in sim.read() if pid in s.processes}
