"""The executor's admin API (port 8600): run vLLM servers for the proxy, one child per model.

    GET  /health            {"status": "ok"}
    GET  /admin/state       the latest model's pid, port, base_url, status; ``models``: every one
    POST /admin/activate    {"model": "<registry name>", "gpu_memory_utilization": 0.3,
                             "devices": [1], "alongside": true}: launch, wait. Without
                             ``alongside`` every other model is stopped first (one at a time)
    POST /admin/deactivate  {} stops every model; {"model": name} only that one
    POST /admin/sleep       {"model": name, "level": 1}: put a sleep-mode model to sleep
                            (weights to host RAM, VRAM freed); ``sleep_ms``, ``host_mb``
    POST /admin/wake        {"model": name}: wake it; ``wake_ms`` is how long that took

A model whose entry has ``backend_config.sleep_mode`` runs with ``--enable-sleep-mode`` and
``VLLM_SERVER_DEV_MODE=1``, bound to loopback only (``launcher.sleep_mode_allowed``; else it
runs without, and ``sleep_unavailable`` says why). Only this executor calls vLLM's sleep routes
(``sleep.py``); an activation of a sleeping model wakes it.

Each child gets its own port (the first ``IMAGEWORKS_VLLM_SERVED_PORT``, others a free one)
and its devices as ``CUDA_VISIBLE_DEVICES``. The executor builds every command itself from its
template and the registry; nothing in a request becomes argv but numbers it validates.

The state is persisted under the staging dir: a restarted executor adopts a still-running
child (same pid, kernel start time *and* command line: ``chat_proxy.process``) or cleans up
after it, so a vLLM server is never orphaned and the state of a live one is never thrown away.
The child's exit is watched, so ``/admin/state`` says ``failed`` the moment it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imageworks.chat_proxy.auth import is_loopback, require_admin
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    InvalidRequest,
    ModelNotFound,
    ModelStartFailed,
    ModelStartTimeout,
    ProxyError,
)
from imageworks.chat_proxy.request.bodies import BodyBudget, BodyGuard, json_object
from imageworks.chat_proxy.request.browser import AllowedHosts, BrowserGuard
from imageworks.chat_proxy.supervision.process import (
    ManagedProcess,
    ProcessRecord,
    StartFailed,
    StartTimedOut,
    free_port,
    safe_name,
)
from imageworks.model_loader.errors import RegistryError, UnknownModelError
from imageworks.model_loader.layers import write_atomic
from imageworks.model_loader.registry import load_registry
from imageworks.vllm_executor import sleep as sleeping
from imageworks.vllm_executor.config import ExecutorConfig
from imageworks.vllm_executor.launcher import (
    DEV_MODE_ENV,
    LaunchError,
    command_for,
    sleep_mode_allowed,
)

log = logging.getLogger(__name__)

STATE_FILE = "vllm_executor.json"


@dataclass
class Run:
    """One model's vLLM child."""

    name: str
    port: int
    process: ManagedProcess | None = None
    record: dict[str, Any] | None = None
    status: str = "stopped"
    last_error: str | None = None
    sleep_mode: bool = False  # launched with --enable-sleep-mode (and dev mode)
    sleep_unavailable: str | None = None  # the entry asked for sleep mode; why it has none
    sleeping: bool = False
    sleep_ms: float | None = None  # the last sleep, and the last wake: measured here
    wake_ms: float | None = None
    host_mb: int | None = None  # host RAM it holds while asleep (measured)


