"""The ``ray`` backend's write against a fake Serve REST API on loopback whose config another
client changes between the backend's reads: the backend must start over from the new config,
so the other client's application survives; and a cluster that never holds still is refused.
(The real cluster is in tests/test_ray_backend.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends.base import StartRequest
from imageworks.chat_proxy.engines.backends.ray import RayBackend
from imageworks.chat_proxy.errors import BackendUnavailable, ModelStartFailed
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
        self.deleting_reads = 0  # how many GETs a removed application still shows as DELETING
        self.deleting_left = 0
        self.status_after_put: dict[str, Any] = {}  # what a newly deployed application becomes
        self.headers: list[str | None] = []  # each GET's authorization header

    def deploy(self, config: dict[str, Any]) -> None:
        self.apps[config["name"]] = {"status": "RUNNING", "deployed_app_config": config}

    async def get(self, request: web.Request) -> web.Response:
        self.gets += 1
        self.headers.append(request.headers.get("authorization"))
        self.on_get(self.gets)
        if self.deleting_left:
            self.deleting_left -= 1
            if not self.deleting_left:
                self.apps = {n: a for n, a in self.apps.items() if a["status"] != "DELETING"}
        return web.json_response({"applications": self.apps, "proxy_location": "EveryNode"})

    async def put(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.puts.append(body)
        old, self.apps = self.apps, {}
        for config in body["applications"]:
            self.deploy(config)
        for name in old.keys() - self.apps.keys():  # Ray deletes an application's replicas
            if self.deleting_reads:  # in the background: it shows as DELETING a while
                self.apps[name] = {**old[name], "status": "DELETING"}
                self.deleting_left = self.deleting_reads
        if self.status_after_put:
            for name in self.apps.keys() - old.keys():
                self.apps[name] = {**self.apps[name], **self.status_after_put}
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
    assert fake.gets == 10  # five attempts, two reads each


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


async def test_a_stop_waits_until_ray_has_deleted_the_application(
    dashboard: tuple[FakeDashboard, RayBackend],
) -> None:
    fake, backend = dashboard
    fake.deploy(MINE)
    fake.deleting_reads = 3
    await backend.stop("m")
    assert fake.apps == {} and fake.deleting_left == 0


async def test_stopping_an_application_that_is_not_there_writes_nothing(
    dashboard: tuple[FakeDashboard, RayBackend],
) -> None:
    fake, backend = dashboard
    fake.deploy(THEIRS)
    await backend.stop("m")
    assert fake.puts == []


def ray_entry() -> ModelEntry:
    return ModelEntry.model_validate(
        {"name": "m", "backend": "ray", "ray": {"import_path": "m:app"}}
    )


async def test_a_failed_deployment_fails_the_start_and_is_removed(
    dashboard: tuple[FakeDashboard, RayBackend], tmp_path: Path
) -> None:
    fake, backend = dashboard
    fake.deploy(THEIRS)
    message = "Traceback (most recent call last):\nModuleNotFoundError: No module named 'm'"
    fake.status_after_put = {"status": "DEPLOY_FAILED", "message": message}
    with pytest.raises(ModelStartFailed, match=r"DEPLOY_FAILED\): ModuleNotFoundError"):
        await backend.start(StartRequest(ray_entry(), tmp_path / "m.log", 30))
    assert fake.puts[-1]["applications"] == [THEIRS] and set(fake.apps) == {"theirs"}
    assert "No module named" in (tmp_path / "m.log").read_text()


@pytest.mark.parametrize(
    ("status", "up"), [("RUNNING", True), ("DEPLOYING", True), ("DELETING", False), (None, False)]
)
async def test_reconcile_is_rays_word_on_our_application(
    dashboard: tuple[FakeDashboard, RayBackend], status: str | None, up: bool
) -> None:
    fake, backend = dashboard
    if status is not None:
        fake.deploy(MINE)
        fake.apps["imageworks-m"]["status"] = status
    assert await backend.reconcile(ray_entry()) is up


async def test_the_dashboard_is_asked_with_its_token_or_not_at_all(
    dashboard: tuple[FakeDashboard, RayBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, backend = dashboard
    backend.config = backend.config.model_copy(update={"ray_token_env": "RAY_T"})
    monkeypatch.delenv("RAY_T", raising=False)
    with pytest.raises(BackendUnavailable, match="RAY_T"):
        await backend.stop("m")
    assert fake.gets == 0
    monkeypatch.setenv("RAY_T", "tok")
    await backend.stop("m")
    assert fake.headers == ["Bearer tok"]
