"""Collation in a shared slot (ABAB -> AABB), through the real Lifecycle and Slot with a
scripted backend at the production seam (Backend.start/stop): once another model has claimed
the slot, a bounded run of requests for the resident model still goes first
(``CHAT_PROXY_COLLATE_MAX``), and only while no request for the claiming model has waited
``CHAT_PROXY_COLLATE_WAIT_S``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends.base import Backend, StartRequest
from imageworks.chat_proxy.engines.lifecycle import Lifecycle
from imageworks.chat_proxy.engines.turns import Collation, Ticket
from imageworks.model_loader.registry import build_registry
from imageworks.model_loader.schema import ModelEntry


class OneAtATime(Backend):
    kind = "vllm"  # the executor without a GPU budget: one shared slot

    def __init__(self) -> None:
        super().__init__(ProxyConfig.load(environ={}))
        self.events: list[str] = []

    def slot_key(self, entry: ModelEntry) -> str | None:
        return "shared"

    async def start(self, request: StartRequest) -> str:
        self.events.append(f"start {request.entry.name}")
        await asyncio.sleep(0.01)
        return f"http://backend/{request.entry.name}/v1"

    async def stop(self, name: str) -> None:
        self.events.append(f"stop {name}")


def model(name: str) -> ModelEntry:
    return ModelEntry.model_validate({"name": name, "backend": "vllm"})


def lifecycle_with(tmp_path: Path, backend: Backend, collation: Collation) -> Lifecycle:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "model_registry.curated.json").write_text("[]")
    registry = build_registry(tmp_path / "configs")
    return Lifecycle(
        {backend.kind: backend},
        staging_dir=tmp_path,
        registry=lambda: registry,
        start_timeout=5,
        queue_timeout=20,
        collation=collation,
    )


async def until(check: Callable[[], bool]) -> None:
    """Let the loop run until ``check`` holds (bounded; no timing is asserted)."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


@pytest.mark.parametrize(("most", "first"), [(0, 0), (2, 2), (8, 3)])
async def test_a_bounded_run_of_the_resident_models_queue_goes_first(
    tmp_path: Path, most: int, first: int
) -> None:
    backend = OneAtATime()
    lifecycle = lifecycle_with(tmp_path, backend, Collation(most, 60.0))
    a = model("a")
    held = await lifecycle.acquire(a, autostart=True)  # a is resident and busy
    queue: list[tuple[str, asyncio.Task[Ticket]]] = []
    for name in ("b", "a", "b", "a", "a"):  # interleaved: b claims the next turn first
        queue.append((name, asyncio.create_task(lifecycle.acquire(model(name), autostart=True))))
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    for_a = [task for name, task in queue if name == "a"]
    for_b = [task for name, task in queue if name == "b"]
    # Up to ``most`` of a's three went first, on the engine that runs: no swap yet.
    assert [task.done() for task in for_a] == [True] * first + [False] * (3 - first)
    assert not any(task.done() for task in for_b) and backend.events == ["start a"]
    held.release()
    for task in for_a[:first]:
        task.result().release()
    tickets_b = await asyncio.gather(*for_b)  # then the swap, and both of b's
    assert backend.events == ["start a", "stop a", "start b"]
    assert not any(task.done() for task in for_a[first:])  # the rest of a waited their turn
    for ticket in tickets_b:
        ticket.release()
    for ticket in await asyncio.gather(*for_a[first:]):
        ticket.release()
    swaps = backend.events.count("stop a") + backend.events.count("stop b")
    assert swaps == (1 if first == 3 else 2)  # the whole run of a first: one swap fewer
    await lifecycle.shutdown()


async def test_no_request_waits_for_collation_longer_than_the_wait_setting(
    tmp_path: Path,
) -> None:
    """A stream of overlapping requests for the resident model would hold the slot for ~3 s;
    with ``wait_s`` 0.3 the claiming model's request is served once the requests admitted
    within those 0.3 s (each held 0.05 s) drain, and later ones wait their turn."""
    backend = OneAtATime()
    wait_s, hold_s = 0.3, 0.05
    lifecycle = lifecycle_with(tmp_path, backend, Collation(1000, wait_s))
    a, b = model("a"), model("b")
    held = await lifecycle.acquire(a, autostart=True)
    claim = asyncio.create_task(lifecycle.acquire(b, autostart=True))
    await asyncio.sleep(0)
    before_b: list[Ticket] = []  # a's requests served on the engine that ran before the swap

    async def one_for_a() -> None:
        ticket = await lifecycle.acquire(a, autostart=True)
        if not claim.done():
            before_b.append(ticket)
        await asyncio.sleep(hold_s)
        ticket.release()

    stream = []
    for _ in range(60):  # one every 0.05 s: always one in flight, for about 3 s
        stream.append(asyncio.create_task(one_for_a()))
        await asyncio.sleep(hold_s)
        if held is not None:
            held.release()
            held = None
        if claim.done():
            break
    ticket_b = await claim
    # b waited the setting, plus what was admitted before it ran out, plus a quick swap: far
    # less than the ~3 s the stream of a's requests would have held the slot without it.
    assert ticket_b.wait_ms / 1000 < wait_s + 4 * hold_s + 0.5
    assert len(stream) < 40 and before_b  # collation did let some of a's requests go first
    assert backend.events[:3] == ["start a", "stop a", "start b"]
    ticket_b.release()
    await asyncio.gather(*stream)
    await lifecycle.shutdown()
