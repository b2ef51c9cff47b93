"""Serving an ASGI app under uvicorn or hypercorn with uvloop, stopping cleanly on SIGINT or
SIGTERM.

Shared by the proxy and the executor: Ctrl+C and ``docker stop`` both run the app's lifespan
shutdown (which stops the model processes) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from imageworks.chat_proxy.departure import CONNECTION, Departure

KEEP_ALIVE_S = 75.0  # an idle kept-alive connection; hypercorn's default, uvicorn's is 5 s
HEADER_TIMEOUT_S = 10.0  # a request head must be complete within this (slow-header clients)
MAX_HEADER_BYTES = 64 * 1024  # a request head (line and headers) larger than this is a 431


def _too_large_head(limit: int) -> bytes:
    body = (
        b'{"error": {"message": "the request head (request line and headers) is larger than '
        + str(limit).encode()
        + b' bytes (CHAT_PROXY_MAX_HEADER_BYTES)", "type": "invalid_request_error", '
        b'"param": null, "code": "request_header_fields_too_large"}}'
    )
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class _HeadTooLarge(Exception):
    """A request head past the limit, found by the parser's callback."""


class _HeadTimer:
    """One timer per connection for its request heads (a ``call_later`` and a cancel for each
    request's head were two timer operations per request): when it fires it looks at the head
    being read, closes the connection if that began ``header_timeout`` ago, else arms itself
    again for it."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    header_timeout: float
    _head_timer: asyncio.TimerHandle | None = None
    _head_since: float | None = None  # when the head being read began; None: no head
    # The head's size limit, kept by the same protocol (uvicorn's ``url`` and ``headers``).
    max_header_bytes: int
    refusal: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    _head_bytes = 0  # of the head being read, so far
    _read = 0  # the bytes of the read being parsed
    _fresh = False  # the head being read began in the read being parsed, after other bytes

    def _count(self, in_head: bool, read: int) -> None:
        """A read parsed, its head not complete: counted, and refused past the limit. A head
        begun in this read counts what the parser took of it (the read began with what came
        before it: a pipelining client's 100 KB body was a 431); one begun before counts the
        whole read."""
        whole = in_head and not self._fresh
        self._head_bytes = self._head_bytes + read if whole else self._parsed_head()
        if self._head_bytes > self.max_header_bytes:
            self._refuse()

    def _complete(self) -> None:
        """A head complete: refused, its request not served, if the read that ended it made
        it too large. Only a read that could have is measured (a later request's head begins
        in a read the count did not take: one 150 KB head in one read was served)."""
        counted, self._head_bytes = self._head_bytes, 0
        limit = self.max_header_bytes
        if counted + self._read > limit and self._parsed_head() > limit:
            self._refuse()
            raise _HeadTooLarge()  # stops the parser: uvicorn's 400 is not sent after it

    def _parsed_head(self) -> int:
        """The head's URL and headers as parsed: at most its size on the wire."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _refuse(self) -> None:
        self._disarm()
        self.transport.write(self.refusal)
        self.transport.close()

    def _arm(self, since: float) -> None:
        self._head_timer = self.loop.call_at(since + self.header_timeout, self._look)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _look(self) -> None:
        self._head_timer, since = None, self._head_since
        if since is not None and self.loop.time() - since < self.header_timeout:
            self._arm(since)  # a later request's head, begun since the timer was set
        elif since is not None and not self.transport.is_closing():
            self.transport.close()


class _OpenCycles:
    """The requests of one connection not yet answered. uvicorn tells only the newest that its
    client left; a pipelining client's earlier request, the one running, was cancelled all the
    same (``departure.py``), ended unanswered, and was logged as the app's error ("ASGI callable
    returned without starting response") with a 500 sent to nobody."""

    _open: tuple[Any, ...] = ()

    def _opened(self, cycle: Any) -> None:
        self._open = (*(c for c in self._open if not c.response_complete), cycle)

    def _all_gone(self) -> None:
        for cycle in self._open:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()


def guarded_httptools(header_timeout: float, max_header_bytes: int = MAX_HEADER_BYTES) -> type[Any]:
    """uvicorn's httptools protocol, closing a connection whose request head is not complete
    ``header_timeout`` s after the connection's opening (later heads: after their first byte),
    and a 431 past ``max_header_bytes`` (a 32 MB header was served). Its requests' tasks are
    told when it is lost (``departure.py``)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    limit = max_header_bytes

    class GuardedHttpTools(_HeadTimer, _OpenCycles, HttpToolsProtocol):
        _departure: Departure | None = None
        max_header_bytes, refusal = limit, _too_large_head(limit)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.header_timeout = header_timeout
            self._departure = Departure(self.flow.resume_reading)
            self._head_since = self.loop.time()
            self._arm(self._head_since)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            in_head, self._read = self._head_since is not None, len(data)
            self._fresh = False
            super().data_received(data)
            if self._head_since is not None and not self.transport.is_closing():
                self._count(in_head, len(data))

        def send_400_response(self, msg: str) -> None:
            if not self.transport.is_closing():  # closed: a 431 went out (``_complete``)
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_since is None:  # a later request (the first is timed from the opening)
                self._head_since, self._fresh = self.loop.time(), True
            if self._head_timer is None:
                self._arm(self._head_since)

        def on_headers_complete(self) -> None:
            # The timer runs on (one per request was a call_later and a cancel on each).
            self._head_since = None
            self._complete()
            connection = CONNECTION.set(self._departure)  # the request's task copies it
            try:
                super().on_headers_complete()
            finally:
                CONNECTION.reset(connection)
            self._opened(self.cycle)
            _adapt(self.cycle, self.loop)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)
            self._all_gone()
            if self._departure is not None:
                self._departure.gone()

    return GuardedHttpTools


def _adapt(cycle: Any, loop: asyncio.AbstractEventLoop) -> None:
    """A new request's cycle, before its task first runs: its head written with its body, and
    an HTTP/1.0 client's stream not chunked."""
    if cycle.scope.get("http_version") == "1.0":
        _close_delimited(cycle)
    HeadWithBody(cycle, loop)


class HeadWithBody:
    """The transport of one request's cycle until its head is out: the response head is held
    until the body's first bytes are written in the same step of the event loop, and both go
    out in one write (one system call, one TCP segment: the client wakes once for a whole
    small answer, not twice). A head with nothing after it in that step goes out at the end of
    the step. Then the cycle gets its transport back: the rest of the response (a stream's
    chunks) is written as before."""

    __slots__ = ("_cycle", "_flush", "_head", "_loop", "transport")

    def __init__(self, cycle: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._cycle = cycle
        self._loop = loop
        self.transport: asyncio.Transport = cycle.transport
        self._head: bytes | None = None
        self._flush: asyncio.Handle | None = None
        cycle.transport = self

    def write(self, data: bytes) -> None:
        if self._flush is None:  # the first write: the head (or a 100 Continue before it)
            self._head = data
            self._flush = self._loop.call_soon(self.flush)
            return
        self._flush.cancel()
        head, self._head = self._head, None
        self._cycle.transport = self.transport
        self.transport.write(data if head is None else head + data)

    def flush(self) -> None:
        head, self._head = self._head, None
        self._cycle.transport = self.transport
        if head is not None and not self.transport.is_closing():
            self.transport.write(head)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:  # anything else the cycle may ask of a transport
        return getattr(self.transport, name)


def _close_delimited(cycle: Any) -> None:
    """An HTTP/1.0 client gets an answer of unknown length (a stream) as a body that ends when
    the connection closes, as HTTP/1.0 has it: uvicorn would send it chunked, a coding HTTP/1.0
    does not know (the client reads the chunk sizes as part of the body). uvicorn closes an
    HTTP/1.0 connection after each answer, so the body's end is the close. Set before the
    request's task first runs, so the app gets this ``send``."""
    send_chunked = cycle.send
    unknown_length = False

    async def send(message: Any) -> None:
        nonlocal unknown_length
        if message["type"] == "http.response.start" and not cycle.response_started:
            named = {bytes(name).lower() for name, _ in message.get("headers", ())}
            if not named & {b"content-length", b"transfer-encoding"}:
                unknown_length = True
                cycle.chunked_encoding = False  # uvicorn then writes the body bytes as they are
        elif message["type"] == "http.response.body" and unknown_length:
            # uvicorn counts the body against a length; this one is as long as it is.
            cycle.expected_content_length = len(message.get("body", b""))
        await send_chunked(message)

    cycle.send = send


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    *,
    graceful_timeout: float = 30.0,
    keep_alive_s: float = KEEP_ALIVE_S,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_httptools(header_timeout_s, max_header_bytes),
        timeout_keep_alive=max(1, round(keep_alive_s)),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=round(graceful_timeout),  # in-flight requests get this long
        proxy_headers=False,  # the client is the socket's peer; X-Forwarded-For is not trusted
    )


def serve_uvicorn(
    app: Any,
    host: str,
    port: int,
    *,
    graceful_timeout: float = 30.0,
    keep_alive_s: float = KEEP_ALIVE_S,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> None:
    import uvicorn

    config = uvicorn_config(
        app,
        host,
        port,
        graceful_timeout=graceful_timeout,
        keep_alive_s=keep_alive_s,
        header_timeout_s=header_timeout_s,
        max_header_bytes=max_header_bytes,
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


def serve_hypercorn(
    app: Any,
    host: str,
    port: int,
    *,
    graceful_timeout: float = 30.0,
    keep_alive_s: float = KEEP_ALIVE_S,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.graceful_timeout = graceful_timeout  # in-flight requests get this long to finish
    config.keep_alive_timeout = keep_alive_s
    config.h11_max_incomplete_size = max_header_bytes  # h11 refuses a larger head itself
    # Not config.read_timeout: hypercorn applies it to every socket read, also while a long
    # stream is being sent and the client has nothing to say; so no head timeout here.
    del header_timeout_s

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
