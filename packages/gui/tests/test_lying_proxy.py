"""The console against a proxy that lies, trickles or dies: a real HTTP server on 127.0.0.1
answering the proxy's paths with what the test sets. No page may show a traceback; each says
the proxy's answer was not understood, or that the proxy is down."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from imageworks.gui.client import ProxyBadAnswer, ProxyClient, ProxyDown, printable
from testkit.console import everything, page, texts
from testkit.servers import AiohttpServer

ROW = {"name": "m", "backend": "vllm", "state": "ready", "managed": True, "visible": True}
SANE: dict[str, Any] = {
    "/v1/healthz": {"status": "ok", "version": "x", "uptime_s": 1, "profile": "p", "models": 1},
    "/v1/models": {"data": [{"id": "m"}]},
    "/admin/state": {"models": [ROW], "config": {}},
    "/v1/gpu/status": {"devices": [{"index": 0, "total_mb": 24000, "used_mb": 1000}]},
    "/admin/requests": {"data": []},
    "/admin/logs": {"model": "m", "source": "engine", "exists": True, "lines": ["ok"]},
    "/admin/registry": {"version": "v", "profile": "p", "directory": "d", "entries": []},
    "/admin/autostart": {"enabled": True},
    "/admin/profile": {"name": "p", "profiles": [{"name": "p"}]},
}
ALL_PAGES = ["dashboard", "gpu", "activity", "models", "logs", "playground", "registry", "leases"]
NOT_UNDERSTOOD = "not what the console reads"


class Liar:
    """A server on the proxy's paths; ``answers[path]`` is a JSON value, or text sent as is."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = dict(SANE)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = AiohttpServer(app)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        answer = self.answers.get(request.path, {})
        if callable(answer):
            return await answer(request)  # type: ignore[no-any-return]
        text = answer if isinstance(answer, str) else json.dumps(answer)
        return web.Response(text=text, content_type="application/json")


@pytest.fixture
def liar(point_console) -> Iterator[Liar]:
    server = Liar()
    point_console(server.server.url)
    yield server
    server.server.stop()


def shows_no_traceback(name: str) -> str:
    app = page(name).run()
    assert not app.exception, (name, [e.value for e in app.exception])
    return everything(app)


LIES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "gpu index and sizes are words": (
        {"/v1/gpu/status": {"devices": [{"index": "zero", "total_mb": "lots"}]}},
        ["dashboard", "gpu", "leases"],
    ),
    "gpu summary without sizes": ({"/v1/gpu/status": {"gpu": {"name": "x"}}}, ["gpu", "leases"]),
    "gpu devices is an object": ({"/v1/gpu/status": {"devices": {"0": 1}}}, ["dashboard", "gpu"]),
    "gpu size is infinite": (
        {"/v1/gpu/status": '{"devices": [{"index": 0, "total_mb": Infinity}]}'},
        ["gpu"],
    ),
    "state without models": ({"/admin/state": {}}, ["dashboard", "models", "logs", "playground"]),
    "state fields of the wrong type": (
        {"/admin/state": {"models": [{**ROW, "restarts": [1], "load_ms": "slow"}]}},
        ["dashboard", "models", "logs", "playground"],
    ),
    "not JSON": (
        {path: "<html>a login page</html>" for path in SANE},
        ALL_PAGES,
    ),
    "JSON arrays": ({path: [1] for path in SANE}, ALL_PAGES),
    "registry entries without fields": (
        {"/admin/registry": {"entries": [{"name": "a", "origins": {"x": "y"}, "sources": [{}]}]}},
        ["registry"],
    ),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_proxy_that_lies_gets_no_traceback(liar: Liar, lie: str) -> None:
    answers, pages = LIES[lie]
    liar.answers.update(answers)
    for name in pages:
        shown = shows_no_traceback(name)
        # The registry page reads what it can of a partial answer; the others say why not.
        assert NOT_UNDERSTOOD in shown or "not a JSON object" in shown or name == "registry"


