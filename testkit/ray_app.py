"""A small CPU Ray Serve application for the ``ray`` backend's tests and the scaling bench: an
OpenAI-compatible route that relays to a fake engine (``testkit.fake_engine``) on loopback.

``import_path: "testkit.ray_app:build"`` with ``args: {"engine_url": ...}``. It asks Ray for no
CPU, so one small local head can run several of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Relay:
    def __init__(self, engine_url: str) -> None:
        self.engine_url = engine_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the replica's event loop, on first use
            self._session = aiohttp.ClientSession(auto_decompress=False)
        return self._session

    async def __call__(self, request: Request) -> Response:
        # Serve mounts the app at its route prefix (the ASGI root_path); what follows is the
        # OpenAI path the engine knows.
        path, root = request.url.path, request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        body = await request.body()
        upstream = await self.session().request(
            request.method,
            self.engine_url + path,
            data=body or None,
            headers={"content-type": "application/json"},
        )
        media = upstream.headers.get("content-type", "application/json")
        if media.startswith("text/event-stream"):

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.content.iter_any():
                        yield chunk
                finally:
                    upstream.release()

            return StreamingResponse(relay(), status_code=upstream.status, media_type=media)
        data = await upstream.read()
        upstream.release()
        return Response(data, status_code=upstream.status, media_type=media)


def build(args: dict[str, Any]) -> Application:
    """The application builder Serve calls with the config's ``args``."""
    # ``bind`` is added by the decorator, which the type checker cannot see.
    return Relay.bind(str(args["engine_url"]))  # type: ignore[attr-defined,no-any-return]
