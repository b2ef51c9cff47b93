"""The Ollama manager: what Ollama holds in VRAM, and unloading it with ``keep_alive: 0``.

Ollama has no stop endpoint (``/api/stop`` never existed): a model leaves memory when a
request with ``keep_alive: 0`` names it. So unloading is ``POST /api/generate`` with
``keep_alive: 0`` (``/api/chat`` if that fails), then polling ``/api/ps`` until the model is
gone. Ollama being down is not an error here: it holds nothing, so there is nothing to free,
and it must never block a lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp

log = logging.getLogger("imageworks.chat_proxy.ollama")


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

    async def loaded(self) -> dict[str, Loaded]:
        """Models resident now, from ``/api/ps``; empty (and ``reachable`` False) if Ollama is
        down."""
        try:
            async with self.session.get(
                self.base_url + "/api/ps", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                data = await response.json(content_type=None) if response.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.reachable = False
            return {}
        self.reachable = True
        models = data.get("models") if isinstance(data, dict) else None
        found = {}
        for item in models or ():
            tag = item.get("name") or item.get("model")
            if isinstance(tag, str):
                size = item.get("size_vram") or 0
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

    async def unload_all(self) -> list[str]:
        """Unload every resident model; returns those that left. Ollama down: nothing to do."""
        unloaded = []
        for tag in await self.loaded():
            if await self.unload(tag):
                unloaded.append(tag)
        return unloaded

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