class Executor:
    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.state_path = config.staging_dir / STATE_FILE
        self.runs: dict[str, Run] = {}
        self.latest: str | None = None  # the model /admin/state's top-level fields describe
        self.last_failed: Run | None = None
        self._lock = asyncio.Lock()

    # --- state ---------------------------------------------------------------------------------

    def _view(self, run: Run | None) -> dict[str, Any]:
        if run is None:
            run = self.last_failed or Run("", self.config.served_port)
        process = run.process
        if process is not None and not process.alive and run.status == "running":
            run.status = "failed"
            run.last_error = f"process {process.pid} exited"
        record = run.record or {}
        return {
            "status": run.status,
            "logical_name": record.get("logical_name"),
            "served_model_id": record.get("served_model_id"),
            "pid": record.get("pid"),
            "port": run.port,
            "base_url": self._base_url(run.port) if run.status == "running" else None,
            "started_at": record.get("started_at"),
            "log_file": record.get("log_file"),
            "devices": record.get("devices"),
            "last_error": run.last_error,
            "sleep_mode": run.sleep_mode,
            "sleep_unavailable": run.sleep_unavailable,
            "sleeping": run.sleeping,
            "sleep_ms": run.sleep_ms,
            "wake_ms": run.wake_ms,
            "host_mb": run.host_mb if run.sleeping else None,
        }

    def _base_url(self, port: int) -> str:
        return f"http://{self.config.public_host}:{port}/v1"

    def _health_url(self, port: int) -> str:
        host = self.config.served_host
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{host}:{port}/health"

    def state(self, name: str | None = None) -> dict[str, Any]:
        """One model's state (the latest activated by default), with ``models``: every one."""
        run = self.runs.get(name or self.latest or "")
        if run is None and name is None and self.runs:
            run = next(iter(self.runs.values()))
        return {**self._view(run), "models": [self._view(r) for r in self.runs.values()]}

    async def _persist(self) -> None:
        """Write (fsync) the state file in a thread: never block the event loop on a disk."""
        await asyncio.to_thread(self._write_state)

    def _write_state(self) -> None:
        records = {n: r.record for n, r in self.runs.items() if r.record is not None}
        if not records:
            self.state_path.unlink(missing_ok=True)
            return
        # The latest model's record at the top (the one-model shape older readers know).
        top = records.get(self.latest or "") or next(iter(records.values()))
        body = {**top, "models": records}
        write_atomic(self.state_path, json.dumps(body, indent=2).encode())

    async def recover(self) -> None:
        """After a restart: adopt the children we launched before, or clean up after them."""
        try:
            saved = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return
        records = saved.get("models") if isinstance(saved.get("models"), dict) else None
        for record in (records or {"": saved}).values():
            await self._adopt(record)
        self.latest = saved.get("logical_name") if saved.get("logical_name") in self.runs else None
        await self._persist()

    async def _adopt(self, record: dict[str, Any]) -> None:
        # Records from before the start time was kept have pid and argv only: still adoptable.
        legacy = {"pid": record.get("pid"), "argv": record.get("argv"), "start_ticks": None}
        identity = ProcessRecord.loads(json.dumps(record.get("process") or legacy))
        if identity is None:
            return
        pid = identity.pid
        if not identity.matches():
            log.info("previous vLLM (pid %s) is gone; clearing its state", pid)
            return
        name = str(record.get("logical_name"))
        port = int(record.get("port") or self.config.served_port)
        process = ManagedProcess.adopt(identity)
        run = Run(name, port, process, record)
        try:
            await process.wait_healthy(self._health_url(port), 15.0)
        except (StartFailed, StartTimedOut) as exc:
            log.warning("adopted vLLM (pid %s) is not healthy, stopping it: %s", pid, exc)
            await process.stop()
            return
        run.status = "running"
        run.sleep_mode = bool(record.get("sleep_mode"))
        if run.sleep_mode and await sleeping.is_sleeping(self._engine_root(port)):
            run.sleeping, run.host_mb = True, sleeping.host_mb(pid)
        self.runs[name] = run
        process.watch(self._exited(run, process))
        log.info("adopted running vLLM %s (pid %s)", name, pid)

    # --- actions -------------------------------------------------------------------------------

    async def activate(
        self,
        name: str,
        share: float | None = None,
        *,
        devices: list[int] | None = None,
        alongside: bool = False,
    ) -> dict[str, Any]:
        """Run ``name``. Its ``--gpu-memory-utilization`` is the entry's own
        ``backend_config.gpu_memory_utilization``, else ``share`` (the proxy's ledger: the
        entry's need over its device's total), else ``CHAT_PROXY_VLLM_GPU_MEMORY_UTILIZATION``.
        ``devices`` become its ``CUDA_VISIBLE_DEVICES``; without ``alongside`` every other
        model is stopped first."""
        try:
            registry = await asyncio.to_thread(load_registry, self.config.registry_dir)
            entry = registry.resolve(name)
        except UnknownModelError as exc:
            raise ModelNotFound(str(exc), param="model") from None
        except RegistryError as exc:
            raise BackendUnavailable(f"the executor cannot read the registry: {exc}") from None
        if entry.backend != "vllm":
            raise InvalidRequest(
                f"model {entry.name!r} has backend {entry.backend!r}, not vllm", param="model"
            )
        async with self._lock:
            current = self.runs.get(entry.name)
            if (
                current is not None
                and current.status == "running"
                and current.process is not None
                and current.process.alive
            ):
                if current.sleeping:
                    await self._wake(current)
                self.latest = entry.name
                return self.state(entry.name)
            for other in list(self.runs):
                if other == entry.name or not alongside:
                    await self._stop(other)
            used = {r.port for r in self.runs.values()}
            port = self.config.served_port if self.config.served_port not in used else free_port()
            template, host = self.config.launch_template, self.config.served_host
            sleep_mode, no_sleep = sleep_mode_allowed(entry, template, host)
            if no_sleep:
                log.warning("%s runs without sleep mode: %s", entry.name, no_sleep)
            try:
                argv = command_for(
                    entry,
                    self.config.launch_template,
                    host=self.config.served_host,
                    port=port,
                    gpu_memory_utilization=entry.backend_config.gpu_memory_utilization
                    or share
                    or self.config.gpu_memory_utilization,
                    python=self.config.python,
                    span=len(devices) if devices else entry.gpu_span,
                    sleep_mode=sleep_mode,
                )
            except LaunchError as exc:
                raise InvalidRequest(str(exc), param="model") from None
            env = child_env(os.environ, self.config.served_host)
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
            if sleep_mode:
                env.update(DEV_MODE_ENV)
            log_file = self.config.staging_dir / "vllm" / f"{safe_name(entry.name)}.log"
            process = ManagedProcess(argv, log_file, env=env)
            run = Run(entry.name, port, status="starting", sleep_mode=sleep_mode)
            run.sleep_unavailable = no_sleep
            self.runs[entry.name] = run
            self.latest = entry.name
            try:
                await process.spawn()
                run.process = process
                run.record = {
                    "pid": process.pid,
                    "argv": argv,
                    "process": json.loads(process.record().dumps()),
                    "logical_name": entry.name,
                    "served_model_id": entry.upstream_id,
                    "log_file": str(log_file),
                    "started_at": time.time(),
                    "port": port,
                    "devices": devices,
                    "sleep_mode": sleep_mode,
                }
                await self._persist()  # before the wait: a crash now must not orphan the child
                await process.wait_healthy(self._health_url(port), self.config.start_timeout_s)
            except StartFailed as exc:
                await self._forget(run, str(exc))
                raise ModelStartFailed(f"{entry.name!r} failed to start: {exc}") from None
            except StartTimedOut as exc:
                await self._forget(run, str(exc))
                raise ModelStartTimeout(f"{entry.name!r}: {exc}") from None
            run.status = "running"
            process.watch(self._exited(run, process))
            log.info("activated %s (pid %s) on port %s", entry.name, process.pid, port)
            return self.state(entry.name)

    def _engine_root(self, port: int) -> str:
        return self._health_url(port).removesuffix("/health")

    def _sleepable(self, name: str) -> Run:
        run = self.runs.get(name)
        alive = run is not None and run.process is not None and run.process.alive
        if run is None or run.status != "running" or not alive:
            raise InvalidRequest(f"model {name!r} is not running here", param="model", status=409)
        if not run.sleep_mode:
            why = run.sleep_unavailable or "its entry has no backend_config.sleep_mode"
            raise InvalidRequest(
                f"model {name!r} runs without sleep mode ({why})", param="model", status=409
            )
        return run

    async def sleep(self, name: str, level: int = 1) -> dict[str, Any]:
        """Put ``name`` to sleep (level 1: weights to host RAM, VRAM freed)."""
        async with self._lock:
            run = self._sleepable(name)
            if not run.sleeping:
                try:
                    took = await sleeping.sleep(
                        self._engine_root(run.port), level, self.config.start_timeout_s
                    )
                except sleeping.SleepError as exc:
                    raise ModelStartFailed(f"{name!r}: {exc}") from None
                run.sleeping, run.sleep_ms = True, round(took * 1000, 1)
                pid = run.process.pid if run.process else None
                run.host_mb = await asyncio.to_thread(sleeping.host_mb, pid)
                log.info(
                    "%s sleeps (level %s, %.0f ms, %s MiB host RAM)",
                    name,
                    level,
                    run.sleep_ms,
                    run.host_mb,
                )
            return self.state(name)

    async def wake(self, name: str) -> dict[str, Any]:
        """Wake ``name``; ``wake_ms`` says how long it took."""
        async with self._lock:
            run = self._sleepable(name)
            await self._wake(run)
            return self.state(name)

    async def _wake(self, run: Run) -> None:
        if not run.sleeping:
            return
        try:
            took = await sleeping.wake(self._engine_root(run.port), self.config.start_timeout_s)
        except sleeping.SleepError as exc:
            raise ModelStartFailed(f"{run.name!r}: {exc}") from None
        run.sleeping, run.wake_ms, run.host_mb = False, round(took * 1000, 1), None
        log.info("%s woke in %.0f ms", run.name, run.wake_ms)

    def _exited(self, run: Run, process: ManagedProcess) -> Any:
        def exited(code: int | None) -> None:
            if run.process is process and not process.stopping:
                run.status = "failed"
                run.last_error = f"process {process.pid} exited with code {code}"
                log.warning("vLLM (pid %s) exited with code %s", process.pid, code)

        return exited

    async def deactivate(self, name: str | None = None) -> dict[str, Any]:
        async with self._lock:
            for other in [name] if name is not None else list(self.runs):
                await self._stop(other)
            self.last_failed = None
            return self.state()

    async def _stop(self, name: str) -> None:
        run = self.runs.pop(name, None)
        if run is not None and run.process is not None:
            code = await run.process.stop()
            log.info("stopped %s (exit %s)", name, code)
        if self.latest == name:
            self.latest = None
        await self._persist()

    async def _forget(self, run: Run, error: str) -> None:
        if run.process is not None and run.process.alive:
            await run.process.stop()
        self.runs.pop(run.name, None)
        run.record, run.status, run.last_error = None, "failed", error
        self.last_failed = run
        if self.latest == run.name:
            self.latest = None
        await self._persist()


