"""Any OpenAI-compatible upstream (credentials, fixed headers, its Retry-After), browsers
(CORS), and back-pressure (max_concurrency with a bounded queue, then 429)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from testkit.entries import eventually
from testkit.fake_engine import entry_for
from testkit.servers import RawServer, read_request

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def scripted(status: str, headers: str = "") -> RawServer:
    body = b'{"error": {"message": "busy", "type": "server_error", "code": null}}'

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{headers}"
                f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()

    return RawServer(answer)


@pytest.mark.parametrize("status", ["429 Too Many Requests", "503 Service Unavailable"])
def test_upstream_retry_after_passes_through_and_503_stays_503(proxy_factory, status) -> None:
    server = scripted(status, "retry-after: 7\r\n")
    try:
        proxy = proxy_factory([entry_for("m", server.url, "openai")])
        for stream in (False, True):
            answer = proxy.client.post(
                "/v1/chat/completions", json={**CHAT, "model": "m", "stream": stream}
            )
            assert answer.status_code == int(status[:3])
            assert answer.headers["retry-after"] == "7"
            assert answer.json()["error"]["message"].endswith("busy")
    finally:
        server.stop()


def test_an_upstream_500_is_still_502_without_retry_after(proxy_factory) -> None:
    server = scripted("500 Internal Server Error", "retry-after: 7\r\n")
    try:
        proxy = proxy_factory([entry_for("m", server.url, "openai")])
        answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
        assert answer.status_code == 502 and "retry-after" not in answer.headers
    finally:
        server.stop()


def test_fixed_headers_and_the_api_key_go_upstream_and_never_into_sight(
    proxy_factory, fake_vllm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMOTE_BOX_KEY", "sk-remote-999")
    entry = entry_for(
        "m",
        fake_vllm.url,
        "openai",
        backend_config={
            "base_url": fake_vllm.url + "/v1",
            "api_key_env": "REMOTE_BOX_KEY",
            "headers": {"X-Team": "imaging", "OpenAI-Organization": "org-1"},
        },
    )
    unset = entry_for(
        "n",
        fake_vllm.url,
        "openai",
        backend_config={"base_url": fake_vllm.url + "/v1", "api_key_env": "NOT_SET_ANYWHERE"},
    )
    proxy = proxy_factory([entry, unset])
    assert proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"}).status_code == 200
    seen = fake_vllm.engine.requests[-1].headers
    assert seen["authorization"] == "Bearer sk-remote-999"
    assert seen["x-team"] == "imaging" and seen["openai-organization"] == "org-1"
    missing = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "n"})
    assert missing.status_code == 502 and "NOT_SET_ANYWHERE" in missing.text
    # Our setting is wrong, not the backend: it is not reported unreachable.
    states = {
        m["id"]: m["imageworks"]["state"] for m in proxy.client.get("/v1/models").json()["data"]
    }
    assert states["n"] != "unreachable"
    shown = proxy.client.get("/admin/state").text + proxy.client.get("/v1/models").text
    assert "sk-remote-999" not in shown
    proxy.server.stop()
    assert "sk-remote-999" not in proxy.log_path.read_text()


def test_registry_headers_are_checked(tmp_path) -> None:
    from pydantic import ValidationError

    from imageworks.model_loader.schema import ModelEntry

    for headers in ({"Bad Name": "x"}, {"X-Ok": "a\r\nInjected: 1"}, {"Host": "elsewhere"}):
        with pytest.raises(ValidationError):
            ModelEntry.model_validate(
                {"name": "m", "backend": "openai", "backend_config": {"headers": headers}}
            )
    with pytest.raises(ValidationError):
        ModelEntry.model_validate(
            {"name": "m", "backend": "openai", "backend_config": {"api_key_env": "sk-literal key"}}
        )


def test_no_cors_headers_unless_configured(proxy_factory) -> None:
    proxy = proxy_factory([])
    answer = proxy.client.get("/v1/models", headers={"origin": "http://webui.lan"})
    assert "access-control-allow-origin" not in answer.headers
    preflight = proxy.client.options(
        "/v1/chat/completions",
        headers={"origin": "http://webui.lan", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_for_listed_origins_with_credentials(proxy_factory, fake_vllm) -> None:
    proxy = proxy_factory(
        [entry_for("m", fake_vllm.url)], cors_origins="http://webui.lan, http://tools.lan"
    )
    preflight = proxy.client.options(
        "/v1/chat/completions",
        headers={
            "origin": "http://webui.lan",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://webui.lan"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = proxy.client.post(
        "/v1/chat/completions",
        json={**CHAT, "model": "m"},
        headers={"origin": "http://tools.lan"},
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "http://tools.lan"
    assert "x-request-id" in answer.headers["access-control-expose-headers"]
    stranger = proxy.client.options(
        "/v1/models",
        headers={"origin": "http://evil.example", "access-control-request-method": "GET"},
    )
    assert stranger.status_code == 403  # in the error envelope, not starlette's plain text
    assert stranger.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in stranger.headers


def test_a_wildcard_origin_never_comes_with_credentials(proxy_factory) -> None:
    proxy = proxy_factory([], cors_origins="*")
    answer = proxy.client.get("/v1/healthz", headers={"origin": "http://any.lan"})
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in answer.headers


def held_backend() -> tuple[RawServer, threading.Event, list[str]]:
    """A backend that answers nothing until the test lets it."""
    go = threading.Event()
    arrived: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            arrived.append(json.loads(body)["messages"][0]["content"])
            await asyncio.to_thread(go.wait)  # the test's thread sets it
            data = b'{"object": "chat.completion", "choices": []}'
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(data), data)
            )
            await writer.drain()

    return RawServer(answer), go, arrived


def metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_beyond_max_concurrency_and_the_queue_requests_get_429(proxy_factory) -> None:
    server, go, arrived = held_backend()
    try:
        proxy = proxy_factory(
            [entry_for("m", server.url, "openai", max_concurrency=1)], max_queue=1
        )

        def ask(words: str, stream: bool = False) -> httpx.Response:
            with httpx.Client(base_url=proxy.url, timeout=30) as client:
                body: dict[str, Any] = {
                    "model": "m",
                    "stream": stream,
                    "messages": [{"role": "user", "content": words}],
                }
                return client.post("/v1/chat/completions", json=body)

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, "first")
            assert eventually(lambda: arrived == ["first"])
            second = pool.submit(ask, "second")
            depth = "chat_proxy_admission_queue_depth"
            assert eventually(lambda: metric(proxy.client.get("/metrics").text, depth, "m") == 1.0)
            for stream in (False, True):  # refused at once, before any byte of a stream
                refused = ask("third", stream)
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "rate_limited"
                assert refused.json()["error"]["type"] == "rate_limit_error"
            go.set()
            assert first.result().status_code == second.result().status_code == 200
        assert arrived == ["first", "second"]  # the queued one went next, the third never
        metrics = proxy.client.get("/metrics").text
        assert metric(metrics, "chat_proxy_admission_rejections_total", "m") == 2.0
        assert metric(metrics, depth, "m") == 0.0
        proxy.server.stop()
        records = {r["error_code"]: r for r in proxy.records()}
        assert records["err_rate_limited"]["status"] == 429
        queued = [r for r in proxy.records() if r["queue_depth"] == 1]
        assert len(queued) == 1 and queued[0]["status"] == 200 and queued[0]["queue_ms"] > 0
    finally:
        go.set()
        server.stop()


def test_a_client_that_leaves_the_queue_gives_its_place_up(proxy_factory) -> None:
    server, go, arrived = held_backend()
    try:
        proxy = proxy_factory([entry_for("m", server.url, "openai")], max_concurrency=1)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                proxy.client.post,
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "first"}]},
            )
            assert eventually(lambda: arrived == ["first"])
            with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=0.3) as impatient:
                impatient.post(
                    proxy.url + "/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "gone"}]},
                )
            depth = "chat_proxy_admission_queue_depth"
            assert eventually(lambda: metric(proxy.client.get("/metrics").text, depth, "m") == 0.0)
            go.set()
            assert first.result().status_code == 200
        later = proxy.client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "later"}]},
        )
        assert later.status_code == 200 and arrived == ["first", "later"]
    finally:
        go.set()
        server.stop()


async def test_a_waiter_cancelled_as_its_turn_is_handed_over_is_no_error() -> None:
    """release() pops a waiter whose task was cancelled in the same loop step: the waiter must
    leave quietly (it used to raise ValueError from deque.remove, a 500)."""
    import asyncio

    from imageworks.chat_proxy.observe.metrics import Metrics
    from imageworks.chat_proxy.request.admission import Admission
    from imageworks.model_loader.schema import ModelEntry

    gate = Admission(1, 8, Metrics()).gate(ModelEntry(name="m", backend="openai"))
    assert gate is not None and gate.try_enter()
    waiting = asyncio.create_task(gate.wait(30))
    await asyncio.sleep(0)
    waiting.cancel()
    gate.release()  # same step: the cancelled waiter is popped and handed the turn
    results = await asyncio.gather(waiting, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    # Nobody else waits: the turn is simply given back, and the count stays right.
    assert gate.active == 0 and not gate.waiters
    assert gate.try_enter()
