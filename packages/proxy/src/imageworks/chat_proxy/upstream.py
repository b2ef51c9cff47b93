"""The forwarding path's own HTTP/1.1 client: pooled keep-alive connections to the backends.

Forwarding needs little of a general client: POST a body, read the head, relay the body as it
arrives, and put the connection back. aiohttp's client (still used for every other backend
call) spends most of the proxy's per-request CPU doing much more: URL and cookie handling,
tracing hooks, and an idle-read timer cancelled and re-armed on every chunk. Here a response
is parsed with httptools (the parser uvicorn uses), each network read becomes one chunk, and
the idle-read limit is checked by one sweep a second over the busy connections.

Failures raise ``UpstreamError`` (with ``connecting=True`` before the backend was reached) or
``TimeoutError`` (nothing read for ``read_timeout`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
from yarl import URL

_PAUSE_AT = 1 << 20  # bytes buffered for a slow client before the backend is paused


class UpstreamError(Exception):
    """The backend could not be reached, or broke the response off."""

    def __init__(self, message: str, *, connecting: bool = False) -> None:
        super().__init__(message)
        self.connecting = connecting


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one response at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.last_read = 0.0
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.headers: dict[str, str] = {}
        self.status = 0
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.reading: list[bytes] = []  # body pieces of the current network read
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.got_bytes = False
        self.paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"backend sent a malformed response: {exc}"))
            return
        if self.reading:
            chunk = self.reading[0] if len(self.reading) == 1 else b"".join(self.reading)
            self.reading = []
            self.chunks.append(chunk)
            self.buffered += len(chunk)
            if self.buffered > _PAUSE_AT and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
            self._wake()
        elif self.complete:
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._forget(self)
        if exc is None and self._delimited_by_close():
            self.complete = True  # an HTTP/1.0-style body: its end is the end of the stream
            self._wake()
        elif not self.complete:
            detail = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"backend closed the connection{detail}"))

    def _delimited_by_close(self) -> bool:
        return (
            self.head.done()
            and self.head.exception() is None
            and "content-length" not in self.headers
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
        )

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.reading.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # only meaningful until this returns

    # used by UpstreamResponse

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved here: a waiter that left must not log it
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next_chunk(self) -> bytes | None:
        """The next network read's worth of body; None at the end of the response."""
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return None
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < _PAUSE_AT // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk


class UpstreamResponse:
    def __init__(self, connection: _Connection, url: str) -> None:
        self._connection = connection
        self.url = url
        self.status = connection.status
        self.headers = connection.headers
        self._done = False

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one chunk per network read."""
        while (chunk := await self._connection.next_chunk()) is not None:
            yield chunk

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        pieces = [chunk async for chunk in self.chunks()]
        self.release()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def finish(self, timeout: float) -> None:
        """Read what is left of the body (a stream's last chunk terminator, after [DONE]) and
        release the connection; close it if the rest does not come within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while await self._connection.next_chunk() is not None:
                    pass
        except (UpstreamError, TimeoutError):
            self.close()
            return
        except asyncio.CancelledError:
            self.close()
            raise
        self.release()

    def release(self) -> None:
        """Back to the pool if the response was read to its end and the backend keeps the
        connection alive; closed otherwise (an unfinished generation is aborted)."""
        if self._done:
            return
        self._done = True
        connection = self._connection
        if connection.complete and not connection.chunks and connection.error is None:
            connection.pool._put_back(connection)
        else:
            connection.pool._discard(connection)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._connection.pool._discard(self._connection)


class UpstreamPool:
    """Keep-alive connections per backend address, with no limit on how many are open: every
    stream holds one, and a limit would queue the streams beyond it."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._targets: dict[str, tuple[tuple[str, int], str]] = {}

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send the request and wait for the response head (status and headers)."""
        (host, port), request_line = self._target(url)
        head = [request_line]
        head += [f"{name}: {value}\r\n" for name, value in headers.items()]
        head.append(f"content-length: {len(body)}\r\n\r\n")
        request = "".join(head).encode("latin-1") + body
        for attempt in (1, 2):
            connection = await self._connection((host, port), url)
            self._sweep_soon()  # after the connection is busy: the sweep ends when none is
            connection.last_read = connection.loop.time()
            assert connection.transport is not None
            connection.transport.write(request)
            try:
                await connection.head
            except UpstreamError:
                self._discard(connection)
                # A kept-alive connection the backend closed while it sat idle: the request
                # never reached it, so it is sent once more on a new connection.
                if attempt == 1 and connection.reused and not connection.got_bytes:
                    continue
                raise
            except BaseException:  # timed out, or cancelled because the client left
                self._discard(connection)
                raise
            return UpstreamResponse(connection, url)
        raise AssertionError("unreachable")

    def _target(self, url: str) -> tuple[tuple[str, int], str]:
        """Where ``url`` is and its request line with Host, parsed once per URL (a handful of
        models, each asked many times)."""
        target = self._targets.get(url)
        if target is None:
            parsed = URL(url)
            host, port = parsed.raw_host or "127.0.0.1", parsed.port or 80
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6
            line = f"POST {parsed.raw_path_qs} HTTP/1.1\r\nHost: {authority}\r\n"
            if len(self._targets) > 1024:  # bounded even if base URLs keep changing
                self._targets.clear()
            target = self._targets[url] = ((host, port), line)
        return target

    async def _connection(self, key: tuple[str, int], url: str) -> _Connection:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.transport is not None and not connection.transport.is_closing():
                connection.reused = True
                self._busy.add(connection)
                return connection
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self, key), key[0], key[1]
                )
        except TimeoutError:
            raise UpstreamError(f"timed out connecting to {url}", connecting=True) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise UpstreamError(
                f"cannot connect to backend at {url}: {reason}", connecting=True
            ) from None
        assert isinstance(protocol, _Connection)
        self._busy.add(protocol)
        return protocol

    def _put_back(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        if not connection.keep_alive or connection.transport is None:
            self._discard(connection)
            return
        connection._reset()
        self._idle.setdefault(connection.key, []).append(connection)

    def _discard(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        if connection.transport is not None:
            connection.transport.close()

    def _forget(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _sweep_soon(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Abort busy connections that have read nothing for ``read_timeout`` seconds."""
        interval = min(1.0, self.read_timeout / 4)
        loop = asyncio.get_running_loop()
        while self._busy:
            await asyncio.sleep(interval)
            deadline = loop.time() - self.read_timeout
            stale = [c for c in self._busy if c.last_read < deadline and not c.paused]
            for connection in stale:  # paused: the client is slow, not the backend
                self._busy.discard(connection)
                connection._fail(TimeoutError())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for connection in [*self._busy, *(c for idle in self._idle.values() for c in idle)]:
            if connection.transport is not None:
                connection.transport.close()
        self._busy.clear()
        self._idle.clear()
