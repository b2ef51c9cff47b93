"""What a running proxy owns, opened at start-up and closed at shutdown.

Start-up adopts the engines an earlier proxy left running (a crash must not orphan them, nor
start second copies), then starts the background loops: lease expiry and the reconcile loop.

Shutdown (SIGINT/SIGTERM, after the server has stopped accepting and let in-flight requests
finish within its grace period) runs these steps in order, each bounded by
``CHAT_PROXY_SHUTDOWN_STEP_TIMEOUT_S``; a step that fails or times out is logged and the next
one still runs:

1. release the GPU lease;
2. stop every model the proxy started (vLLM through the executor, llama.cpp processes);
3. each backend kind's own shutdown, in the name table's order: the executor deactivates
   whatever it still runs (a vLLM the proxy did not start), Ollama unloads the models that are
   ours (never another program's); an executor or Ollama that is not running holds nothing;
4. close the HTTP client and flush the request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from imageworks.chat_proxy.arbiter.arbiter import VramArbiter
from imageworks.chat_proxy.arbiter.gpu import GpuProbe, NoGpuProbe, NvmlProbe
from imageworks.chat_proxy.arbiter.simgpu import SimProbe
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines import upkeep
from imageworks.chat_proxy.engines.backends import build_backends
from imageworks.chat_proxy.engines.lifecycle import Lifecycle
from imageworks.chat_proxy.engines.modelstate import Restarts
from imageworks.chat_proxy.engines.turns import Collation
from imageworks.chat_proxy.observe.events import EventBus
from imageworks.chat_proxy.observe.metrics import Metrics
from imageworks.chat_proxy.observe.records import Records
from imageworks.chat_proxy.observe.requestlog import RequestLog
from imageworks.chat_proxy.request.admission import Admission
from imageworks.chat_proxy.server.staging import StagingLock
from imageworks.chat_proxy.server.state import ProxyState
from imageworks.chat_proxy.upstream.egress import Egress
from imageworks.chat_proxy.upstream.peers import Peers
from imageworks.chat_proxy.upstream.responses import ResponseBook
from imageworks.chat_proxy.vision.budget import MB
from imageworks.chat_proxy.vision.pool import WorkerPool
from imageworks.chat_proxy.vision.prepare import ImagePrep
from imageworks.model_loader.profiles import PROFILES_FILE, ProfileManager
from imageworks.model_loader.registry import Registry
from imageworks.model_loader.watch import RegistryWatcher

log = logging.getLogger(__name__)


def make_probe(config: ProxyConfig, lifecycle: Lifecycle) -> GpuProbe:
    """The probe ``CHAT_PROXY_GPU_PROBE`` asks for (``auto``: NVML where it works, else none)."""
    if config.gpu_probe == "sim":
        if config.gpu_sim is None:
            raise RuntimeError("CHAT_PROXY_GPU_PROBE=sim needs CHAT_PROXY_GPU_SIM (a file)")
        return SimProbe(config.gpu_sim)
    if config.gpu_probe in ("auto", "nvml"):
        try:
            return NvmlProbe()
        except Exception as exc:
            if config.gpu_probe == "nvml":
                raise RuntimeError(
                    f"CHAT_PROXY_GPU_PROBE=nvml but NVML is unusable: {exc}"
                ) from exc
    return NoGpuProbe(config.gpu_total_mb, lifecycle.declared_mb)


def open_engines(
    config: ProxyConfig,
    registry: Callable[[], Registry],
    request_log: RequestLog,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    probe: GpuProbe | None,
) -> Lifecycle:
    """The backends, the lifecycle over them and the GPU arbiter it asks (its ``gate``)."""
    backends = build_backends(config)
    for backend in backends.values():
        backend.attach(session)

    def restarts() -> Restarts:
        return Restarts(
            base_s=config.restart_backoff_s,
            max_s=config.restart_backoff_max_s,
            loop_limit=config.crash_loop_limit,
            window_s=config.crash_loop_window_s,
        )

    def open_arbiter(residency: Lifecycle) -> VramArbiter:
        return VramArbiter(
            probe or make_probe(config, residency),
            residency,
            staging_dir=config.staging_dir,
            headroom_mb=config.gpu_headroom_mb,
            vram_timeout_s=config.vram_timeout_s,
            wait_timeout_s=config.queue_timeout_s,
            default_ttl_s=config.lease_ttl_s,
            request_log=request_log,
            metrics=metrics,
            sleep_ram_mb=config.sleep_ram_mb,
        )

    lifecycle = Lifecycle(
        backends,
        staging_dir=config.staging_dir,
        registry=registry,
        start_timeout=config.start_timeout_s,
        queue_timeout=config.queue_timeout_s,
        request_log=request_log,
        restarts=restarts,
        idle_ttl_s=config.idle_ttl_s,
        metrics=metrics,
        gpu_gate=open_arbiter,
        collation=Collation(config.collate_max, config.collate_wait_s),
    )
    arbiter = lifecycle.gpu_gate
    assert isinstance(arbiter, VramArbiter)  # what open_arbiter made
    budgeted = not (isinstance(arbiter.probe, NoGpuProbe) and not arbiter.probe.totals_mb)
    for backend in backends.values():
        backend.configure(budgeted=budgeted)
    return lifecycle


def open_state(config: ProxyConfig, *, probe: GpuProbe | None = None) -> ProxyState:
    # A bad peer list fails the start before anything is opened.
    peers = Peers(config, lambda: egress.session)
    staging_lock = StagingLock(config.staging_dir).acquire()  # first: before any engine moves
    watcher = RegistryWatcher(config.registry_dir).start()
    profiles = ProfileManager(config.registry_dir / PROFILES_FILE, config.staging_dir)
    request_log = RequestLog(
        config.log_path,
        max_bytes=config.max_log_bytes,
        backups=config.log_backups,
        recent=config.recent_requests,
        bus=EventBus(),
    ).start()
    metrics = Metrics()
    metrics.log_dropped.set_function(lambda: request_log.dropped)
    egress = Egress(config)
    lifecycle = open_engines(
        config, lambda: watcher.current, request_log, metrics, egress.session, probe
    )
    arbiter = lifecycle.gpu_gate
    assert isinstance(arbiter, VramArbiter)
    pool = WorkerPool(config.vision_workers)
    state = ProxyState(
        config=config,
        watcher=watcher,
        profiles=profiles,
        egress=egress,
        log=request_log,
        metrics=metrics,
        records=Records(request_log, metrics),
        lifecycle=lifecycle,
        arbiter=arbiter,
        autostart=config.autostart_enabled,
        admission=Admission(config.max_concurrency, config.max_queue, metrics),
        staging_lock=staging_lock,
        peers=peers,
        pool=pool,
        images=ImagePrep(pool, config.vision_decode_budget_mb * MB, config.queue_timeout_s),
        responses=ResponseBook(config.log_path.with_name("response_ids.tsv")).load(),
    )
    _announce(state)
    return state


def _announce(state: ProxyState) -> None:
    """Registry reloads in the log and the metrics from now on, and the start-up record."""
    config, request_log = state.config, state.log

    def on_reload(registry: Registry) -> None:
        state.metrics.registry_reloads.labels("ok").inc()
        request_log.event(
            "registry_reload", "registry", version=registry.version, entries=len(registry)
        )

    state.watcher.subscribe(on_reload)
    request_log.event(
        "startup",
        "proxy",
        host=config.host,
        port=config.port,
        registry_version=state.registry.version,
        profile=state.profile.name,
        gpu_probe=state.arbiter.probe.kind,
        lease_held=state.arbiter.leases.lease is not None,
    )


async def start_background(state: ProxyState) -> list[asyncio.Task[Any]]:
    """Adopt what an earlier proxy left running, then start the loops that keep state true."""
    if state.log.bus is not None:
        state.log.bus.bind()
    adopted = await state.lifecycle.recover()
    if adopted:
        log.info("adopted running engines: %s", ", ".join(adopted))
    loop = asyncio.get_running_loop()
    return [
        loop.create_task(state.arbiter.leases.expiry_loop()),
        loop.create_task(upkeep.reconcile_loop(state.lifecycle, state.config.reconcile_s)),
        loop.create_task(upkeep.idle_loop(state.lifecycle)),
        # In the background: the proxy serves (and lists models) while they load.
        loop.create_task(upkeep.preload(state.lifecycle, state.config.preload)),
        *([loop.create_task(state.peers.poll_loop())] if state.peers else []),
    ]


async def close_state(state: ProxyState, background: list[asyncio.Task[Any]] | None = None) -> None:
    started = time.monotonic()
    for task in background or ():
        task.cancel()
    state.watcher.stop()
    timeout = state.config.shutdown_step_timeout_s
    results: dict[str, str] = {}
    entries = [e for e in state.registry if e.servable]
    steps: list[tuple[str, Awaitable[Any]]] = [
        ("release_lease", state.arbiter.leases.close(release=True)),
        ("stop_models", state.lifecycle.shutdown()),
    ]
    for backend in state.lifecycle.backends.values():
        if backend.shutdown_step is not None:
            steps.append((backend.shutdown_step, backend.shutdown(entries)))
    for name, step in steps:
        try:
            outcome = await asyncio.wait_for(step, timeout)
            results[name] = "ok" if not outcome else f"ok: {outcome}"
        except Exception as exc:  # one failing step must not skip the others
            why = str(exc) or type(exc).__name__  # a timeout's message is empty
            log.warning("shutdown step %s failed: %s", name, why)
            results[name] = f"failed: {why}"
    with contextlib.suppress(Exception):
        await state.egress.close()
    state.pool.close()
    state.log.event(
        "shutdown", "proxy", steps=results, seconds=round(time.monotonic() - started, 3)
    )
    state.log.close()
    state.responses.close()
    state.staging_lock.release()
