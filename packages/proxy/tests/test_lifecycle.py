"""The lifecycle state machine, driven through the real Lifecycle with a scripted backend.

The backend is a fake at the production seam (Backend.start/stop): it records what it was
asked to do and when, so the tests can check ordering without timing assertions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imageworks.chat_proxy.arbiter.seams import NoGpuGate
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines import upkeep
from imageworks.chat_proxy.engines.backends.base import Backend, StartRequest
from imageworks.chat_proxy.engines.lifecycle import Lifecycle
from imageworks.chat_proxy.engines.modelstate import (
    CRASHED,
    FAILED,
    MOVES,
    READY,
    STARTING,
    STOPPED,
    STOPPING,
    IllegalMove,
    Restarts,
    State,
    StatusBook,
)
from imageworks.chat_proxy.engines.turns import Ticket
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ModelBackoff,
    ModelStartFailed,
    ProxyError,
    QueueFull,
)
from imageworks.model_loader.registry import Registry, build_registry
from imageworks.model_loader.schema import ModelEntry


class ScriptedBackend(Backend):
    kind = "vllm"  # stands in for the executor: one model at a time

    def __init__(self) -> None:
        super().__init__(ProxyConfig.load(environ={}))
        self.events: list[str] = []
        self.running: set[str] = set()
        self.fail_next: dict[str, str] = {}
        self.gate: asyncio.Event | None = None  # when set, starts wait for it
        self.raise_next: dict[str, BaseException] = {}  # not a ProxyError: anything at all
        self.on_exit: dict[str, Callable[[str], None]] = {}

    def slot_key(self, entry: ModelEntry) -> str | None:
        return "one-gpu"

    async def start(self, request: StartRequest) -> str:
        entry = request.entry
        self.events.append(f"start {entry.name}")
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0.01)
        if entry.name in self.fail_next:
            raise ModelStartFailed(self.fail_next.pop(entry.name))
        if entry.name in self.raise_next:
            self.running.add(entry.name)  # it got as far as spawning something
            raise self.raise_next.pop(entry.name)
        assert not self.running, f"{self.running} still running while starting {entry.name}"
        self.running.add(entry.name)
        return f"http://backend/{entry.name}/v1"

    async def stop(self, name: str) -> None:
        self.events.append(f"stop {name}")
        self.running.discard(name)

    def supervise(self, name: str, on_exit: Callable[[str], None]) -> None:
        self.on_exit[name] = on_exit

    def die(self, name: str) -> None:
        """The engine process exits on its own (kill -9)."""
        self.running.discard(name)
        self.on_exit[name]("exited with code -9")


def entry(name: str) -> ModelEntry:
    return ModelEntry.model_validate({"name": name, "backend": "vllm"})


def empty_registry(tmp_path: Path) -> Callable[[], Registry]:
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "model_registry.curated.json").write_text("[]")
    registry = build_registry(tmp_path / "configs")
    return lambda: registry


def make_lifecycle(tmp_path: Path, backend: Backend, **restarts: float) -> Lifecycle:
    return Lifecycle(
        {backend.kind: backend},
        staging_dir=tmp_path,
        registry=empty_registry(tmp_path),
        start_timeout=5,
        queue_timeout=2,
        restarts=lambda: Restarts(**restarts),  # type: ignore[arg-type]
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Lifecycle, ScriptedBackend]:
    backend = ScriptedBackend()
    return make_lifecycle(tmp_path, backend, base_s=0.05, max_s=0.2, loop_limit=3), backend


async def test_concurrent_first_requests_start_the_model_once(setup) -> None:
    lifecycle, backend = setup
    tickets = await asyncio.gather(
        *[lifecycle.acquire(entry("a"), autostart=True) for _ in range(10)]
    )
    assert backend.events == ["start a"]
    assert {t.base_url for t in tickets} == {"http://backend/a/v1"}
    assert lifecycle.in_flight["a"] == 10 and lifecycle.state(entry("a")) == READY
    assert all(t.loaded for t in tickets)
    for ticket in tickets:
        ticket.release()
    assert "a" not in lifecycle.in_flight


async def test_a_busy_model_is_not_stopped_until_it_drains(setup) -> None:
    lifecycle, backend = setup
    held = await lifecycle.acquire(entry("a"), autostart=True)
    waiting = asyncio.create_task(lifecycle.acquire(entry("b"), autostart=True))
    await asyncio.sleep(0.1)
    assert not waiting.done() and backend.events == ["start a"]
    # While b waits for its turn, a newcomer for a must not jump the queue and starve b.
    late = asyncio.create_task(lifecycle.acquire(entry("a"), autostart=True))
    await asyncio.sleep(0.05)
    assert not late.done()
    held.release()
    b_ticket = await waiting
    assert backend.events == ["start a", "stop a", "start b"]
    b_ticket.release()
    (await late).release()
    assert backend.events == ["start a", "stop a", "start b", "stop b", "start a"]


async def test_everyone_waiting_for_a_model_is_served_before_it_is_swapped_out(setup) -> None:
    lifecycle, backend = setup
    first = await lifecycle.acquire(entry("a"), autostart=True)
    for_b = [asyncio.create_task(lifecycle.acquire(entry("b"), autostart=True)) for _ in range(3)]
    await asyncio.sleep(0.05)
    for_a = asyncio.create_task(lifecycle.acquire(entry("a"), autostart=True))
    await asyncio.sleep(0.05)
    first.release()
    b_tickets = await asyncio.gather(*for_b)  # all three b requests got b before a came back
    assert backend.events == ["start a", "stop a", "start b"]
    for ticket in b_tickets:
        ticket.release()
    (await for_a).release()
    assert backend.events[-2:] == ["stop b", "start a"]


async def test_a_failed_start_fails_its_waiters_and_does_not_wedge_the_model(setup) -> None:
    lifecycle, backend = setup
    backend.fail_next["a"] = "exit code 1; last log lines: CUDA out of memory"
    results = await asyncio.gather(
        *[lifecycle.acquire(entry("a"), autostart=True) for _ in range(3)], return_exceptions=True
    )
    assert all(isinstance(r, ModelStartFailed) for r in results)
    # One failed start, reported to all three, and reaped (a backend's stop is a no-op when
    # nothing runs).
    assert backend.events == ["start a", "stop a"]
    status = lifecycle.status(entry("a"))
    assert status.state == FAILED and "CUDA out of memory" in (status.last_error or "")
    with pytest.raises(ModelBackoff) as backoff:  # at once: the backoff, not a second start
        await lifecycle.acquire(entry("a"), autostart=True)
    assert backoff.value.status == 503 and backoff.value.headers["Retry-After"] == "1"
    assert backend.events == ["start a", "stop a"]
    ticket = await eventually_acquired(lifecycle, entry("a"))  # after it, a request retries
    assert backend.events[2:] == ["start a"] and lifecycle.state(entry("a")) == READY
    ticket.release()


async def eventually_acquired(lifecycle: Lifecycle, model: ModelEntry) -> Ticket:
    """Acquire once the backoff has passed (bounded, never a timing assertion)."""
    for _ in range(200):
        try:
            return await lifecycle.acquire(model, autostart=True)
        except ModelBackoff:
            await asyncio.sleep(0.01)
    raise AssertionError("the backoff never ended")


@pytest.mark.parametrize(
    "failure",
    [OSError(28, "No space left on device"), KeyError("error"), AttributeError("'str'")],
)
async def test_any_exception_during_a_start_is_a_failure_never_a_loop(setup, failure) -> None:
    lifecycle, backend = setup
    backend.raise_next["a"] = failure
    results = await asyncio.gather(
        *[lifecycle.acquire(entry("a"), autostart=True) for _ in range(3)], return_exceptions=True
    )
    assert all(isinstance(r, ModelStartFailed) for r in results), results
    assert type(failure).__name__ in str(results[0])
    assert backend.events == ["start a", "stop a"]  # one start, and whatever it left is reaped
    assert backend.running == set() and lifecycle.state(entry("a")) == FAILED
    with pytest.raises(ModelBackoff):
        await lifecycle.acquire(entry("a"), autostart=True)
    assert backend.events == ["start a", "stop a"]


async def test_the_backoff_doubles_and_resets_on_success(setup) -> None:
    lifecycle, backend = setup
    waits = []
    for _ in range(3):
        backend.fail_next["a"] = "boom"
        with pytest.raises(ModelStartFailed):
            await eventually_acquired(lifecycle, entry("a"))
        waits.append(lifecycle.restarts_of("a").retry_at - time.monotonic())
    assert waits[0] < waits[1] < waits[2] <= 0.2  # 0.05, 0.1, then the 0.2 cap
    (await eventually_acquired(lifecycle, entry("a"))).release()
    assert lifecycle.restarts_of("a").failures == 0


async def test_an_engine_that_dies_while_ready_is_crashed_and_restarted_on_demand(setup) -> None:
    lifecycle, backend = setup
    (await lifecycle.acquire(entry("a"), autostart=True)).release()
    backend.die("a")
    status = lifecycle.status(entry("a"))
    assert status.state == CRASHED and status.last_error == "exited with code -9"
    ticket = await lifecycle.acquire(entry("a"), autostart=True)  # the first crash: at once
    assert backend.events == ["start a", "stop a", "start a"]  # reaped, then started again
    assert lifecycle.state(entry("a")) == READY
    ticket.release()


async def test_a_crash_loop_ends_in_failed_until_activated_by_hand(setup) -> None:
    lifecycle, backend = setup  # loop_limit=3
    for _ in range(3):
        (await eventually_acquired(lifecycle, entry("a"))).release()
        backend.die("a")
    assert lifecycle.state(entry("a")) == FAILED
    assert "crash loop: 3 crashes" in (lifecycle.restarts_of("a").halted or "")
    assert lifecycle.status(entry("a")).last_error == "exited with code -9"  # the real cause
    with pytest.raises(ModelStartFailed, match="crash loop"):
        await lifecycle.acquire(entry("a"), autostart=True)
    assert backend.events.count("start a") == 3  # no fourth attempt on its own
    await lifecycle.activate(entry("a"))  # an operator's activation clears it
    assert lifecycle.state(entry("a")) == READY and backend.events.count("start a") == 4


async def test_restart_never_leaves_a_crashed_model_alone(setup) -> None:
    lifecycle, backend = setup
    never = ModelEntry.model_validate({"name": "a", "backend": "vllm", "restart": "never"})
    (await lifecycle.acquire(never, autostart=True)).release()
    backend.die("a")
    with pytest.raises(BackendUnavailable, match="restart policy is 'never'"):
        await lifecycle.acquire(never, autostart=True)
    assert backend.events.count("start a") == 1
    await lifecycle.activate(never)
    assert lifecycle.state(never) == READY


async def test_an_exit_during_a_stop_is_not_a_crash(setup) -> None:
    lifecycle, backend = setup
    await lifecycle.activate(entry("a"))
    await lifecycle.deactivate(entry("a"))
    backend.on_exit["a"]("exited with code 0")  # the watcher fires after the stop
    assert lifecycle.state(entry("a")) == STOPPED


async def test_autostart_disabled_refuses_a_stopped_model_but_serves_a_running_one(setup) -> None:
    lifecycle, _ = setup
    with pytest.raises(BackendUnavailable, match="autostart is disabled"):
        await lifecycle.acquire(entry("a"), autostart=False)
    await lifecycle.activate(entry("a"))
    (await lifecycle.acquire(entry("a"), autostart=False)).release()


async def test_waiting_too_long_for_a_busy_model_is_queue_full_with_retry_after(setup) -> None:
    lifecycle, backend = setup
    held = await lifecycle.acquire(entry("a"), autostart=True)
    with pytest.raises(QueueFull) as caught:
        await lifecycle.acquire(entry("b"), autostart=True)  # queue_timeout is 2 s
    assert caught.value.headers["Retry-After"] and caught.value.status == 503
    assert "'a' is still serving 1 request(s)" in caught.value.message
    held.release()
    # b gave up, so its claim is gone: a is still usable without a swap.
    (await lifecycle.acquire(entry("a"), autostart=True)).release()
    assert backend.events == ["start a"]


async def test_a_waiter_that_leaves_releases_its_claim(setup) -> None:
    lifecycle, backend = setup
    held = await lifecycle.acquire(entry("a"), autostart=True)
    leaving = asyncio.create_task(lifecycle.acquire(entry("b"), autostart=True))
    await asyncio.sleep(0.05)
    leaving.cancel()  # the client disconnected while queued
    await asyncio.gather(leaving, return_exceptions=True)
    (await lifecycle.acquire(entry("a"), autostart=True)).release()
    held.release()
    assert backend.events == ["start a"]


async def test_deactivate_waits_for_requests_then_stops(setup) -> None:
    lifecycle, backend = setup
    held = await lifecycle.acquire(entry("a"), autostart=True)
    stopping = asyncio.create_task(lifecycle.deactivate(entry("a")))
    await asyncio.sleep(0.05)
    assert not stopping.done() and backend.running == {"a"}
    held.release()
    assert await stopping == ["a"]
    assert backend.running == set() and lifecycle.state(entry("a")) == STOPPED


async def test_the_arbiter_can_never_evict_a_model_that_is_serving(setup) -> None:
    # The arbiter plans on a snapshot, then evicts; a request may arrive in between. The slot
    # itself refuses to stop a model with a request in flight.
    lifecycle, backend = setup
    held = await lifecycle.acquire(entry("a"), autostart=True)
    slot = lifecycle.slot(entry("a"))
    assert slot is not None
    assert await slot.evict("a", "vram") is False
    assert backend.running == {"a"} and lifecycle.state(entry("a")) == READY
    held.release()
    assert await slot.evict("a", "vram") is True
    assert backend.running == set() and backend.events == ["start a", "stop a"]


async def test_shutdown_stops_everything(setup) -> None:
    lifecycle, backend = setup
    await lifecycle.activate(entry("a"))
    await lifecycle.shutdown()
    assert backend.running == set() and backend.events[-1] == "stop a"


async def test_unmanaged_models_only_count_requests(tmp_path: Path) -> None:
    from imageworks.chat_proxy.engines.backends import build_backends

    lifecycle = Lifecycle(
        build_backends(ProxyConfig.load(environ={})),
        staging_dir=tmp_path,
        registry=empty_registry(tmp_path),
    )
    external = ModelEntry.model_validate(
        {"name": "x", "backend": "openai", "backend_config": {"base_url": "http://h:1/v1"}}
    )
    ticket = await lifecycle.acquire(external, autostart=False)
    assert ticket.base_url == "http://h:1/v1" and lifecycle.in_flight["x"] == 1
    ticket.release(reached=False)
    assert lifecycle.state(external) == "unreachable"


def test_errors_are_proxy_errors() -> None:
    assert issubclass(ModelStartFailed, ProxyError) and ModelStartFailed.status == 502


async def test_a_request_during_a_stop_waits_for_it_instead_of_starting_a_second_engine(
    setup,
) -> None:
    lifecycle, backend = setup
    await lifecycle.activate(entry("a"))
    release_stop = asyncio.Event()
    original_stop = backend.stop

    async def slow_stop(name: str) -> None:
        await release_stop.wait()  # an engine that takes its time to exit
        await original_stop(name)

    backend.stop = slow_stop  # type: ignore[method-assign]
    stopping = asyncio.create_task(lifecycle.deactivate(entry("a")))
    await asyncio.sleep(0.05)
    newcomer = asyncio.create_task(lifecycle.acquire(entry("a"), autostart=True))
    await asyncio.sleep(0.05)
    assert not newcomer.done() and backend.events == ["start a"]  # no start during the stop
    assert lifecycle.state(entry("a")) == STOPPING  # the one state the slot reads, too
    release_stop.set()
    assert await stopping == ["a"]
    (await newcomer).release()
    assert backend.events == ["start a", "stop a", "start a"]  # one stop, then one start


def test_the_book_refuses_a_move_the_table_does_not_list() -> None:
    book = StatusBook()
    book.move("a", STARTING)
    with pytest.raises(IllegalMove, match="a: starting -> crashed"):
        book.move("a", CRASHED)  # only a ready engine can crash
    book.move("a", READY, load_ms=12.5)
    book.move("a", STOPPING)
    with pytest.raises(IllegalMove, match="a: stopping -> ready"):
        book.move("a", READY)  # a stop ends stopped
    assert book.state("a") == STOPPING and book.get("a").load_ms == 12.5  # type: ignore[union-attr]
    version = book.version
    book.move("a", STOPPING)  # nothing new: no change, cached views stay valid
    assert book.version == version
    book.move("a", STOPPED)
    book.move("a", STARTING)
    book.move("a", FAILED, error="boom")
    book.move("a", STARTING)
    assert book.get("a").last_error == "boom"  # type: ignore[union-attr]  # kept until ready
    book.move("a", READY, error=None)
    assert book.get("a").last_error is None  # type: ignore[union-attr]


def test_every_state_has_its_row_in_the_table() -> None:
    assert set(MOVES) == set(State)
    assert all(to in State for targets in MOVES.values() for to in targets)


async def test_the_slot_state_is_the_book_entry_not_a_copy(setup) -> None:
    lifecycle, backend = setup
    await lifecycle.activate(entry("a"))
    slot = lifecycle.slot(entry("a"))
    assert slot is not None and slot.state == READY == lifecycle.state(entry("a"))
    backend.die("a")
    assert slot.state == CRASHED == lifecycle.state(entry("a"))


async def test_a_model_removed_from_the_registry_is_unloaded_and_its_memory_waited_for(
    tmp_path: Path,
) -> None:
    released: list[int | None] = []

    class RecordingGate(NoGpuGate):
        async def released(self, pid: int | None) -> bool:
            released.append(pid)
            return True

    backend = ScriptedBackend()
    backend.pid_of = lambda name: 4242  # type: ignore[method-assign]
    lifecycle = Lifecycle(
        {backend.kind: backend},
        staging_dir=tmp_path,
        registry=empty_registry(tmp_path),  # "a" is not (or no longer) in it
        gpu_gate=lambda residency: RecordingGate(),
    )
    gpu_entry = ModelEntry.model_validate({"name": "a", "backend": "vllm", "vram_estimate_mb": 900})
    await lifecycle.activate(gpu_entry)
    await upkeep.reconcile(lifecycle)
    assert backend.events == ["start a", "stop a"] and released == [4242]
    assert lifecycle.state(gpu_entry) == STOPPED
