"""``backend: "ray"`` against a real local Ray head on the CPU: the proxy deploys a small Serve
application (``testkit.ray_app``, relaying to a fake engine) through Ray's Serve REST API, chats
through Serve's HTTP proxy, removes it, reports a failed deploy with Ray's message, and never
touches another client's application. One head serves the whole module (it takes tens of
seconds to start on a small machine); the module skips with the reason where Ray cannot run
(fails instead with ``IMAGEWORKS_REQUIRE_RAY=1``).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Engine, ProxyFactory

from testkit.docs_examples import example
from testkit.entries import eventually
from testkit.ray_cluster import RayHead, RayUnavailable

pytestmark = [pytest.mark.subprocess, pytest.mark.slow, pytest.mark.timeout(600)]

FOREIGN = "someone-else"
ENGINE_IN_DOC = "http://127.0.0.1:8080"


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    try:
        head = RayHead().start()
    except RayUnavailable as exc:
        # ray[serve] is in the dev group, so where the suite is set up it is installed: a head
        # that cannot start may be a broken setup, which a skip would hide. A run that must
        # cover Ray (IMAGEWORKS_REQUIRE_RAY=1) fails instead.
        if os.environ.get("IMAGEWORKS_REQUIRE_RAY") == "1":
            pytest.fail(f"IMAGEWORKS_REQUIRE_RAY=1 but Ray cannot run here: {exc}")
        pytest.skip(f"Ray cannot run here: {exc}")
    try:
        yield head
    finally:
        head.stop()
    assert not head.processes(), "the Ray head left processes behind"


def serve_status(head: RayHead) -> dict[str, Any]:
    with urllib.request.urlopen(head.dashboard_url + "/api/serve/applications/", timeout=10) as r:
        data: dict[str, Any] = json.loads(r.read())
        return data


def apps(head: RayHead) -> dict[str, Any]:
    return serve_status(head).get("applications") or {}


def put_config(head: RayHead, config: dict[str, Any]) -> None:
    request = urllib.request.Request(
        head.dashboard_url + "/api/serve/applications/",
        data=json.dumps(config).encode(),
        method="PUT",
        headers={"content-type": "application/json"},
    )
    # The dashboard answers a PUT once Serve's controller has taken the config, which on a
    # loaded 2-core machine was seen to take over 30 s (the first PUT also starts Serve).
    with urllib.request.urlopen(request, timeout=120):
        pass


@pytest.fixture(scope="module")
def foreign_app(ray_head: RayHead) -> Iterator[dict[str, Any]]:
    """Another client's application, deployed before the proxy touches the cluster, relaying to
    an engine of its own."""
    from testkit.fake_engine import FakeEngine
    from testkit.servers import AiohttpServer

    server = AiohttpServer(FakeEngine("llamacpp").app())
    config = {
        "name": FOREIGN,
        "route_prefix": "/someone-else",
        "import_path": "testkit.ray_app:build",
        "args": {"engine_url": server.url},
    }
    put_config(
        ray_head,
        {
            "http_options": {"host": "127.0.0.1", "port": ray_head.serve_port},
            "applications": [config],
        },
    )
    assert eventually(lambda: apps(ray_head)[FOREIGN]["status"] == "RUNNING", 240)
    yield {"app": config, "replicas": replicas(apps(ray_head)[FOREIGN])}
    server.stop()


def ray_entry(name: str, import_path: str, engine_url: str) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "ray",
        "capabilities": {"text": True},
        "ray": {"import_path": import_path, "args": {"engine_url": engine_url}},
    }


def replicas(details: dict[str, Any]) -> set[str]:
    return {
        replica["replica_id"]
        for deployment in details["deployments"].values()
        for replica in deployment["replicas"]
    }


def untouched(head: RayHead, config: dict[str, Any]) -> bool:
    """The other client's application has the config it deployed and the same replicas (a
    write that carries it over unchanged must not restart it)."""
    details = apps(head).get(FOREIGN)
    return (
        details is not None
        and details["deployed_app_config"] == config["app"]
        and replicas(details) == config["replicas"]
    )


def test_a_ray_model_is_deployed_served_and_removed(
    ray_head: RayHead,
    foreign_app: dict[str, Any],
    proxy_factory: ProxyFactory,
    fake_vllm: Engine,
) -> None:
    # docs/scaling.md's example, with the engine it relays to replaced by this test's.
    entry = json.loads(example("scaling.md", "ray-app").replace(ENGINE_IN_DOC, fake_vllm.url))
    assert entry["name"] == "on-ray"
    proxy = proxy_factory(
        [entry],
        ray_dashboard_url=ray_head.dashboard_url,
        ray_serve_url=ray_head.serve_url,
        start_timeout_s=300,
    )
    body = {"model": "on-ray", "messages": [{"role": "user", "content": "hi"}]}

    # The first request deploys the application (autostart) and is answered through Serve.
    answer = proxy.client.post("/v1/chat/completions", json=body, timeout=320)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from vllm!"
    mine = apps(ray_head)["imageworks-on-ray"]
    assert mine["status"] == "RUNNING"
    assert mine["route_prefix"] == "/imageworks-on-ray"
    assert fake_vllm.engine.requests[-1].path == "/v1/chat/completions"
    assert untouched(ray_head, foreign_app)

    with proxy.client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}
    ) as stream:
        assert stream.status_code == 200
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    text = "".join(
        (json.loads(e[6:])["choices"][0]["delta"].get("content") or "") for e in events[:-1]
    )
    assert text == "Hello from vllm!"

    rows = proxy.client.get("/admin/state").json()["models"]
    row = next(m for m in rows if m["name"] == "on-ray")
    assert row["state"] == "ready"
    assert row["location"]["kind"] == "ray"
    assert row["location"]["application"] == "imageworks-on-ray"
    gpu = proxy.client.get("/v1/gpu/status").json()
    assert [m["name"] for m in gpu["not_budgeted"]] == ["on-ray"]

    # A proxy started over the same cluster (a restart) adopts the running application as it
    # is: ready at once, no new deployment.
    deployed_at = apps(ray_head)["imageworks-on-ray"]["last_deployed_time_s"]
    again = proxy_factory(
        [entry], ray_dashboard_url=ray_head.dashboard_url, ray_serve_url=ray_head.serve_url
    )
    rows = again.client.get("/admin/state").json()["models"]
    assert next(m for m in rows if m["name"] == "on-ray")["state"] == "ready"
    assert again.client.post("/v1/chat/completions", json=body).status_code == 200
    assert apps(ray_head)["imageworks-on-ray"]["last_deployed_time_s"] == deployed_at

    stopped = proxy.client.post("/admin/deactivate", json={"model": "on-ray"}, timeout=120)
    assert stopped.json() == {"stopped": ["on-ray"]}
    assert "imageworks-on-ray" not in apps(ray_head)
    assert untouched(ray_head, foreign_app)
    # The foreign application still answers on its own route.
    direct = httpx.post(ray_head.serve_url + "/someone-else/v1/chat/completions", json=body)
    assert direct.json()["choices"][0]["message"]["content"] == "Hello from llamacpp!"


def test_a_failed_deploy_is_model_start_failed_with_rays_message(
    ray_head: RayHead, foreign_app: dict[str, Any], proxy_factory: ProxyFactory
) -> None:
    entry = ray_entry("broken", "testkit.no_such_module:build", "http://127.0.0.1:9")
    proxy = proxy_factory(
        [entry],
        ray_dashboard_url=ray_head.dashboard_url,
        ray_serve_url=ray_head.serve_url,
        start_timeout_s=300,
    )
    answer = proxy.client.post("/admin/activate", json={"model": "broken"}, timeout=320)
    assert answer.status_code == 502, answer.text
    error = answer.json()["error"]
    assert error["code"] == "model_start_failed"
    assert "No module named 'testkit.no_such_module'" in error["message"]
    assert "DEPLOY_FAILED" in error["message"]
    # Ray would retry it forever: the failed application is removed, the other one kept.
    assert "imageworks-broken" not in apps(ray_head)
    assert untouched(ray_head, foreign_app)
    state = proxy.client.get("/admin/state").json()
    row = next(m for m in state["models"] if m["name"] == "broken")
    assert row["state"] == "failed"
    assert "No module named" in row["last_error"]


def test_an_unreachable_dashboard_is_backend_unavailable(proxy_factory: ProxyFactory) -> None:
    from testkit.servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    entry = ray_entry("nowhere", "testkit.ray_app:build", "http://127.0.0.1:9")
    proxy = proxy_factory([entry], ray_dashboard_url=dead, ray_serve_url=dead)
    answer = proxy.client.post("/admin/activate", json={"model": "nowhere"})
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "backend_unavailable"
    assert "CHAT_PROXY_RAY_DASHBOARD_URL" in answer.json()["error"]["message"]
