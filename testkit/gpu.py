"""A scriptable GPU for tests, behind the same probe interface as NVML."""

from __future__ import annotations

from collections.abc import Callable

from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot


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

    async def snapshot(self) -> GpuSnapshot | None:
        self.reads += 1
        held: dict[int | str, int] = {}
        for holder in self.holders:
            held.update(holder())
        used = sum(held.values()) + self.stuck_mb
        return GpuSnapshot(self.total_mb, min(used, self.total_mb), held, "fake GPU")
