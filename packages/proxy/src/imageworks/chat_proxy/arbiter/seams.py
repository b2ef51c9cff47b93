"""The two small interfaces between the lifecycle and the GPU arbiter, over plain data.

The lifecycle asks the arbiter (``GpuGate``) whether a request may use the GPU now and to make
room before a start; the arbiter asks the lifecycle (``Residency``) what holds the GPU, how busy
it is, how to evict it, and to restore what a lease evicted. Neither imports the other.
Without an arbiter (unit tests, a model that takes no GPU) the lifecycle uses ``NO_GPU``, a
gate that admits everything and makes no room: nobody asks "is there a gate?".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from imageworks.model_loader.schema import ModelEntry


@dataclass(frozen=True)
class Holding:
    """Something that holds GPU memory now."""

    name: str
    vram_mb: int
    last_used: float  # monotonic seconds; lower is older
    in_flight: int = 0
    protected: bool = False  # starting or stopping: its slot owns it, not the arbiter
    foreign: bool = False  # loaded by someone else: never evicted, shown as foreign memory
    evict: Callable[[], Awaitable[bool]] | None = None
    # The process that holds the memory (our engine's, or the Ollama server's): how the ledger
    # tells our memory from strangers' and learns which device a model landed on.
    pid: int | None = None
    # The proxy's own engines: the arbiter sizes them from the entry (its share of the card,
    # learned footprint or estimate) rather than from ``vram_mb``.
    entry: ModelEntry | None = None
    # Never evicted (an entry's ``pinned``), and how much it is worth keeping (``priority``):
    # read from ``entry`` when there is one, else from these (an Ollama model's entry).
    pinned: bool = False
    priority: int = 0
    # vLLM sleep mode: ``sleep`` puts it to sleep instead of stopping it (None: it cannot);
    # a sleeping model holds ``host_mb`` of host RAM and only ``vram_mb`` (its residue) of VRAM.
    sleep: Callable[[], Awaitable[bool]] | None = None
    sleeping: bool = False
    host_mb: int = 0


class Residency(Protocol):
    async def holdings(self) -> list[Holding]:
        """Everything the proxy's engines hold on the GPU (and foreign models it can see)."""
        ...

    async def restore(self, name: str) -> None:
        """Start ``name`` again (after a lease that evicted it ends)."""
        ...


class GpuGate(Protocol):
    def admit(self, entry: ModelEntry, token: str | None) -> None:
        """Raise ``GpuLeaseActive`` if the GPU is lent and ``token`` is not the lease's."""
        ...

    async def make_room(self, entry: ModelEntry, need_mb: int | None = None) -> None:
        """Before ``entry`` starts: evict idle models until it fits, wait for the memory."""
        ...

    async def learn(self, entry: ModelEntry, pid: int | None) -> None:
        """After ``entry`` is ready: remember what its process really holds."""
        ...

    def share_of(self, entry: ModelEntry) -> float | None:
        """The fraction of its GPU ``entry`` needs (for engines that reserve a fraction)."""
        ...

    def placement_of(self, entry: ModelEntry) -> tuple[int, ...] | None:
        """The devices ``entry`` was placed on by ``make_room`` (None: no placement known)."""
        ...

    def slept(self, entry: ModelEntry, host_mb: int | None) -> None:
        """``entry`` went to sleep holding ``host_mb`` of host RAM (measured)."""
        ...

    def woke(self, entry: ModelEntry, wake_s: float) -> None:
        """``entry`` woke in ``wake_s`` seconds (measured)."""
        ...

    async def released(self, pid: int | None) -> bool:
        """After an engine stopped: wait (bounded) until the GPU no longer shows ``pid``."""
        ...


class NoGpuGate:
    """The gate where nothing is gated: no lease, no budget, nothing to wait for."""

    def admit(self, entry: ModelEntry, token: str | None) -> None:
        return None

    async def make_room(self, entry: ModelEntry, need_mb: int | None = None) -> None:
        return None

    async def learn(self, entry: ModelEntry, pid: int | None) -> None:
        return None

    def share_of(self, entry: ModelEntry) -> float | None:
        return None

    def placement_of(self, entry: ModelEntry) -> tuple[int, ...] | None:
        return None

    def slept(self, entry: ModelEntry, host_mb: int | None) -> None:
        return None

    def woke(self, entry: ModelEntry, wake_s: float) -> None:
        return None

    async def released(self, pid: int | None) -> bool:
        return True


NO_GPU: GpuGate = NoGpuGate()
