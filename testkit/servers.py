"""Run servers on 127.0.0.1 in background threads, each with its own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LoopThread:
    """A thread running an event loop until ``stop()``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Awaitable[Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        if self.loop.is_closed():  # closing twice (a test, then its fixture) is fine
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():  # a loop left open leaks its self-pipe (ResourceWarning)
            self.loop.close()


_SCHEDSTAT = Path("/proc/thread-self/schedstat")  # run time, run-queue wait, slices (ns)


def _queued_ns() -> int:
    """Nanoseconds this thread has spent runnable but waiting for a CPU (0: not known here)."""
    try:
        return int(_SCHEDSTAT.read_bytes().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


class LoopWatch:
    """The callbacks that held one loop's thread for longer than ``threshold_s``.

    asyncio's debug mode times a callback by the wall clock; on a loaded machine the OS takes
    the CPU from the loop's thread in the middle of any callback, and a 1 ms callback "takes"
    50 ms. Here the time a callback held the loop is its wall time less the time its thread
    waited in the CPU's run queue (``/proc/thread-self/schedstat``): what remains is the time it
    ran or was blocked in a call (an fsync, a process wait), which is what makes a callback slow.
    """

    _watches: dict[int, LoopWatch] = {}
    _original: Callable[[asyncio.Handle], None] | None = None

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self.slow: list[str] = []

    def watch(self, thread: threading.Thread) -> None:
        """Watch the callbacks ``thread`` runs (every loop's handles run through one method)."""
        assert thread.ident is not None
        if LoopWatch._original is None:
            LoopWatch._original = asyncio.events.Handle._run
            asyncio.events.Handle._run = _watched_run  # type: ignore[method-assign,assignment]
        LoopWatch._watches[thread.ident] = self

    def forget(self, thread: threading.Thread) -> None:
        LoopWatch._watches.pop(thread.ident or 0, None)


def _watched_run(handle: asyncio.Handle) -> None:
    original = LoopWatch._original
    assert original is not None
    watch = LoopWatch._watches.get(threading.get_ident())
    if watch is None:
        original(handle)
        return
    started, queued = time.perf_counter(), _queued_ns()
    try:
        original(handle)
    finally:
        held = time.perf_counter() - started - (_queued_ns() - queued) / 1e9
        if held >= watch.threshold_s:
            watch.slow.append(f"{handle!r} held the loop for {held * 1000:.1f} ms")


class AiohttpServer:
    """An aiohttp application served on a free loopback port."""

    def __init__(self, app: web.Application, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = LoopThread("aiohttp-server")
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)

        async def start() -> None:
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._loop.call(start())

    def stop(self) -> None:
        if self._loop.loop.is_closed():
            return
        self._loop.call(self._runner.cleanup())
        self._loop.close()


class UvicornServer:
    """An ASGI application under uvicorn (the proxy's server in production) on a free loopback
    port."""

    def __init__(
        self,
        app: Callable[..., Any],
        port: int | None = None,
        *,
        slow_callback_s: float = 0,
        **timeouts: Any,
    ) -> None:
        """``slow_callback_s``: note in ``self.watch.slow`` every callback that holds the loop
        longer than this (``LoopWatch``)."""
        import uvicorn

        from imageworks.chat_proxy.server.serving import uvicorn_config

        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, "127.0.0.1", self.port, graceful_timeout=2, **timeouts)
        self._server = uvicorn.Server(config)
        self._loop = LoopThread("uvicorn-server")
        self.watch = LoopWatch(slow_callback_s)
        if slow_callback_s:
            self.watch.watch(self._loop.thread)
        self._done = threading.Event()

        async def run() -> None:
            try:
                await self._server.serve()  # off the main thread: no signal handlers
            finally:
                self._done.set()

        self._task = asyncio.run_coroutine_threadsafe(run(), self._loop.loop)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self._loop.loop.is_closed():
            return
        self._server.should_exit = True
        self._done.wait(15)
        self.watch.forget(self._loop.thread)
        self._loop.close()


def wait_for_port(port: int, timeout: float = 15, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A hand-written HTTP/1.1 server on a loopback port, for backends that misbehave on
    purpose (interim 1xx heads, malformed heads, stalls); TLS when given an ``ssl`` context."""

    def __init__(self, handler: RawHandler, ssl: Any = None) -> None:
        self._loop = LoopThread("raw-server")
        self._writers: set[asyncio.StreamWriter] = set()

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            try:
                await handler(reader, writer)
            except (OSError, asyncio.IncompleteReadError):
                pass  # the proxy hung up: part of what these servers are for
            finally:
                self._writers.discard(writer)
                writer.close()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(tracked, "127.0.0.1", 0, ssl=ssl)

        self._server: asyncio.Server = self._loop.call(start())
        self.port: int = self._server.sockets[0].getsockname()[1]
        scheme = "https" if ssl is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

        with contextlib.suppress(TimeoutError):
            self._loop.call(close(), timeout=5)
        self._loop.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (content-length framed, as the proxy sends them)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)
