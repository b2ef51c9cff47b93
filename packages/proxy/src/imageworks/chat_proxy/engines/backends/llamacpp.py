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

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends.base import (
    Backend,
    StartRequest,
    cuda_env,
    has_explicit_address,
)
from imageworks.chat_proxy.errors import ModelStartFailed, ModelStartTimeout
from imageworks.chat_proxy.supervision import launch
from imageworks.chat_proxy.supervision.process import (
    ManagedProcess,
    ProcessRecord,
    RecordStore,
    StartFailed,
    StartTimedOut,
    free_port,
)
from imageworks.chat_proxy.supervision.procfs import find_launched
from imageworks.model_loader.schema import ModelEntry

log = logging.getLogger(__name__)

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
    "{tool_args}",
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
        return launch.build_command(
            entry, template, host="127.0.0.1", port=port, tool_args=tool_args(entry)
        )
    except launch.LaunchError as exc:
        raise ModelStartFailed(str(exc)) from None


def tool_args(entry: ModelEntry) -> list[str]:
    """llama.cpp parses tool calls into OpenAI ``tool_calls`` only when it renders the chat
    with the model's Jinja template (``--jinja``)."""
    return ["--jinja"] if entry.capabilities.tools else []


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

    async def start(self, request: StartRequest) -> str:
        entry, log_path, timeout = request.entry, request.log_path, request.timeout
        port = free_port()
        argv = server_argv(entry, port, self.template)
        process = ManagedProcess(argv, log_path, env=cuda_env(request.devices))
        extra = {"model": entry.name, "port": port}
        try:
            # A pending record before the spawn: a proxy killed between the spawn and the
            # real record still leaves the next one a way to find the process (by its argv).
            await asyncio.to_thread(
                self.records.save, entry.name, ProcessRecord(0, None, argv, str(log_path), extra)
            )
            await process.spawn()
            self.processes[entry.name] = process
            self.ports[entry.name] = port
            await asyncio.to_thread(self.records.save, entry.name, process.record(**extra))
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
        """Adopt the servers an earlier proxy left running. A record is trusted only as far as
        it matches what this proxy would launch for that model on that port now; anything else
        (a model no longer in the registry, a changed template, a forged record) is left alone
        with a warning, never signalled."""
        wanted = {e.name: e for e in entries if self.slot_key(e) is not None}
        adopted: dict[str, str] = {}
        for key, record in (await asyncio.to_thread(self.records.load_all)).items():
            await asyncio.to_thread(self.records.drop, key)
            name, port = str(record.extra.get("model", "")), record.extra.get("port")
            entry = wanted.get(name)
            expected = (
                server_argv(entry, port, self.template)
                if entry is not None and isinstance(port, int)
                else None
            )
            if expected is None or record.argv != expected:
                log.warning(
                    "engine record %s is not one this proxy would launch now (model %r not in "
                    "the registry, or another command): left alone; pid %s",
                    key,
                    name,
                    record.pid,
                )
                continue
            assert entry is not None and isinstance(port, int)
            if record.pending:  # killed between spawn and record: find it, stop it
                for pid in await asyncio.to_thread(find_launched, record.argv):
                    log.warning(
                        "stopping a half-started llama.cpp server of %s (pid %s)", name, pid
                    )
                    await ManagedProcess.adopt(ProcessRecord(pid, None, [], "")).stop()
                continue
            if not record.matches():
                log.info("llama.cpp server of %s (pid %s) is gone", name, record.pid)
                continue
            process = ManagedProcess.adopt(record)
            try:
                await process.wait_healthy(f"http://127.0.0.1:{port}/health", 15.0)
            except (StartFailed, StartTimedOut) as exc:
                log.warning("llama.cpp server of %s is not healthy, stopping it: %s", name, exc)
                await process.stop()
                continue
            self.processes[name] = process
            self.ports[name] = port
            await asyncio.to_thread(self.records.save, name, record)
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
