"""Forwarding through aiohttp's client, against raw HTTP/1.1 backends on 127.0.0.1 that
misbehave on purpose: interim 1xx heads, JSON where a stream was asked for, TLS with a private
CA, malformed heads, bodies that stall or end with the connection."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import trustme

from testkit.fake_engine import entry_for, sse_events
from testkit.servers import RawHandler, RawServer, read_request

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def completion(text: str) -> bytes:
    body = json.dumps(
        {"object": "chat.completion", "choices": [{"message": {"content": text}}]}
    ).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def said(body: bytes) -> str:
    """The user's words in a forwarded chat request."""
    content: str = json.loads(body)["messages"][-1]["content"]
    return content


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(handler: RawHandler, ssl: ssl.SSLContext | None = None) -> RawServer:
        servers.append(RawServer(handler, ssl))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_an_early_hints_head_is_not_taken_for_the_answer(proxy_factory, raw_server) -> None:
    """103 Early Hints, then the real answer, on kept-alive connections shared in turn by two
    clients: each client gets its own completion (a client that took the 103 as the answer
    left the real one to be read as the next client's)."""

    async def hints_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(completion(f"answer to {said(body)}"))
            await writer.drain()

    server = raw_server(hints_first)
    proxy = proxy_factory([entry_for("m", server.url, "openai")])

    def ask(words: str) -> tuple[int, str]:
        answer = proxy.client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": words}]},
        )
        return answer.status_code, answer.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(2) as pool:
        for round_ in range(5):
            first = pool.submit(ask, f"alice {round_}")
            second = pool.submit(ask, f"bob {round_}")
            assert first.result() == (200, f"answer to alice {round_}")
            assert second.result() == (200, f"answer to bob {round_}")
    assert ask("carol") == (200, "answer to carol")


def test_json_for_a_stream_leaves_the_connection_sound_for_the_next_stream(
    proxy_factory, raw_server
) -> None:
    """A backend that answers a stream request with plain JSON, then a real stream on the same
    kept-alive connection while another client asks again: every stream gets every event."""

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            if json.loads(body)["model"] == "json":
                writer.write(completion("not a stream"))
                await writer.drain()
                continue
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for index in range(5):
                writer.write(chunk(b'data: {"n": %d}\n\n' % index))
                await writer.drain()
                await asyncio.sleep(0.005)
            writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()

    server = raw_server(backend)
    proxy = proxy_factory(
        [entry_for("j", server.url, "openai", "json"), entry_for("s", server.url, "openai")]
    )

    def ask(model: str) -> httpx.Response:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            return client.post(
                "/v1/chat/completions", json={**CHAT, "model": model, "stream": True}
            )

    with ThreadPoolExecutor(3) as pool:
        for _ in range(6):
            plain = pool.submit(ask, "j")
            streams = [pool.submit(ask, "s") for _ in range(2)]
            assert plain.result().json()["choices"][0]["message"]["content"] == "not a stream"
            for stream in streams:
                events = sse_events(stream.result().text)
                assert events == [json.dumps({"n": n}) for n in range(5)] + ["[DONE]"]


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, ssl.SSLContext]:
    ca = trustme.CA()
    pem = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return ca, pem, context


async def _tls_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head, body = await read_request(reader)
        auth = next(
            (
                line.split(b":", 1)[1].strip().decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"authorization:")
            ),
            "none",
        )
        writer.write(completion(f"over TLS: {said(body)} ({auth})"))
        await writer.drain()


def test_an_https_backend_is_spoken_to_over_verified_tls(
    proxy_factory, raw_server, private_ca, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, pem, context = private_ca
    server = raw_server(_tls_backend, ssl=context)
    assert server.url.startswith("https://")
    monkeypatch.setenv("TEST_BACKEND_KEY", "sk-test-123")
    trusted = entry_for(
        "trusted",
        server.url,
        "openai",
        backend_config={
            "base_url": server.url + "/v1",
            "ca_file": str(pem),
            "api_key_env": "TEST_BACKEND_KEY",
        },
    )
    unknown_ca = entry_for("unknown-ca", server.url, "openai")
    proxy = proxy_factory([trusted, unknown_ca])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "trusted"})
    assert answer.status_code == 200
    content = answer.json()["choices"][0]["message"]["content"]
    assert content == "over TLS: hi (Bearer sk-test-123)"
    # Not trusted: refused before any prompt is sent, never downgraded to cleartext.
    refused = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "unknown-ca"})
    assert refused.status_code == 502
    assert refused.json()["error"]["code"] == "backend_unavailable"
    assert "TLS" in refused.json()["error"]["message"]
    proxy.server.stop()
    assert "sk-test-123" not in proxy.log_path.read_text()


def test_ssl_cert_file_is_the_default_trust_store(
    proxy_factory, raw_server, private_ca, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, pem, context = private_ca
    server = raw_server(_tls_backend, ssl=context)
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    proxy = proxy_factory([entry_for("m", server.url, "openai")])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "over TLS: hi (none)"


def test_a_malformed_head_is_502(proxy_factory, raw_server) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP READY\r\n\r\n")
        await writer.drain()

    server = raw_server(garbage)
    proxy = proxy_factory([entry_for("m", server.url, "openai")])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "backend_unavailable"


def test_a_stalled_body_times_out_in_band_and_a_closing_one_is_read_to_its_end(
    proxy_factory, raw_server
) -> None:
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        if json.loads(body)["model"] == "stall":
            writer.write(b"transfer-encoding: chunked\r\n\r\n" + chunk(b"data: {}\n\n"))
            await writer.drain()
            await asyncio.sleep(5)
            return
        # No length, not chunked: the body ends when the connection does (HTTP/1.0 style).
        writer.write(b"\r\ndata: 1\n\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()

    server = raw_server(backend)
    proxy = proxy_factory(
        [entry_for("stall", server.url, "openai"), entry_for("old", server.url, "openai")],
        read_timeout_s=0.5,
    )
    stalled = proxy.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "stall", "stream": True}
    )
    events = sse_events(stalled.text)
    assert events[0] == "{}" and events[-1] == "[DONE]"
    assert json.loads(events[1])["error"]["code"] == "backend_timeout"
    old = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "old", "stream": True})
    assert sse_events(old.text) == ["1", "[DONE]"]


def test_the_backend_is_not_invited_to_compress(proxy_factory, fake_vllm) -> None:
    # Bodies are relayed as they come, undecoded: a compressed one would reach the client
    # without its Content-Encoding.
    proxy = proxy_factory([entry_for("m", fake_vllm.url, "openai")])
    for stream in (False, True):
        proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m", "stream": stream})
        assert "accept-encoding" not in fake_vllm.engine.requests[-1].headers


def test_a_kept_alive_connection_the_backend_dropped_is_retried_once(
    proxy_factory, raw_server
) -> None:
    """llama.cpp's server drops a kept-alive connection after a few requests without saying
    so: the next request written on it gets no answer. It is sent once more, on a new
    connection, instead of becoming a 502."""
    connections: list[int] = []

    async def one_answer_then_drop(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connections.append(len(connections))
        _, body = await read_request(reader)
        writer.write(completion(f"answer to {said(body)}"))
        await writer.drain()
        await read_request(reader)  # the second request on this connection: read, then drop
        writer.transport.abort()

    server = raw_server(one_answer_then_drop)
    proxy = proxy_factory([entry_for("m", server.url, "openai")])
    for words in ("one", "two", "three"):
        answer = proxy.client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": words}]},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == f"answer to {words}"
    assert len(connections) == 3  # each dropped connection was replaced once
