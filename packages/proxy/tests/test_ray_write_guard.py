"""The ``ray`` backend's write against a fake Serve REST API on loopback whose config another
client changes between the backend's reads: the backend must start over from the new config,
so the other client's application survives; and a cluster that never holds still is refused.
(The real cluster is in tests/test_ray_backend.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from imageworks.chat_proxy.backends.ray import RayBackend
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.model_loader.schema import ModelEntry
from testkit.servers import AiohttpServer


class FakeDashboard:
    """``/api/serve/applications/``: GET answers the current apps; ``on_get`` may change them
    (another client deploying) before the answer; PUT records the body and applies it."""

    def __init__(self) -> None:
        self.apps: dict[str, dict[str, Any]] = {}
        self.puts: list[dict[str, Any]] = []
        self.gets = 0
        self.on_get: Callable[[int], None] = lambda n: None

    def deploy(self, config: dict[str, Any]) -> None:
        self.apps[config["name"]] = {"status": "RUNNING", "deployed_app_config": config}

    async def get(self, request: web.Request) -> web.Response:
        self.gets += 1
        self.on_get(self.gets)
        return web.json_response({"applications": self.apps, "proxy_location": "EveryNode"})

    async def put(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.puts.append(body)
        self.apps = {}
        for config in body["applications"]:
            self.deploy(config)
        return web.Response()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/serve/applications/", self.get)
        app.router.add_put("/api/serve/applications/", self.put)
        return app


@pytest.fixture
async def dashboard() -> AsyncIterator[tuple[FakeDashboard, RayBackend]]:
    fake = FakeDashboard()
    server = AiohttpServer(fake.app())
    backend = RayBackend(ProxyConfig.load(environ={}, ray_dashboard_url=server.url))
    async with aiohttp.ClientSession() as session:
        backend.attach(session)
        yield fake, backend
    server.stop()


THEIRS = {"name": "theirs", "route_prefix": "/t", "import_path": "t:app"}
LATE = {"name": "late", "route_prefix": "/late", "import_path": "late:app"}
MINE = {"name": "imageworks-m", "route_prefix": "/imageworks-m", "import_path": "m:app"}


async def test_a_change_between_the_reads_starts_the_write_over(
    dashboard: tuple[FakeDashboard, RayBackend],
) -> None:
    fake, backend = dashboard
    fake.deploy(THEIRS)
    # Another client deploys 'late' right after our first read.
    fake.on_get = lambda n: fake.deploy(LATE) if n == 2 else None
    await backend._write("imageworks-m", MINE)
    assert len(fake.puts) == 1
    assert [a["name"] for a in fake.puts[0]["applications"]] == ["imageworks-m", "late", "theirs"]
    assert fake.puts[0]["proxy_location"] == "EveryNode"
    assert fake.gets == 4  # read, re-read (changed), read, re-read (same), then the write


async def test_a_cluster_that_never_holds_still_is_refused(
    dashboard: tuple[FakeDashboard, RayBackend],
) -> None:
    fake, backend = dashboard

    def churn(n: int) -> None:
        fake.deploy({**THEIRS, "args": {"n": n}})

    fake.on_get = churn
    with pytest.raises(BackendUnavailable, match="kept changing"):
        await backend._write("imageworks-m", MINE)
    assert fake.puts == []


async def test_removing_ours_keeps_theirs_and_waits_until_it_is_gone(
    dashboard: tuple[FakeDashboard, RayBackend],
) -> None:
    fake, backend = dashboard
    fake.deploy(THEIRS)
    fake.deploy(MINE)
    await backend.stop("m")
    assert fake.puts[-1]["applications"] == [THEIRS]
    assert set(fake.apps) == {"theirs"}


@pytest.mark.parametrize(
    "answer",
    [
        {"applications": []},
        {"applications": {"theirs": "RUNNING"}},
        {"applications": {"theirs": {"status": "RUNNING", "deployed_app_config": "t:app"}}},
        # A config filed under another name: carrying it over would deploy 'imageworks-m' twice.
        {"applications": {"theirs": {"status": "RUNNING", "deployed_app_config": MINE}}},
        {"applications": {}, "http_options": ["0.0.0.0"]},
    ],
)
async def test_a_dashboard_answering_another_shape_is_a_clear_error_and_nothing_is_written(
    answer: dict[str, Any],
) -> None:
    puts: list[Any] = []

    async def get(request: web.Request) -> web.Response:
        return web.json_response(answer)

    async def put(request: web.Request) -> web.Response:
        puts.append(await request.json())
        return web.Response()

    app = web.Application()
    app.router.add_get("/api/serve/applications/", get)
    app.router.add_put("/api/serve/applications/", put)
    server = AiohttpServer(app)
    backend = RayBackend(ProxyConfig.load(environ={}, ray_dashboard_url=server.url))
    try:
        async with aiohttp.ClientSession() as session:
            backend.attach(session)
            for attempt in (backend._write("imageworks-m", MINE), backend.stop("m")):
                with pytest.raises(BackendUnavailable, match="did not answer Serve's status"):
                    await attempt
            entry = ModelEntry(name="m", backend="ray", ray={"import_path": "m:app"})
            assert await backend.reconcile(entry) is None  # cannot tell, rather than a crash
            assert await backend.recover([entry]) == {}
    finally:
        server.stop()
    assert puts == []
