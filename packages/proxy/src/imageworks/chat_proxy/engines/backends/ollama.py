"""Ollama's native API: what it holds in VRAM (``/api/ps``), and unloading with ``keep_alive: 0``.

Ollama has no stop endpoint (``/api/stop`` never existed): a model leaves memory when a
request with ``keep_alive: 0`` names it. So unloading is ``POST /api/generate`` with
``keep_alive: 0`` (``/api/chat`` if that fails), then polling ``/api/ps`` until the model is
gone. Ollama being down is not an error here: it holds nothing, so there is nothing to free,
and it must never block a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import urllib.parse
from dataclasses import dataclass

import aiohttp

from imageworks.chat_proxy.arbiter.seams import Holding
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends.base import Backend, MakeRoom, Usage
from imageworks.chat_proxy.engines.modelstate import READY, STOPPED, UNREACHABLE
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.chat_proxy.supervision.procfs import listening_pid, pid_alive
from imageworks.model_loader.schema import ModelEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    tag: str
    vram_mb: int


class OllamaManager:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        unload_timeout_s: float = 30.0,
        poll_s: float = 0.2,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.unload_timeout_s = unload_timeout_s
        self.poll_s = poll_s
        self.reachable: bool | None = None
        self._pid: int | None = None
        self._pid_looked_at = -1e9

    async def pid(self) -> int | None:
        """The Ollama server's process, when it runs on this host and we can see it: the GPU
        ledger learns from its per-process use where Ollama put its models. Looked up again
        when it dies, and at most every 30 s while it cannot be found."""
        if self._pid is not None and pid_alive(self._pid):
            return self._pid
        self._pid = None
        parsed = urllib.parse.urlsplit(self.base_url)
        local = parsed.hostname in ("127.0.0.1", "localhost", "::1")
        if local and parsed.port and time.monotonic() - self._pid_looked_at > 30:
            self._pid_looked_at = time.monotonic()
            self._pid = await asyncio.to_thread(listening_pid, parsed.port)
        return self._pid

    async def loaded(self) -> dict[str, Loaded]:
        """Models resident now, from ``/api/ps``; empty (and ``reachable`` False) if Ollama is
        down. Items that are not what Ollama documents are skipped, never an error here."""
        try:
            async with self.session.get(
                self.base_url + "/api/ps", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                data = await response.json(content_type=None) if response.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError):
            self.reachable = False
            return {}
        self.reachable = True
        models = data.get("models") if isinstance(data, dict) else None
        found = {}
        for item in models if isinstance(models, list) else ():
            if not isinstance(item, dict):
                continue
            tag = item.get("name") or item.get("model")
            size = item.get("size_vram") or 0
            if isinstance(tag, str) and isinstance(size, int | float) and size >= 0:
                found[tag] = Loaded(tag, int(size) // (1024 * 1024))
        return found

    async def unload(self, tag: str) -> bool:
        """Unload ``tag`` and wait until ``/api/ps`` no longer lists it."""
        why = await self._request_unload(tag)
        if why is None:
            deadline = time.monotonic() + self.unload_timeout_s
            while tag in await self.loaded():
                if time.monotonic() >= deadline:
                    why = f"still loaded after {self.unload_timeout_s:.0f} s"
                    break
                await asyncio.sleep(self.poll_s)
        if why is None:
            log.info("[ollama-manager] keep_alive unload %s ok", tag)
            return True
        log.warning("[ollama-manager] keep_alive unload %s failed (%s)", tag, why)
        return False

    async def load(self, tag: str) -> None:
        """Have Ollama load ``tag`` (a generate request with no prompt only loads the model)."""
        async with self.session.post(
            self.base_url + "/api/generate",
            json={"model": tag, "stream": False},
            timeout=aiohttp.ClientTimeout(total=300),
        ) as response:
            if response.status >= 400:
                raise RuntimeError(f"Ollama did not load {tag}: HTTP {response.status}")
        log.info("[ollama-manager] loaded %s again", tag)

    async def _request_unload(self, tag: str) -> str | None:
        """Ask Ollama to drop ``tag``; None on success, else why it failed."""
        attempts = (
            ("/api/generate", {"model": tag, "prompt": "", "keep_alive": 0, "stream": False}),
            ("/api/chat", {"model": tag, "messages": [], "keep_alive": 0, "stream": False}),
        )
        why = ""
        for path, body in attempts:
            try:
                async with self.session.post(
                    self.base_url + path, json=body, timeout=aiohttp.ClientTimeout(total=30)
                ) as response:
                    if response.status < 400:
                        return None
                    why = f"{path} answered {response.status}: {(await response.text())[:200]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = f"{path}: {exc or type(exc).__name__}"
        return why


class OllamaBackend(Backend):
    """Ollama, through its OpenAI-compatible ``/v1`` API; the shared server by default.

    Ollama loads and places models itself, so the proxy does not start them. It does make room
    on the GPU before a model's first use, unloads only what is ours (models from the registry,
    or ones this proxy made Ollama load) and shows everything else as foreign memory.
    """

    kind = "ollama"
    shutdown_step = "unload_ollama"
    # Ollama's /v1 reads image_url parts only as data:image/{jpeg,jpg,png,webp};base64 URLs.
    image_formats = frozenset({"JPEG", "PNG", "WEBP"})
    takes_image_urls = False

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self.managers: dict[str, OllamaManager] = {}
        self.ours: set[tuple[str, str]] = set()  # (root, tag) this proxy made Ollama load
        self.recent: dict[str, float] = {}  # entry name -> when it was last seen loaded

    def default_base_url(self, entry: ModelEntry) -> str:
        return self.config.ollama_base_url + "/v1"

    def manager(self, entry: ModelEntry) -> OllamaManager:
        return self.manager_at(self.base_url(entry).removesuffix("/v1"))

    def manager_at(self, root: str) -> OllamaManager:
        if root not in self.managers:
            self.managers[root] = OllamaManager(self.session, root)
        return self.managers[root]

    def _roots(self, entries: list[ModelEntry]) -> dict[str, OllamaManager]:
        roots = {self.config.ollama_base_url}
        for entry in entries:
            if entry.backend == self.kind:
                with contextlib.suppress(BackendUnavailable):
                    roots.add(self.base_url(entry).removesuffix("/v1"))
        return {root: self.manager_at(root) for root in sorted(roots)}

    def _registry_tags(self, entries: list[ModelEntry], root: str) -> dict[str, ModelEntry]:
        tags = {}
        for entry in entries:
            if entry.backend == self.kind:
                with contextlib.suppress(BackendUnavailable):
                    if self.base_url(entry).removesuffix("/v1") == root:
                        tags[entry.upstream_id] = entry
        return tags

    async def prepare(self, entry: ModelEntry, make_room: MakeRoom) -> None:
        """Ollama loads a model on first use: make room for it first if it is not loaded."""
        if not self.uses_gpu(entry):
            return
        if time.monotonic() - self.recent.get(entry.name, -1e9) < 30:
            return
        manager = self.manager(entry)
        if entry.upstream_id not in await manager.loaded():
            await make_room(entry)
            self.ours.add((manager.base_url, entry.upstream_id))
        self.recent[entry.name] = time.monotonic()

    async def load(self, entry: ModelEntry) -> None:
        manager = self.manager(entry)
        await manager.load(entry.upstream_id)
        self.ours.add((manager.base_url, entry.upstream_id))

    async def holdings(self, entries: list[ModelEntry], usage: Usage) -> list[Holding]:
        found: list[Holding] = []
        for root, manager in self._roots(entries).items():
            known = self._registry_tags(entries, root)
            loaded_now = await manager.loaded()
            pid = await manager.pid() if loaded_now else None
            for tag, loaded in loaded_now.items():
                entry = known.get(tag)
                if entry is None and (root, tag) not in self.ours:
                    found.append(
                        Holding(f"ollama:{tag}", loaded.vram_mb, 0.0, foreign=True, pid=pid)
                    )
                    continue
                name = entry.name if entry is not None else f"ollama:{tag}"
                last_used, in_flight = usage(name)
                found.append(
                    Holding(
                        name,
                        loaded.vram_mb or (entry.vram_estimate_mb or 0 if entry else 0),
                        last_used,
                        in_flight,
                        evict=functools.partial(manager.unload, tag),
                        pid=pid,
                        pinned=entry is not None and entry.pinned,
                        priority=entry.priority if entry is not None else 0,
                    )
                )
        return found

    async def observed(self, entries: list[ModelEntry]) -> dict[str, str]:
        states: dict[str, str] = {}
        for root, manager in self._roots(entries).items():
            loaded = await manager.loaded()
            for tag, entry in self._registry_tags(entries, root).items():
                if not manager.reachable:
                    states[entry.name] = UNREACHABLE
                else:
                    states[entry.name] = READY if tag in loaded else STOPPED
        return states

    async def shutdown(self, entries: list[ModelEntry]) -> str | None:
        """Unload the models that are ours; another program's models stay loaded."""
        unloaded: list[str] = []
        for root, manager in self._roots(entries).items():
            ours = set(self._registry_tags(entries, root)) | {
                tag for r, tag in self.ours if r == root
            }
            for tag in await manager.loaded():
                if tag in ours and await manager.unload(tag):
                    unloaded.append(tag)
        return ", ".join(unloaded) or None
