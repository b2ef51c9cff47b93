"""The design card's stack with no features: Starlette + aiohttp, forwarding every POST under
/v1 to one backend (bodies as bytes, streams relayed per network read), under uvicorn with
httptools and uvloop. The proxy is measured against it (issue 14: lower added latency).

    python -m bench.bare_passthrough --port 8200 --backend http://127.0.0.1:8300
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def build(backend: str) -> Starlette:
    sessions: list[aiohttp.ClientSession] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sessions.append(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        )
        yield
        await sessions[0].close()

    async def forward(request: Request) -> Response:
        body = await request.body()
        upstream = await sessions[0].post(
            backend + request.url.path, data=body, headers={"content-type": "application/json"}
        )
        if upstream.content_type == "text/event-stream":

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.content.iter_any():
                        yield chunk
                finally:
                    upstream.release()

            return StreamingResponse(relay(), media_type="text/event-stream")
        data = await upstream.read()
        upstream.release()
        return Response(data, status_code=upstream.status, media_type=upstream.content_type)

    async def health(request: Request) -> Response:
        return Response(b'{"status": "ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/healthz", health, methods=["GET"]),
            Route("/v1/{path:path}", forward, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    args = parser.parse_args()
    uvicorn.run(
        build(args.backend.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        loop="uvloop",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
