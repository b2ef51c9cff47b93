from __future__ import annotations

import sys
from pathlib import Path

from imageworks.chat_proxy.backends.base import Backend, has_explicit_address
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import ModelStartFailed, ModelStartTimeout
from imageworks.model_loader.schema import ModelEntry
from imageworks.vllm_executor.process import ManagedProcess, StartFailed, StartTimedOut, free_port


def server_argv(entry: ModelEntry, port: int) -> list[str]:
    """The llama.cpp server command for an entry: our xllamacpp runner, llama-server's flags."""
    bc = entry.backend_config
    if not bc.model_path:
        raise ModelStartFailed(f"model {entry.name!r} has no backend_config.model_path")
    argv = [
        sys.executable,
        "-m",
        "imageworks.chat_proxy.llamacpp.server",
        "--model",
        bc.model_path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--alias",
        entry.upstream_id,
    ]
    template = entry.chat_template
    if template is not None and template.source == "builtin" and template.name:
        argv += ["--chat-template", template.name]
    elif template is not None and template.path:
        argv += ["--chat-template", template.path]
    return argv + list(bc.extra_args)


class LlamaCppBackend(Backend):
    """A llama.cpp server: one process per model, started by the proxy on a free port, unless
    the entry names the address of one that runs elsewhere."""

    kind = "llamacpp"

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self.processes: dict[str, ManagedProcess] = {}

    def slot_key(self, entry: ModelEntry) -> str | None:
        return None if has_explicit_address(entry) else f"llamacpp:{entry.name}"

    async def start(self, entry: ModelEntry, log_path: Path, timeout: float) -> str:
        port = free_port()
        process = ManagedProcess(server_argv(entry, port), log_path)
        try:
            await process.spawn()
            self.processes[entry.name] = process
            await process.wait_healthy(f"http://127.0.0.1:{port}/health", timeout)
        except StartFailed as exc:
            self.processes.pop(entry.name, None)
            raise ModelStartFailed(f"model {entry.name!r} failed to start: {exc}") from None
        except StartTimedOut as exc:
            self.processes.pop(entry.name, None)
            raise ModelStartTimeout(f"model {entry.name!r} did not start: {exc}") from None
        return f"http://127.0.0.1:{port}/v1"

    async def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            await process.stop()

    def pid_of(self, name: str) -> int | None:
        process = self.processes.get(name)
        return process.pid if process is not None else None

    async def close(self) -> None:
        for name in list(self.processes):
            await self.stop(name)
