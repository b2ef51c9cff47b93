"""Serving an ASGI app under uvicorn or hypercorn with uvloop, stopping cleanly on SIGINT or
SIGTERM.

Shared by the proxy and the executor: Ctrl+C and ``docker stop`` both run the app's lifespan
shutdown (which stops the model processes) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any


def serve_uvicorn(app: Any, host: str, port: int, *, graceful_timeout: float = 30.0) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=round(graceful_timeout),  # in-flight requests get this long
        proxy_headers=False,  # the client is the socket's peer; X-Forwarded-For is not trusted
    )
    server = uvicorn.Server(config)
    # Once it has shut down, uvicorn raises the stopping signal again under the handlers it
    # found, so that the process would die of SIGTERM; a clean stop exits 0 (docker stop,
    # systemd), as under hypercorn, so the handlers it finds do nothing.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's own exit code for a failed startup


def serve_hypercorn(app: Any, host: str, port: int, *, graceful_timeout: float = 30.0) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.graceful_timeout = graceful_timeout  # in-flight requests get this long to finish
    config.keep_alive_timeout = 75.0

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)

    try:
        import uvloop
    except ImportError:  # e.g. Windows: the asyncio loop works, only slower
        asyncio.run(run())
    else:
        uvloop.run(run())
