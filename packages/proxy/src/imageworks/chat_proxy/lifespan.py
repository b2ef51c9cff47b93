"""What a running proxy owns, opened at start-up and closed at shutdown.

Shutdown (SIGINT/SIGTERM, after the server has stopped accepting and let in-flight requests
finish within its grace period) runs these steps in order, each bounded by
``CHAT_PROXY_SHUTDOWN_STEP_TIMEOUT_S``; a step that fails or times out is logged and the next
one still runs:

1. release the GPU lease;
2. stop every model the proxy started (vLLM through the executor, llama.cpp processes);
3. ask the executor to deactivate whatever it still runs (a vLLM the proxy did not start);
4. unload Ollama's models with keep-alive requests (an executor or Ollama that is not running
   holds nothing: not a failure);
5. close the HTTP client and flush the request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any

from imageworks.chat_proxy.admission import Admission
from imageworks.chat_proxy.arbiter.arbiter import VramArbiter, unload_ollama_everywhere
from imageworks.chat_proxy.arbiter.gpu import GpuProbe, NoGpuProbe, NvmlProbe
from imageworks.chat_proxy.arbiter.ollama import OllamaManager
from imageworks.chat_proxy.backends import build_backends
from imageworks.chat_proxy.backends.vllm import VllmBackend
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.egress import Egress
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.chat_proxy.lifecycle import Lifecycle
from imageworks.chat_proxy.metrics import Metrics
from imageworks.chat_proxy.requestlog import RequestLog
from imageworks.chat_proxy.state import ProxyState
from imageworks.model_loader.profiles import PROFILES_FILE, ProfileManager
from imageworks.model_loader.registry import Registry
from imageworks.model_loader.schema import ModelEntry
from imageworks.model_loader.watch import RegistryWatcher

log = logging.getLogger("imageworks.chat_proxy")


def make_probe(config: ProxyConfig, lifecycle: Lifecycle, watcher: RegistryWatcher) -> GpuProbe:
    if config.gpu_probe in ("auto", "nvml"):
        try:
            return NvmlProbe()
        except Exception as exc:
            if config.gpu_probe == "nvml":
                raise RuntimeError(
                    f"CHAT_PROXY_GPU_PROBE=nvml but NVML is unusable: {exc}"
                ) from exc

    def declared() -> list[int]:
        registry = watcher.current
        return [
            registry.get(slot.active).vram_estimate_mb or 0
            for slot in lifecycle.slots.values()
            if slot.active is not None and slot.active in registry.names
        ]

    return NoGpuProbe(config.gpu_total_mb, declared)


def open_state(config: ProxyConfig, *, probe: GpuProbe | None = None) -> ProxyState:
    watcher = RegistryWatcher(config.registry_dir).start()
    profiles = ProfileManager(config.registry_dir / PROFILES_FILE, config.staging_dir)
    request_log = RequestLog(
        config.log_path,
        max_bytes=config.max_log_bytes,
        backups=config.log_backups,
        recent=config.recent_requests,
    ).start()
    metrics = Metrics()
    metrics.log_dropped.set_function(lambda: request_log.dropped)
    egress = Egress(config)
    session = egress.session
    backends = build_backends(config)
    for backend in backends.values():
        backend.attach(session)
    lifecycle = Lifecycle(
        backends,
        staging_dir=config.staging_dir,
        start_timeout=config.start_timeout_s,
        queue_timeout=config.queue_timeout_s,
        request_log=request_log,
    )
    lifecycle.metrics = metrics
    managers: dict[str, OllamaManager] = {}

    def ollama_for(entry: ModelEntry) -> OllamaManager:
        root = backends["ollama"].base_url(entry).removesuffix("/v1")
        if root not in managers:
            managers[root] = OllamaManager(session, root)
        return managers[root]

    arbiter = VramArbiter(
        probe or make_probe(config, lifecycle, watcher),
        lifecycle,
        staging_dir=config.staging_dir,
        ollama=ollama_for,
        registry=lambda: watcher.current,
        headroom_mb=config.gpu_headroom_mb,
        vram_timeout_s=config.vram_timeout_s,
        wait_timeout_s=config.queue_timeout_s,
        default_ttl_s=config.lease_ttl_s,
        request_log=request_log,
        metrics=metrics,
    )
    lifecycle.arbiter = arbiter
    metrics.lease_active.set(1 if arbiter.lease else 0)
    state = ProxyState(
        config=config,
        watcher=watcher,
        profiles=profiles,
        egress=egress,
        log=request_log,
        metrics=metrics,
        lifecycle=lifecycle,
        backends=backends,
        arbiter=arbiter,
        ollama_managers=managers,
        autostart=config.autostart_enabled,
        admission=Admission(config.max_concurrency, config.max_queue, metrics),
    )

    def on_reload(registry: Registry) -> None:
        metrics.registry_reloads.labels("ok").inc()
        request_log.event(
            "registry_reload", "registry", version=registry.version, entries=len(registry)
        )

    watcher.subscribe(on_reload)
    request_log.event(
        "startup",
        "proxy",
        host=config.host,
        port=config.port,
        registry_version=watcher.current.version,
        profile=profiles.active.name,
        gpu_probe=arbiter.probe.kind,
        lease_held=arbiter.lease is not None,
    )
    return state


def start_background(state: ProxyState) -> list[asyncio.Task[Any]]:
    return [asyncio.get_running_loop().create_task(state.arbiter.expiry_loop())]


async def close_state(state: ProxyState, background: list[asyncio.Task[Any]] | None = None) -> None:
    started = time.monotonic()
    for task in background or ():
        task.cancel()
    state.watcher.stop()
    timeout = state.config.shutdown_step_timeout_s
    results: dict[str, str] = {}
    registry = state.registry
    managers = [
        state.ollama_managers.get(root) or OllamaManager(state.session, root)
        for root in _ollama_roots(state, registry)
    ]
    steps: list[tuple[str, Awaitable[Any]]] = [
        ("release_lease", state.arbiter.close(release_lease=True)),
        ("stop_models", state.lifecycle.shutdown()),
    ]
    if any(e.backend == "vllm" and state.lifecycle.managed(e) for e in registry):
        vllm = state.backends["vllm"]
        assert isinstance(vllm, VllmBackend)
        steps.append(("deactivate_vllm", _deactivate_executor(vllm)))
    steps.append(("unload_ollama", unload_ollama_everywhere(managers)))
    for name, step in steps:
        try:
            outcome = await asyncio.wait_for(step, timeout)
            results[name] = "ok" if not outcome else f"ok: {outcome}"
        except Exception as exc:  # one failing step must not skip the others
            log.warning("shutdown step %s failed: %s", name, exc or type(exc).__name__)
            results[name] = f"failed: {exc or type(exc).__name__}"
    with contextlib.suppress(Exception):
        await state.egress.close()
    state.log.event(
        "shutdown", "proxy", steps=results, seconds=round(time.monotonic() - started, 3)
    )
    state.log.close()


async def _deactivate_executor(vllm: VllmBackend) -> str | None:
    """An executor that is not running holds no model: nothing to stop, and no failure."""
    try:
        await vllm.stop("*")
    except BackendUnavailable:
        return "executor not running"
    return None


def _ollama_roots(state: ProxyState, registry: Registry) -> list[str]:
    roots = {state.config.ollama_base_url}
    for entry in registry:
        if entry.backend == "ollama":
            with contextlib.suppress(Exception):
                roots.add(state.backends["ollama"].base_url(entry).removesuffix("/v1"))
    return sorted(roots)
