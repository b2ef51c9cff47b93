"""llama.cpp servers, one process per model, started and supervised by the proxy.

Each server runs in its own process group on a free port. While it runs, a record of it (pid,
kernel start time, argv, port) sits in ``<staging>/engines/``: if the proxy is killed, the next
proxy adopts the servers whose record still matches (and that answer their health check) rather
than starting second copies, and stops the ones that no longer answer. Adoption, not
``PR_SET_PDEATHSIG``: a model stays loaded across a proxy crash or upgrade, and the death signal
would fire when the *thread* that spawned the child exits, not the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from imageworks.chat_proxy import launch
from imageworks.chat_proxy.backends.base import Backend, has_explicit_address
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import ModelStartFailed, ModelStartTimeout
from imageworks.chat_proxy.process import (
    ManagedProcess,
    RecordStore,
    StartFailed,
    StartTimedOut,
    free_port,
)
from imageworks.model_loader.schema import ModelEntry

log = logging.getLogger("imageworks.chat_proxy.llamacpp")

# The bundled server (xllamacpp): llama-server's flags, so registry extra_args mean the same.
DEFAULT_TEMPLATE: tuple[str, ...] = (
    "{python}",
    "-m",
    "imageworks.chat_proxy.llamacpp.server",
    "--model",
    "{model_path}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--alias",
    "{served_model_id}",
    "{chat_template_args}",
    "{extra_args}",
)
TEMPLATE_VARIABLE = "CHAT_PROXY_LLAMACPP_LAUNCH_TEMPLATE"


def parse_template(raw: str | None) -> tuple[str, ...]:
    return launch.parse_template(
        raw, DEFAULT_TEMPLATE, variable=TEMPLATE_VARIABLE, fields=launch.COMMON_FIELDS
    )


def server_argv(
    entry: ModelEntry, port: int, template: tuple[str, ...] = DEFAULT_TEMPLATE
) -> list[str]:
    try:
        return launch.build_command(entry, template, host="127.0.0.1", port=port)
    except launch.LaunchError as exc:
        raise ModelStartFailed(str(exc)) from None


class LlamaCppBackend(Backend):
    """A llama.cpp server: one process per model, started by the proxy on a free port, unless
    the entry names the address of one that runs elsewhere."""

    kind = "llamacpp"

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self.template = parse_template(config.llamacpp_launch_template)
        self.processes: dict[str, ManagedProcess] = {}
        self.ports: dict[str, int] = {}
        self.records = RecordStore(config.staging_dir / "engines")

    def slot_key(self, entry: ModelEntry) -> str | None:
        return None if has_explicit_address(entry) else f"llamacpp:{entry.name}"

    async def start(self, entry: ModelEntry, log_path: Path, timeout: float) -> str:
        port = free_port()
        process = ManagedProcess(server_argv(entry, port, self.template), log_path)
        try:
            await process.spawn()
            self.processes[entry.name] = process
            self.ports[entry.name] = port
            await asyncio.to_thread(
                self.records.save, entry.name, process.record(model=entry.name, port=port)
            )
            await process.wait_healthy(f"http://127.0.0.1:{port}/health", timeout)
        except StartFailed as exc:
            await self.stop(entry.name)
            raise ModelStartFailed(f"model {entry.name!r} failed to start: {exc}") from None
        except StartTimedOut as exc:
            await self.stop(entry.name)
            raise ModelStartTimeout(f"model {entry.name!r} did not start: {exc}") from None
        except BaseException:
            # Anything else (a full disk for the record, a cancelled start): no child survives.
            if process.pid is not None:
                process.kill_now()
            await self.stop(entry.name)
            raise
        return f"http://127.0.0.1:{port}/v1"

    async def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        self.ports.pop(name, None)
        try:
            if process is not None:
                await process.stop()
        finally:
            await asyncio.to_thread(self.records.drop, name)

    def supervise(self, name: str, on_exit: Callable[[str], None]) -> None:
        process = self.processes.get(name)
        if process is None:
            return

        def exited(code: int | None) -> None:
            if not process.stopping and self.processes.get(name) is process:
                on_exit(f"the llama.cpp server (pid {process.pid}) exited with code {code}")

        process.watch(exited)

    async def reconcile(self, entry: ModelEntry) -> bool | None:
        process = self.processes.get(entry.name)
        return process is not None and process.alive

    async def recover(self, entries: Iterable[ModelEntry]) -> dict[str, str]:
        wanted = {e.name: e for e in entries if self.slot_key(e) is not None}
        adopted: dict[str, str] = {}
        for key, record in (await asyncio.to_thread(self.records.load_all)).items():
            name = str(record.extra.get("model", key))
            port = record.extra.get("port")
            if not record.matches():
                log.info("llama.cpp server of %s (pid %s) is gone", name, record.pid)
                await asyncio.to_thread(self.records.drop, key)
                continue
            process = ManagedProcess.adopt(record)
            if name not in wanted or not isinstance(port, int):
                log.warning(
                    "stopping llama.cpp server %s (pid %s): not in the registry", name, record.pid
                )
                await process.stop()
                await asyncio.to_thread(self.records.drop, key)
                continue
            try:
                await process.wait_healthy(f"http://127.0.0.1:{port}/health", 15.0)
            except (StartFailed, StartTimedOut) as exc:
                log.warning(
                    "adopted llama.cpp server of %s is not healthy, stopping it: %s", name, exc
                )
                await process.stop()
                await asyncio.to_thread(self.records.drop, key)
                continue
            self.processes[name] = process
            self.ports[name] = port
            adopted[name] = f"http://127.0.0.1:{port}/v1"
            log.info("adopted the running llama.cpp server of %s (pid %s)", name, record.pid)
        return adopted

    def pid_of(self, name: str) -> int | None:
        process = self.processes.get(name)
        return process.pid if process is not None else None

    async def close(self) -> None:
        for name in list(self.processes):
            with contextlib.suppress(Exception):
                await self.stop(name)
