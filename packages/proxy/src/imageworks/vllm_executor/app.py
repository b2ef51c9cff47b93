"""The executor's admin API (port 8600): run one vLLM server at a time for the proxy.

    GET  /health            {"status": "ok"}
    GET  /admin/state       the active model, pid, port, base_url, status
    POST /admin/activate    {"model": "<registry name>"}: stop the current one, launch, wait
    POST /admin/deactivate  stop it (process group, SIGKILL after a grace period)

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
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imageworks.chat_proxy.auth import require_admin
from imageworks.chat_proxy.bodies import json_object
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    InvalidRequest,
    ModelNotFound,
    ModelStartFailed,
    ModelStartTimeout,
    ProxyError,
)
from imageworks.chat_proxy.process import (
    ManagedProcess,
    ProcessRecord,
    StartFailed,
    StartTimedOut,
    safe_name,
)
from imageworks.model_loader.errors import RegistryError, UnknownModelError
from imageworks.model_loader.layers import write_atomic
from imageworks.model_loader.registry import load_registry
from imageworks.vllm_executor.config import ExecutorConfig
from imageworks.vllm_executor.launcher import LaunchError, build_command

log = logging.getLogger("imageworks.vllm_executor")

STATE_FILE = "vllm_executor.json"


class Executor:
    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.state_path = config.staging_dir / STATE_FILE
        self.process: ManagedProcess | None = None
        self.record: dict[str, Any] | None = None
        self.status = "stopped"
        self.last_error: str | None = None
        self._lock = asyncio.Lock()

    # --- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        if self.process is not None and not self.process.alive and self.status == "running":
            self.status = "failed"
            self.last_error = f"process {self.process.pid} exited"
        record = self.record or {}
        return {
            "status": self.status,
            "logical_name": record.get("logical_name"),
            "served_model_id": record.get("served_model_id"),
            "pid": record.get("pid"),
            "port": self.config.served_port,
            "base_url": self.config.base_url if self.status == "running" else None,
            "started_at": record.get("started_at"),
            "log_file": record.get("log_file"),
            "last_error": self.last_error,
        }

    async def _persist(self) -> None:
        """Write (fsync) the state file in a thread: never block the event loop on a disk."""
        await asyncio.to_thread(self._write_state)

    def _write_state(self) -> None:
        if self.record is None:
            self.state_path.unlink(missing_ok=True)
        else:
            write_atomic(self.state_path, json.dumps(self.record, indent=2).encode())

    async def recover(self) -> None:
        """After a restart: adopt the child we launched before, or clean up after it."""
        try:
            record = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return
        # Records from before the start time was kept have pid and argv only: still adoptable.
        legacy = {"pid": record.get("pid"), "argv": record.get("argv"), "start_ticks": None}
        identity = ProcessRecord.loads(json.dumps(record.get("process") or legacy))
        if identity is None:
            self.state_path.unlink(missing_ok=True)
            return
        pid = identity.pid
        if not identity.matches():
            log.info("previous vLLM (pid %s) is gone; clearing its state", pid)
            self.state_path.unlink(missing_ok=True)
            return
        process = ManagedProcess.adopt(identity)
        self.process, self.record = process, record
        try:
            await process.wait_healthy(self.config.health_url, 15.0)
        except (StartFailed, StartTimedOut) as exc:
            log.warning("adopted vLLM (pid %s) is not healthy, stopping it: %s", pid, exc)
            await process.stop()
            self.process, self.record, self.status = None, None, "stopped"
            await self._persist()
            return
        self.status = "running"
        process.watch(self._exited(process))
        log.info("adopted running vLLM %s (pid %s)", record.get("logical_name"), pid)

    # --- actions -------------------------------------------------------------------------------

    async def activate(self, name: str, share: float | None = None) -> dict[str, Any]:
        """Run ``name``. Its ``--gpu-memory-utilization`` is the entry's own
        ``backend_config.gpu_memory_utilization``, else ``share`` (the proxy's ledger: the
        entry's need over the card's total), else ``CHAT_PROXY_VLLM_GPU_MEMORY_UTILIZATION``."""
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
            if (
                self.status == "running"
                and self.record is not None
                and self.record.get("logical_name") == entry.name
                and self.process is not None
                and self.process.alive
            ):
                return self.state()
            await self._stop()
            try:
                argv = build_command(
                    entry,
                    self.config.launch_template,
                    host=self.config.served_host,
                    port=self.config.served_port,
                    gpu_memory_utilization=entry.backend_config.gpu_memory_utilization
                    or share
                    or self.config.gpu_memory_utilization,
                )
            except LaunchError as exc:
                raise InvalidRequest(str(exc), param="model") from None
            log_file = self.config.staging_dir / "vllm" / f"{safe_name(entry.name)}.log"
            process = ManagedProcess(argv, log_file)
            self.status, self.last_error = "starting", None
            try:
                await process.spawn()
                self.process = process
                self.record = {
                    "pid": process.pid,
                    "argv": argv,
                    "process": json.loads(process.record().dumps()),
                    "logical_name": entry.name,
                    "served_model_id": entry.upstream_id,
                    "log_file": str(log_file),
                    "started_at": time.time(),
                }
                await self._persist()  # before the wait: a crash now must not orphan the child
                await process.wait_healthy(self.config.health_url, self.config.start_timeout_s)
            except StartFailed as exc:
                await self._forget(str(exc))
                raise ModelStartFailed(f"{entry.name!r} failed to start: {exc}") from None
            except StartTimedOut as exc:
                await self._forget(str(exc))
                raise ModelStartTimeout(f"{entry.name!r}: {exc}") from None
            self.status = "running"
            process.watch(self._exited(process))
            log.info("activated %s (pid %s)", entry.name, process.pid)
            return self.state()

    def _exited(self, process: ManagedProcess) -> Any:
        def exited(code: int | None) -> None:
            if self.process is process and not process.stopping:
                self.status = "failed"
                self.last_error = f"process {process.pid} exited with code {code}"
                log.warning("vLLM (pid %s) exited with code %s", process.pid, code)

        return exited

    async def deactivate(self) -> dict[str, Any]:
        async with self._lock:
            await self._stop()
            return self.state()

    async def _stop(self) -> None:
        if self.process is not None:
            code = await self.process.stop()
            log.info("stopped %s (exit %s)", (self.record or {}).get("logical_name"), code)
        self.process, self.record, self.status = None, None, "stopped"
        await self._persist()

    async def _forget(self, error: str) -> None:
        if self.process is not None and self.process.alive:
            await self.process.stop()
        self.process, self.record, self.status, self.last_error = None, None, "failed", error
        await self._persist()


def _executor(request: Request) -> Executor:
    executor: Executor = request.app.state.executor
    return executor


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def admin_state(request: Request) -> Response:
    return JSONResponse(_executor(request).state())


def _require_admin(request: Request, executor: Executor) -> None:
    """The proxy's rule: the admin token if set, else loopback peers only (whatever host the
    executor was told to bind)."""
    peer = request.client.host if request.client else None
    require_admin(request.headers, executor.config.admin_token, peer=peer)


async def activate(request: Request) -> Response:
    executor = _executor(request)
    _require_admin(request, executor)
    body = await json_object(request, idle_timeout=30.0)
    if not isinstance(body.get("model"), str):
        raise InvalidRequest('body must be {"model": "<registry name>"}', param="model")
    share = body.get("gpu_memory_utilization")
    valid = isinstance(share, int | float) and not isinstance(share, bool) and 0 < share <= 1
    if share is not None and not valid:
        raise InvalidRequest(
            "'gpu_memory_utilization' must be a number in (0, 1]", param="gpu_memory_utilization"
        )
    return JSONResponse(await executor.activate(body["model"], share))


async def deactivate(request: Request) -> Response:
    executor = _executor(request)
    _require_admin(request, executor)
    return JSONResponse(await executor.deactivate())


async def _error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ProxyError):
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        exc = ProxyError(f"internal error: {type(exc).__name__}")
    return Response(exc.to_bytes(), status_code=exc.status, media_type="application/json")


def create_app(config: ExecutorConfig | None = None) -> Starlette:
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

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/admin/state", admin_state),
            Route("/admin/activate", activate, methods=["POST"]),
            Route("/admin/deactivate", deactivate, methods=["POST"]),
        ],
        exception_handlers={ProxyError: _error, Exception: _error},
        lifespan=lifespan,
    )
