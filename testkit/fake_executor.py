"""A fake vLLM executor that speaks the executor's admin protocol (``/health``,
``/admin/state``, ``/admin/activate``, ``/admin/deactivate``) and can be held or hung on purpose.

The models it "activates" are served by a fake engine at ``engine_url``, so a proxy pointed at
it (``vllm_remote_url``) runs its real start, queue, keep-alive and shutdown paths without a
process: the test decides when a start finishes (``release``), whether it never finishes
(``hang_activate``) and whether a deactivation never answers (``hang_deactivate``).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeExecutor:
    engine_url: str
    url: str = ""  # where it listens, once served
    hold_activate: bool = False  # activations wait for ``release`` (a threading.Event)
    hang_activate: bool = False
    hang_deactivate: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    calls: list[str] = field(default_factory=list)
    active: str | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/admin/state", self.state)
        app.router.add_post("/admin/activate", self.activate)
        app.router.add_post("/admin/deactivate", self.deactivate)
        return app

    def _state(self) -> dict[str, Any]:
        return {
            "status": "running" if self.active else "stopped",
            "logical_name": self.active,
            "pid": None,
            "base_url": self.engine_url + "/v1" if self.active else None,
        }

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self._state())

    async def activate(self, request: web.Request) -> web.Response:
        model = (await request.json())["model"]
        self.calls.append(f"activate {model}")
        if self.hang_activate:
            await asyncio.sleep(3600)
        if self.hold_activate:
            await asyncio.to_thread(self.release.wait)  # set by the test's thread
        self.active = model
        return web.json_response(self._state())

    async def deactivate(self, request: web.Request) -> web.Response:
        self.calls.append("deactivate")
        if self.hang_deactivate:
            await asyncio.sleep(3600)
        self.active = None
        return web.json_response(self._state())