def test_state_rows_missing_fields_take_their_defaults(liar: Liar) -> None:
    liar.answers["/admin/state"] = {"models": [{}, {"name": "bare"}, 7], "config": None}
    for name in ("dashboard", "models", "playground", "settings"):
        shows_no_traceback(name)
    (row,) = ProxyClient().models()
    assert (row.name, row.backend, row.state, row.in_flight) == ("bare", "?", "unknown", 0)


def test_gpu_cards_with_zero_or_negative_sizes(liar: Liar) -> None:
    liar.answers["/v1/gpu/status"] = {
        "devices": [
            {"index": 0, "total_mb": 0, "used_mb": 0, "free_mb": 0},
            {"index": 1, "total_mb": -5, "used_mb": -3, "models": [{"name": "m", "vram_mb": -2}]},
        ]
    }
    for name in ("dashboard", "gpu", "leases"):
        shows_no_traceback(name)
    app = page("gpu").run()
    assert [m.value for m in app.metric if m.label == "Total"] == ["0 MB", "0 MB"]
    assert "-" not in "".join(str(m.value) for m in app.metric)


def test_request_records_of_the_wrong_shape(liar: Liar) -> None:
    record = {"ts": 5, "total_ms": "y", "ttft_ms": "z", "status": "abc", "error_code": "e"}
    liar.answers["/admin/requests"] = {"data": [record, {}, 5, "x"]}
    for name in ("dashboard", "activity"):
        shows_no_traceback(name)


def test_log_lines_lose_terminal_escapes(liar: Liar) -> None:
    colour = "\x1b[31mERROR\x1b[0m engine \x1b]0;title\x07died\x08\x00 at\tline"
    liar.answers["/admin/logs"] = {
        "model": "m",
        "source": "engine",
        "exists": True,
        "lines": [colour],
    }
    assert ProxyClient().engine_log("m").lines == ["ERROR engine died at\tline"]
    shown = shows_no_traceback("logs")
    assert "ERROR engine died" in shown and "\x1b" not in shown
    assert printable("plain text, ünïcode") == "plain text, ünïcode"
    failed = {**ROW, "state": "failed", "last_error": "start failed:\n\x1b[1;31mOOM\x1b[0m"}
    liar.answers["/admin/state"] = {"models": [failed]}
    (row,) = ProxyClient().models()
    assert row.last_error == "start failed:\nOOM"


def test_a_trickling_proxy_is_given_up_on(liar: Liar) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"status": "ok", "pad": "')
        for _ in range(300):  # 30 s of a byte every 0.1 s: never idle long enough to time out
            await response.write(b"x")
            await asyncio.sleep(0.1)
        await response.write(b'"}')
        return response

    liar.answers["/v1/healthz"] = trickle
    with pytest.raises(ProxyDown, match="did not answer GET /v1/healthz within"):
        ProxyClient(timeout=1).health()


def test_a_proxy_that_never_answers_leaves_the_page_usable(liar: Liar) -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    liar.answers["/v1/gpu/status"] = hang
    shown = texts(page("gpu").run())
    assert "Chat proxy unavailable" in shown and "did not answer" in shown


def test_an_oversized_answer_is_refused(liar: Liar) -> None:
    liar.answers["/admin/requests"] = json.dumps({"data": ["x" * 1000] * 20_000})
    with pytest.raises(ProxyBadAnswer, match="over"):
        ProxyClient().recent_requests()


def test_the_playground_when_the_proxy_dies_mid_stream(liar: Liar) -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"choices": [{"delta": {"content": "Hello th"}}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        assert request.transport is not None
        request.transport.abort()  # the proxy is gone, the reply half sent
        return response

    liar.answers["/v1/chat/completions"] = dies
    app = page("playground").run()
    next(b for b in app.button if b.label == "Send").click().run()
    assert not app.exception
    shown = texts(app)
    assert "Hello th" in shown and "The request failed" in shown and "broke off" in shown


def test_the_playground_with_a_stream_that_is_not_json(liar: Liar) -> None:
    liar.answers["/v1/chat/completions"] = "data: {not json\n\n"
    app = page("playground").run()
    next(b for b in app.button if b.label == "Send").click().run()
    assert not app.exception
    assert "The request failed" in texts(app) and NOT_UNDERSTOOD in texts(app)