def child_env(environ: Mapping[str, str], served_host: str) -> dict[str, str]:
    """A vLLM child's environment: the executor's own, with vLLM's usage reporting off, and, for
    a server bound to loopback, its internal queues on loopback too (vLLM otherwise picks the
    machine's interface address for them). A value set in the executor's environment wins."""
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **environ}
    if is_loopback(served_host):
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    return env


def _executor(request: Request) -> Executor:
    executor: Executor = request.app.state.executor
    return executor


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def admin_state(request: Request) -> Response:
    executor = _executor(request)
    _require_admin(request, executor)  # pids, ports and log paths: not for the LAN
    return JSONResponse(executor.state())


def _require_admin(request: Request, executor: Executor) -> None:
    """The proxy's rule: the admin token if set, else loopback peers only (whatever host the
    executor was told to bind)."""
    peer = request.client.host if request.client else None
    require_admin(request.headers, executor.config.admin_token, peer=peer)


async def _model_request(request: Request) -> tuple[Executor, dict[str, Any]]:
    """The admin-guarded body of a request about one model: its ``model`` a registry name."""
    executor = _executor(request)
    _require_admin(request, executor)
    body = await json_object(request)
    if not isinstance(body.get("model"), str):
        raise InvalidRequest('body must be {"model": "<registry name>"}', param="model")
    return executor, body


