"""The console's actions against a proxy that needs the admin token: they work with it, say
what is missing without it, and the token goes only to the configured proxy and is never shown."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from imageworks.gui.client import ProxyClient, ProxyRequestFailed
from testkit.console import everything, page, texts
from testkit.entries import GEMMA
from testkit.gpu import FakeProbe
from testkit.servers import AiohttpServer

TOKEN = "s3cret-admin-t0ken"


def test_model_actions_send_the_token_and_never_show_it(
    proxy_factory, point_console, monkeypatch
) -> None:
    proxy = proxy_factory([GEMMA], admin_token=TOKEN)
    point_console(proxy.url)
    app = page("models").run()
    assert "refused the console" in texts(app)  # no token: the page says which one is missing
    assert TOKEN not in everything(app)

    monkeypatch.setenv("CHAT_PROXY_ADMIN_TOKEN", TOKEN)
    app = page("models").run()
    app.button(key="activate-gemma").click().run()
    assert "gemma is ready" in texts(app)
    app.button(key="restart-gemma").click().run()
    assert "gemma restarted: ready" in texts(app)
    app.button(key="deactivate-gemma").click().run()
    assert "stopped gemma" in texts(app)
    assert not app.exception and TOKEN not in everything(app)
    states = proxy.client.get("/admin/state", headers={"x-admin-token": TOKEN}).json()
    assert next(m for m in states["models"] if m["name"] == "gemma")["state"] == "stopped"


def test_a_typed_token_releases_the_lease_and_is_not_shown(proxy_factory, point_console) -> None:
    proxy = proxy_factory([], probe=FakeProbe(24000), admin_token=TOKEN)
    point_console(proxy.url)
    headers = {"x-admin-token": TOKEN}
    lease = {"owner": "judge-vision", "reason": "stage 2"}
    assert proxy.client.post("/v1/gpu/lease", json=lease, headers=headers).status_code == 200
    app = page("leases").run()
    next(b for b in app.button if b.label == "Force release…").click().run()
    app.text_input(key="release_token").input(TOKEN)
    next(b for b in app.button if b.label == "Yes, release it").click().run()
    assert "judge-vision's lease released" in texts(app)
    assert TOKEN not in everything(app)


class Recorder:
    """A server that notes the headers of every request; ``redirect`` sends one path elsewhere."""

    def __init__(self, redirect: dict[str, str] | None = None) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.redirect = redirect or {}
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = AiohttpServer(app)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, {k.lower(): v for k, v in request.headers.items()}))
        if request.path in self.redirect:
            raise web.HTTPTemporaryRedirect(self.redirect[request.path])
        answer: dict[str, Any] = {"status": "ok", "state": "ready", "stopped": []}
        return web.json_response(answer)


@pytest.fixture
def elsewhere() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.server.stop()


def test_the_token_goes_to_the_configured_proxy_only(
    elsewhere: Recorder, point_console, monkeypatch
) -> None:
    target = elsewhere.server.url + "/admin/activate"
    proxy = Recorder(redirect={"/admin/activate": target, "/v1/gpu/force_release": target})
    try:
        point_console(proxy.server.url)
        monkeypatch.setenv("CHAT_PROXY_ADMIN_TOKEN", TOKEN)
        client = ProxyClient()
        for action in (lambda: client.activate("gemma"), lambda: client.force_release("x")):
            with pytest.raises(ProxyRequestFailed):
                action()  # a redirect is an answer the console does not read, not followed
        client.deactivate("gemma")
        assert elsewhere.seen == []
        assert all(headers.get("x-admin-token") == TOKEN for _, headers in proxy.seen)
        assert len(proxy.seen) == 3
    finally:
        proxy.server.stop()
