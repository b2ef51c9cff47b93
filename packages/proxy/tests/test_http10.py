"""An HTTP/1.0 client never gets a chunked answer (issue 24, finding 8): HTTP/1.0 has no
chunked transfer coding, so such a client would read the chunk sizes as part of the body. A
stream goes to it as a body that ends when the connection closes, under uvicorn (the default)
and hypercorn alike."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from testkit.fake_engine import entry_for
from testkit.processes import start_proxy


def raw_exchange(url: str, request: bytes, timeout: float = 20) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


def http10_stream_request(url: str, stream: bool = True) -> bytes:
    body = json.dumps(
        {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    host = url.removeprefix("http://")
    return (
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: " + host.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def check_unchunked(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *headers = head.decode("latin-1").split("\r\n")
    assert status.split()[1] == "200", answer[:500]
    names = {h.split(":", 1)[0].strip().lower(): h.split(":", 1)[1].strip() for h in headers}
    assert "chunked" not in names.get("transfer-encoding", "").lower(), head
    # The body is the SSE events themselves, no chunk sizes between them, to [DONE].
    events = [line for line in body.split(b"\n") if line]
    assert events and all(e.startswith((b"data: ", b":")) for e in events), body[:300]
    assert events[-1] == b"data: [DONE]"


def test_an_http10_client_gets_a_stream_without_chunks_under_uvicorn(
    proxy_factory, fake_vllm
) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url)])
    check_unchunked(raw_exchange(proxy.url, http10_stream_request(proxy.url)))
    # An answer of known length keeps its Content-Length; the record says the stream was 200.
    head, _, body = raw_exchange(proxy.url, http10_stream_request(proxy.url, False)).partition(
        b"\r\n\r\n"
    )
    assert b" 200 " in head.split(b"\r\n")[0] and b"content-length" in head.lower()
    assert json.loads(body)["object"] == "chat.completion"
    assert [r["status"] for r in proxy.records()] == [200, 200]


@pytest.mark.subprocess
def test_an_http10_client_gets_a_stream_without_chunks_under_hypercorn(
    tmp_path: Path, fake_vllm
) -> None:
    process, url = start_proxy(
        tmp_path, [entry_for("m", fake_vllm.url)], CHAT_PROXY_SERVER="hypercorn"
    )
    try:
        check_unchunked(raw_exchange(url, http10_stream_request(url)))
    finally:
        process.terminate()
        process.communicate(timeout=30)