async def activate(request: Request) -> Response:
    executor, body = await _model_request(request)
    share = body.get("gpu_memory_utilization")
    valid = isinstance(share, int | float) and not isinstance(share, bool) and 0 < share <= 1
    if share is not None and not valid:
        raise InvalidRequest(
            "'gpu_memory_utilization' must be a number in (0, 1]", param="gpu_memory_utilization"
        )
    devices = body.get("devices")
    if devices is not None and not (
        isinstance(devices, list)
        and devices
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 64 for d in devices)
    ):
        raise InvalidRequest("'devices' must be a list of GPU indexes", param="devices")
    alongside = body.get("alongside", False)
    if not isinstance(alongside, bool):
        raise InvalidRequest("'alongside' must be true or false", param="alongside")
    return JSONResponse(
        await executor.activate(body["model"], share, devices=devices, alongside=alongside)
    )


async def deactivate(request: Request) -> Response:
    executor = _executor(request)
    _require_admin(request, executor)
    body = await json_object(request, optional=True)
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("'model' must be a registry name", param="model")
    return JSONResponse(await executor.deactivate(name))


async def sleep_model(request: Request) -> Response:
    executor, body = await _model_request(request)
    level = body.get("level", 1)
    if level not in (1, 2) or isinstance(level, bool):
        raise InvalidRequest("'level' must be 1 or 2", param="level")
    return JSONResponse(await executor.sleep(body["model"], level))


async def wake_model(request: Request) -> Response:
    executor, body = await _model_request(request)
    return JSONResponse(await executor.wake(body["model"]))


async def _error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ProxyError):
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        exc = ProxyError(f"internal error: {type(exc).__name__}")
    # Its one client is the proxy, an admin: addresses shown, credentials hidden.
    return Response(exc.to_bytes(admin=True), status_code=exc.status, media_type="application/json")


def create_app(config: ExecutorConfig | None = None) -> BrowserGuard:
    config = config or ExecutorConfig.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        executor = Executor(config)
        app.state.executor = executor
        await executor.recover()
        try:
            yield
        finally:
            # A deliberate stop takes the child down too; only a crash leaves it for adoption.
            await executor.deactivate()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/admin/state", admin_state),
            Route("/admin/activate", activate, methods=["POST"]),
            Route("/admin/deactivate", deactivate, methods=["POST"]),
            Route("/admin/sleep", sleep_model, methods=["POST"]),
            Route("/admin/wake", wake_model, methods=["POST"]),
        ],
        exception_handlers={ProxyError: _error, Exception: _error},
        lifespan=lifespan,
    )
    # The proxy's Host and Origin rules (request/browser.py): a web page the operator opens
    # must not reach /admin/* here either. The proxy calls it by IMAGEWORKS_VLLM_PUBLIC_HOST.
    hosts = AllowedHosts(config.host, (config.public_host, *config.allowed_hosts))
    # Its bodies are a few small fields: 64 KiB each, 4 MiB together, within 60 s each.
    return BrowserGuard(BodyGuard(app, BodyBudget(4 * 1024 * 1024), 60.0, 30.0), hosts)
