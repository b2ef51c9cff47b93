from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends.base import Backend, StartRequest, has_explicit_address
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ModelStartFailed,
    ModelStartTimeout,
    ProxyError,
)
from imageworks.model_loader.schema import ModelEntry

EXECUTOR_SLOT = "vllm-executor"


class VllmBackend(Backend):
    """vLLM, run by the executor (``imageworks-vllm``, DESIGN.md §6).

    The proxy never builds a vLLM command: it asks the executor to activate a model by name
    (with its share of its device and the devices it was placed on) and forwards to the base
    URL the executor reports (one source of truth for the port). With a GPU budget (measured
    or declared) each model has a slot of its own and several run at once where the ledger has
    room; without one, one model at a time (nothing could tell whether two fit). An entry with
    an explicit address is a vLLM server run elsewhere.
    """

    kind = "vllm"
    default_port = 24001
    requires_template = True
    shutdown_step = "deactivate_vllm"

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self.pids: dict[str, int | None] = {}
        self.concurrent = False  # several models at once: only where a GPU budget says they fit

    def configure(self, *, budgeted: bool) -> None:
        self.concurrent = budgeted

    def uses_gpu(self, entry: ModelEntry) -> bool:
        return True

    def slot_key(self, entry: ModelEntry) -> str | None:
        if has_explicit_address(entry):
            return None
        return f"vllm:{entry.name}" if self.concurrent else EXECUTOR_SLOT

    async def start(self, request: StartRequest) -> str:
        entry, log_path, timeout = request.entry, request.log_path, request.timeout
        gpu_share, devices = request.gpu_share, request.devices
        share = f" with {gpu_share} of the GPU" if gpu_share else ""
        share += f" on GPU {','.join(map(str, devices))}" if devices else ""
        await asyncio.to_thread(
            _note,
            log_path,
            f"asking the executor at {self.config.vllm_remote_url} to activate {entry.name!r}"
            + share,
        )
        body: dict[str, Any] = {"model": entry.name}
        if gpu_share:
            body["gpu_memory_utilization"] = gpu_share
        if devices:
            body["devices"] = list(devices)
        if self.concurrent:
            body["alongside"] = True
        state = await self._call("/admin/activate", body, timeout)
        base_url = state.get("base_url")
        if state.get("status") != "running" or not isinstance(base_url, str):
            raise ModelStartFailed(f"the vLLM executor did not start {entry.name!r}: {state}")
        await asyncio.to_thread(_note, log_path, f"ready at {base_url} (pid {state.get('pid')})")
        pid = state.get("pid")
        self.pids[entry.name] = pid if isinstance(pid, int) else None
        return _openai_base(base_url)

    async def stop(self, name: str) -> None:
        """Deactivate ``name`` ("*": whatever the executor runs). A model someone else
        activated on the executor meanwhile is not ours to stop."""
        self.pids.pop(name, None)
        if name != "*":
            runs = _runs(await self._call("/admin/state", None, 10.0))
            if runs.get(name, {}).get("status") in (None, "stopped"):
                return
            await self._call("/admin/deactivate", {"model": name}, 30.0)
            return
        await self._call("/admin/deactivate", {}, 30.0)

    def sleepable(self, entry: ModelEntry) -> bool:
        """Sleep mode needs the entry's word and a ledger (a slot per model) to account for it."""
        return (
            self.concurrent and entry.backend_config.sleep_mode and self.slot_key(entry) is not None
        )

    async def sleep(self, name: str) -> dict[str, Any]:
        run = await self._call("/admin/sleep", {"model": name, "level": 1}, 60.0)
        if run.get("sleeping") is not True:
            raise ModelStartFailed(f"the vLLM executor did not put {name!r} to sleep: {run}")
        return {"sleep_ms": run.get("sleep_ms"), "host_mb": run.get("host_mb")}

    async def wake(self, name: str) -> float:
        run = await self._call("/admin/wake", {"model": name}, self.config.start_timeout_s)
        if run.get("sleeping") is not False or run.get("status") != "running":
            raise ModelStartFailed(f"the vLLM executor did not wake {name!r}: {run}")
        took = run.get("wake_ms")
        return float(took) if isinstance(took, int | float) else 0.0

    async def reconcile(self, entry: ModelEntry) -> bool | None:
        """The executor's word: is it still running this model? Unreachable: cannot tell."""
        try:
            state = await self._call("/admin/state", None, 5.0)
        except ProxyError:
            return None
        return _runs(state).get(entry.name, {}).get("status") == "running"

    async def recover(self, entries: Iterable[ModelEntry]) -> dict[str, str]:
        """The vLLMs the executor still runs for our entries are ours again after a restart
        (one at a time without a GPU budget: the latest)."""
        names = {e.name for e in entries if self.slot_key(e) is not None}
        try:
            state = await self._call("/admin/state", None, 5.0)
        except ProxyError:
            return {}
        runs = _runs(state) if self.concurrent else {str(state.get("logical_name")): state}
        found = {}
        for name, run in runs.items():
            base_url = run.get("base_url")
            if run.get("status") != "running" or name not in names or not isinstance(base_url, str):
                continue
            if run.get("sleeping"):  # not adopted: the next activation wakes it
                continue
            pid = run.get("pid")
            self.pids[name] = pid if isinstance(pid, int) else None
            found[name] = _openai_base(base_url)
        return found

    async def shutdown(self, entries: list[ModelEntry]) -> str | None:
        """Ask the executor to stop whatever it still runs (a vLLM the proxy did not start
        too). An executor that is not running holds no model: nothing to stop, no failure."""
        if not any(self.slot_key(e) is not None for e in entries if e.backend == self.kind):
            return None
        try:
            await self.stop("*")
        except BackendUnavailable:
            return "executor not running"
        return None

    def pid_of(self, name: str) -> int | None:
        # Only meaningful when the executor shares our process namespace (bare metal).
        return self.pids.get(name)

    async def _call(self, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        url = self.config.vllm_remote_url + path
        headers = {"x-admin-token": self.config.admin_token} if self.config.admin_token else {}
        try:
            async with self.session.request(
                "GET" if body is None else "POST",
                url,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout + 10, sock_connect=10),
            ) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            raise ModelStartTimeout(f"the vLLM executor at {url} did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(
                f"the vLLM executor is unreachable at {url} ({exc}); is imageworks-vllm running? "
                "(CHAT_PROXY_VLLM_REMOTE_URL)"
            ) from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = {}
        if status >= 400:
            error: ProxyError
            text = _error_text(data) or raw[:500].decode("utf-8", "replace") or f"HTTP {status}"
            if status == 504:
                error = ModelStartTimeout(f"vLLM executor: {text}")
            else:
                error = ModelStartFailed(f"vLLM executor: {text}")
            raise error
        return data if isinstance(data, dict) else {}


def _runs(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every model the executor runs, by name (an executor from before ``models`` existed
    describes its one model at the top level)."""
    models = state.get("models")
    items = models if isinstance(models, list) else [state]
    return {
        str(item["logical_name"]): item
        for item in items
        if isinstance(item, dict) and item.get("logical_name")
    }


def _openai_base(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def _error_text(data: Any) -> str | None:
    """The message of an error body in any shape an executor (or a proxy before it) sends:
    ``{"error": {"message": ...}}``, ``{"error": "..."}``, ``{"detail": ...}``."""
    if not isinstance(data, dict):
        return None
    error = data.get("error", data.get("detail"))
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) and error else None


def _note(log_path: Path, line: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
