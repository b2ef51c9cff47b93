"""The forwarding client against raw HTTP/1.1 servers on 127.0.0.1 that misbehave on purpose:
idle connections the server drops, malformed heads, bodies that stall, servers that refuse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from imageworks.chat_proxy.upstream import UpstreamError, UpstreamPool
from testkit.servers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


Serve = Callable[..., Awaitable[tuple[asyncio.Server, str]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start raw servers; at the end, end their handlers and close every connection (a
    handler left sleeping would leak its socket)."""
    servers: list[asyncio.Server] = []
    handlers: list[tuple[asyncio.Task[None], asyncio.StreamWriter]] = []

    async def start(handler: Handler, host: str = "127.0.0.1") -> tuple[asyncio.Server, str]:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.append((task, writer))
            await handler(reader, writer)

        server = await asyncio.start_server(tracked, host, 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return server, f"http://{authority}/v1/chat/completions"

    yield start
    for task, writer in handlers:
        task.cancel()
        writer.close()
    await asyncio.gather(*(task for task, _ in handlers), return_exceptions=True)
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    upstream = UpstreamPool(connect_timeout=2, read_timeout=0.4)
    yield upstream
    await upstream.close()


async def test_reuses_a_kept_alive_connection_and_resends_once_if_it_died_unanswered(
    pool: UpstreamPool, serve: Serve
) -> None:
    connections = 0

    async def answer_then_drop_the_next(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
        if connections == 1:
            # A connection that dies with no answer to a request on a reused connection (a
            # backend that timed the idle connection out as the request was sent).
            await read_request(reader)
        writer.close()

    server, url = await serve(answer_then_drop_the_next)
    for _ in range(4):
        response = await pool.post(url, b"{}", {"content-type": "application/json"})
        assert response.status == 200 and await response.read() == b"{}"
    assert connections == 2  # 1 and 2 shared the first; 3 was resent on the second, as was 4
    server.close()


async def test_a_body_delimited_by_the_connection_closing_is_read_to_its_end(
    pool: UpstreamPool, serve: Serve
) -> None:
    async def old_style(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"data: [DONE]\n\n")
        writer.close()

    server, url = await serve(old_style)
    response = await pool.post(url, b"{}", {})
    assert [c async for c in response.chunks()] == [b"data: 1\n\n", b"data: [DONE]\n\n"]
    server.close()


@pytest.mark.parametrize(
    ("url", "address", "line"),
    [
        ("http://[::1]:8000/v1/x", ("::1", 8000), "POST /v1/x HTTP/1.1\r\nHost: [::1]:8000\r\n"),
        (
            "http://[fe80::1]/v1/x?a=1",
            ("fe80::1", 80),
            "POST /v1/x?a=1 HTTP/1.1\r\nHost: [fe80::1]:80\r\n",
        ),
        ("http://127.0.0.1:9/v1", ("127.0.0.1", 9), "POST /v1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"),
        (
            "http://gpu-box:24001/v1/chat",
            ("gpu-box", 24001),
            "POST /v1/chat HTTP/1.1\r\nHost: gpu-box:24001\r\n",
        ),
    ],
)
def test_the_request_line_and_host_header_of_every_address_form(
    url: str, address: tuple[str, int], line: str
) -> None:
    # No socket: this runs where IPv6 loopback cannot bind, too.
    pool = UpstreamPool(connect_timeout=1, read_timeout=1)
    assert pool._target(url) == (address, line)


async def test_the_host_header_names_an_ipv6_backend_in_brackets(
    pool: UpstreamPool, serve: Serve
) -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)
        await writer.drain()

    try:
        server, _ = await serve(record, "::1")
    except OSError:  # the formatting is tested without a socket above
        pytest.skip("no IPv6 loopback on this machine")
    port = server.sockets[0].getsockname()[1]
    response = await pool.post(f"http://[::1]:{port}/v1/embeddings", b"{}", {})
    assert await response.read() == b"{}"
    assert f"Host: [::1]:{port}\r\n".encode() in seen[0]
    assert seen[0].startswith(b"POST /v1/embeddings HTTP/1.1\r\n")
    server.close()


async def test_a_malformed_head_is_an_upstream_error(pool: UpstreamPool, serve: Serve) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP READY\r\n\r\n")
        await writer.drain()

    server, url = await serve(garbage)
    with pytest.raises(UpstreamError, match="malformed"):
        await pool.post(url, b"{}", {})
    server.close()


async def test_a_body_that_stalls_times_out_and_a_refused_connect_says_so(
    pool: UpstreamPool, serve: Serve
) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    server, url = await serve(stall)
    response = await pool.post(url, b"{}", {})
    chunks = response.chunks()
    assert await anext(chunks) == b"hello"
    with pytest.raises(TimeoutError):  # read_timeout=0.4 s with nothing more
        await anext(chunks)
    response.close()
    server.close()
    with pytest.raises(UpstreamError, match="cannot connect") as refused:
        await pool.post(f"http://127.0.0.1:{free_port()}/v1/x", b"{}", {})
    assert refused.value.connecting
