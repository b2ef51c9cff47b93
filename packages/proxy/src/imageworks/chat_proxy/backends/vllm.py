from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from imageworks.chat_proxy.backends.base import Backend, has_explicit_address
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ModelStartFailed,
    ModelStartTimeout,
    ProxyError,
)
from imageworks.model_loader.schema import ModelEntry

EXECUTOR_SLOT = "vllm-executor"


class VllmBackend(Backend):
    """vLLM, run one model at a time by the executor (``imageworks-vllm``, DESIGN.md §6).

    The proxy never builds a vLLM command: it asks the executor to activate a model by name
    and forwards to the base URL the executor reports (one source of truth for the port).
    An entry with an explicit address is a vLLM server run elsewhere.
    """

    kind = "vllm"
    default_port = 24001
    requires_template = True

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self.pids: dict[str, int | None] = {}

    def slot_key(self, entry: ModelEntry) -> str | None:
        return None if has_explicit_address(entry) else EXECUTOR_SLOT

    async def start(self, entry: ModelEntry, log_path: Path, timeout: float) -> str:
        _note(
            log_path,
            f"asking the executor at {self.config.vllm_remote_url} to activate {entry.name!r}",
        )
        state = await self._call("/admin/activate", {"model": entry.name}, timeout)
        base_url = state.get("base_url")
        if state.get("status") != "running" or not isinstance(base_url, str):
            raise ModelStartFailed(f"the vLLM executor did not start {entry.name!r}: {state}")
        _note(log_path, f"ready at {base_url} (pid {state.get('pid')})")
        pid = state.get("pid")
        self.pids[entry.name] = pid if isinstance(pid, int) else None
        return base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1") else "/v1")

    async def stop(self, name: str) -> None:
        await self._call("/admin/deactivate", {}, 60.0)
        self.pids.pop(name, None)

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
        except ValueError:
            data = {}
        if status >= 400:
            error: ProxyError
            message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
            text = message or raw[:500].decode("utf-8", "replace")
            if status == 504:
                error = ModelStartTimeout(f"vLLM executor: {text}")
            else:
                error = ModelStartFailed(f"vLLM executor: {text}")
            raise error
        return data if isinstance(data, dict) else {}


def _note(log_path: Path, line: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
