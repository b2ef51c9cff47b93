"""Bounded under hostile input (issue 24, findings 6 and 8): a total for the bodies in flight,
a limit on request heads, a total deadline for a body, and caps on what a backend answers."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from imageworks.chat_proxy.config import BODY_COST
from testkit.entries import eventually
from testkit.fake_engine import entry_for
from testkit.servers import AiohttpServer

MB = 1024 * 1024
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data and data.rstrip().endswith(b"}}"):
            break
    return data


def test_a_32_mb_request_header_is_431(proxy_factory) -> None:
    proxy = proxy_factory([])
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: ")
        sent = 0
        while sent < 32 * MB and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"a" * (64 * 1024))
            except OSError:
                break
            sent += 64 * 1024
        answer = sock.recv(65536)
    assert sent < 32 * MB  # answered (and closed) before the header was all sent
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"request_header_fields_too_large"' in answer
    assert proxy.client.get("/v1/healthz").status_code == 200


def test_a_later_request_head_too_large_is_431_too(proxy_factory) -> None:
    # The second head on a kept-alive connection began in a read that the count skipped (no
    # head was being read when it came): one read holding a whole 150 KB head was served.
    proxy = proxy_factory([])
    models = b"GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=10) as sock:
        sock.sendall(models + b"\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 "), head
        sock.sendall(models + b"x-big: " + b"a" * 150_000 + b"\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert proxy.client.get("/v1/healthz").status_code == 200


def test_a_big_body_before_a_pipelined_head_is_not_counted_as_head(proxy_factory) -> None:
    # One read: a request with a 100 KB body, then the start of the next request's head. The
    # whole read was counted against the head begun in it, and the first request got a 431.
    proxy = proxy_factory([])
    body = b'{"model": "m", "messages": [{"role": "user", "content": "%s"}]}' % (b"a" * 100_000)
    first = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=10) as sock:
        sock.sendall(first + body + b"GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]  # no model "m": not a 431


def test_bodies_in_flight_are_held_within_their_budget(proxy_factory) -> None:
    # 20 clients each send 29 MB of a 30 MB body and stall: each costs three times its
    # declared size from its first bytes, so three fit in the 300 MB budget, and the other 17
    # are refused at once (503, Retry-After) on their Content-Length, before a byte is read.
    proxy = proxy_factory([], max_body_bytes=31 * MB, body_budget_bytes=300 * MB)
    budget = proxy.server.app.bodies
    socks, refused = [], []
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % (30 * MB)
    )
    most = b"{" + b" " * (29 * MB - 1)
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", proxy.server.port), timeout=10)
            socks.append(sock)
            sock.sendall(head)
            sock.settimeout(0.5)
            try:
                refused.append(_answer(sock))
                continue
            except TimeoutError:
                pass  # being read: within the budget
            sock.settimeout(10)
            sock.sendall(most)
            read = (len(socks) - len(refused)) * BODY_COST * 30 * MB
            assert eventually(lambda read=read: budget.used == read, 10), budget.used
        assert len(refused) == 17, [a[:80] for a in refused]
        for answer in refused:
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
            assert b"retry-after: 1" in answer.lower() and b'"server_busy"' in answer
        assert budget.used == 3 * BODY_COST * 30 * MB <= budget.total
    finally:
        for sock in socks:
            sock.close()
    assert eventually(lambda: budget.used == 0, 10)  # nothing kept once the clients left


def test_connections_that_declare_big_bodies_and_send_none_hold_no_budget(
    proxy_factory, fake_vllm
) -> None:
    """The Content-Length was taken up front: three connections declaring 28 MiB each and
    sending nothing held 252 of the default 256 MiB, and every body over 1.3 MB got 503."""
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    budget = proxy.server.app.bodies
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % (28 * MB)
    )
    socks = [socket.create_connection(("127.0.0.1", proxy.server.port)) for _ in range(8)]
    try:
        for sock in socks:
            sock.sendall(head)
        time.sleep(0.5)  # every head read, every body awaited
        assert budget.used == 0
        two_mb = {**CHAT, "model": "m", "messages": [{"role": "user", "content": "x" * 2 * MB}]}
        answer = proxy.client.post("/v1/chat/completions", json=two_mb)
        assert answer.status_code == 200, answer.text
    finally:
        for sock in socks:
            sock.close()


def test_a_trickled_body_meets_the_total_deadline(proxy_factory) -> None:
    proxy = proxy_factory([], body_timeout_s=2, body_deadline_s=1)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
        )
        sock.settimeout(0.3)
        answer = b""
        while not answer and time.monotonic() - started < 8:
            sock.sendall(b" ")  # one byte every 0.3 s: never idle for the 2 s idle limit
            try:
                answer = _answer(sock)
            except TimeoutError:
                continue
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"CHAT_PROXY_BODY_DEADLINE_S" in answer
    assert time.monotonic() - started < 4


class Liar:
    """A backend that answers too much: a huge error page, or a huge answer."""

    def __init__(self) -> None:
        self.status = 500
        self.size = 300 * MB
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.server = AiohttpServer(app)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=self.status)
        response.content_type = "application/json"
        await response.prepare(request)
        block = b" " * MB
        try:
            for _ in range(self.size // MB):
                await response.write(block)
        except (ConnectionError, RuntimeError):
            pass
        return response


@pytest.fixture
def liar() -> Iterator[Liar]:
    served = Liar()
    yield served
    served.server.stop()


def test_a_backends_huge_error_body_and_answer_are_capped(proxy_factory, liar: Liar) -> None:
    proxy = proxy_factory(
        [entry_for("m", liar.server.url, backend="openai")], max_answer_bytes=2 * MB
    )
    started = time.monotonic()
    error = proxy.client.post("/v1/chat/completions", json=CHAT)
    assert error.status_code == 502, error.text
    assert error.json()["error"]["code"] == "backend_unavailable"
    liar.status, liar.size = 200, 100 * MB
    answer = proxy.client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 502, answer.text
    assert "more than 2097152 bytes" in answer.json()["error"]["message"]
    assert "CHAT_PROXY_MAX_ANSWER_BYTES" in answer.json()["error"]["message"]
    assert time.monotonic() - started < 10  # neither 300 MB nor 100 MB was read
