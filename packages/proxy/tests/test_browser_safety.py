"""A web page in the operator's browser cannot drive the admin API (issue 24, findings 1 and 2):
the requests a page can make without a preflight (text/plain, a foreign Origin) and through DNS
rebinding (a foreign Host) are refused on every admin and lease route of the proxy and of the
executor, CORS never reaches admin paths, and every refusal is the error envelope."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from imageworks.vllm_executor.app import create_app as create_executor
from imageworks.vllm_executor.config import ExecutorConfig

REPO = Path(__file__).resolve().parents[3]
EVIL = "http://evil.example"
PAGE = {"content-type": "text/plain", "origin": EVIL}  # a "simple" request: no preflight

# Every admin and lease route, with a body a page would send to change something.
PROXY_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/admin/state", None),
    ("GET", "/admin/requests", None),
    ("GET", "/admin/registry", None),
    ("GET", "/admin/logs?model=m", None),
    ("GET", "/admin/profile", None),
    ("PUT", "/admin/profile", {"name": "testing"}),
    ("GET", "/admin/autostart", None),
    ("PUT", "/admin/autostart", {"enabled": False}),
    ("POST", "/admin/registry/reload", {}),
    ("POST", "/admin/activate", {"model": "m"}),
    ("POST", "/admin/deactivate", {}),
    ("GET", "/v1/gpu/status", None),
    ("POST", "/v1/gpu/lease", {"owner": "page", "ttl_s": 3600}),
    ("POST", "/v1/gpu/renew", {"token": "t"}),
    ("POST", "/v1/gpu/release", {"token": "t"}),
    ("POST", "/v1/gpu/force_release", {}),
]


def envelope(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _as_text(body: Any) -> bytes | None:
    import json

    return None if body is None else json.dumps(body).encode()


def test_page_style_requests_are_refused_on_every_admin_and_lease_route(proxy_factory) -> None:
    proxy = proxy_factory([])
    for method, path, body in PROXY_ROUTES:
        page = proxy.client.request(method, path, content=_as_text(body), headers=PAGE)
        assert page.status_code == 403, (method, path, page.text)
        assert envelope(page)["code"] == "origin_not_allowed"
        rebound = proxy.client.request(
            method, path, content=_as_text(body), headers={"host": "rebind.evil.example:8100"}
        )
        assert rebound.status_code == 403, (method, path, rebound.text)
        assert envelope(rebound)["code"] == "host_not_allowed"
        if body is not None:  # text/plain without an Origin (no browser): still not JSON
            plain = proxy.client.request(
                method, path, content=_as_text(body), headers={"content-type": "text/plain"}
            )
            assert plain.status_code == 415, (method, path, plain.text)
            assert envelope(plain)["code"] == "unsupported_media_type"
    # Nothing changed: autostart on, no lease, and the console's own calls (JSON, no Origin,
    # Host 127.0.0.1:port) still work.
    assert proxy.client.get("/admin/autostart").json() == {"enabled": True}
    assert proxy.client.get("/v1/gpu/status").json()["leases"] == []
    assert proxy.client.put("/admin/autostart", json={"enabled": False}).status_code == 200
    own = {"origin": proxy.url}  # the proxy's own origin is no foreign page
    assert proxy.client.put("/admin/autostart", json={"enabled": True}, headers=own).is_success


def test_a_refused_host_or_origin_has_a_request_id_and_a_record(proxy_factory) -> None:
    """Refused before any route runs, and still traceable: the answer has an x-request-id (the
    client's own when it sent a sane one) and the JSONL log a record of the refusal."""
    proxy = proxy_factory([], admin_token="s3cret-admin-token")
    rebound = proxy.client.get(
        "/admin/requests", headers={"host": "rebind.evil.example", "x-request-id": "trace-1"}
    )
    assert rebound.status_code == 403 and rebound.headers["x-request-id"] == "trace-1"
    page = proxy.client.post(
        "/v1/gpu/lease",
        content=b"{}",
        headers={**PAGE, "authorization": "Bearer s3cret-admin-token"},
    )
    assert page.status_code == 403 and page.headers.get("x-request-id")
    assert len(page.headers.get_list("x-request-id")) == 1
    records = {r["request_id"]: r for r in proxy.records()}
    assert records["trace-1"]["status"] == 403
    assert records["trace-1"]["error_code"] == "err_host_not_allowed"
    assert records["trace-1"]["endpoint"] == "/admin/requests"
    lease = records[page.headers["x-request-id"]]
    assert lease["error_code"] == "err_origin_not_allowed" and lease["endpoint"] == "/v1/gpu/lease"
    assert "s3cret-admin-token" not in proxy.log_path.read_text()
    # An answered request still has exactly one id.
    assert len(proxy.client.get("/v1/models").headers.get_list("x-request-id")) == 1


def test_host_names_a_setting_adds_are_accepted(proxy_factory) -> None:
    proxy = proxy_factory([], allowed_hosts="imageworks-chat-proxy, Box.LAN")
    for host in ("imageworks-chat-proxy:8100", "box.lan", "localhost:1", "[::1]:8100", "10.0.0.5"):
        answer = proxy.client.get("/v1/healthz", headers={"host": host})
        assert answer.status_code == 200, (host, answer.text)
    assert proxy.client.get("/v1/healthz", headers={"host": "other.lan"}).status_code == 403


@pytest.mark.parametrize("origins", ["*", "http://webui.lan:3000"])
def test_cors_never_applies_to_admin_or_lease_paths(proxy_factory, origins: str) -> None:
    proxy = proxy_factory([], cors_origins=origins)
    allowed = "http://webui.lan:3000"
    preflight = {"origin": allowed, "access-control-request-method": "POST"}
    for path in ("/admin/state", "/admin/deactivate", "/v1/gpu/lease", "/v1/gpu/force_release"):
        answer = proxy.client.options(path, headers=preflight)
        assert answer.status_code == 403, (path, answer.text)
        assert "access-control-allow-origin" not in answer.headers
        assert envelope(answer)["code"] == "origin_not_allowed"
        read = proxy.client.get("/admin/state", headers={"origin": allowed})
        assert read.status_code == 403 and "access-control-allow-origin" not in read.headers
    api = proxy.client.options("/v1/chat/completions", headers=preflight)
    assert api.status_code == 200 and api.headers["access-control-allow-origin"] in ("*", allowed)
    assert "PUT" not in api.headers["access-control-allow-methods"]


def test_a_cors_refusal_is_the_error_envelope(proxy_factory) -> None:
    proxy = proxy_factory([], cors_origins="http://webui.lan:3000")
    answer = proxy.client.options(
        "/v1/chat/completions",
        headers={"origin": EVIL, "access-control-request-method": "POST"},
    )
    assert answer.status_code == 403 and envelope(answer)["code"] == "origin_not_allowed"
    # And without CORS at all, a page's POST to the API is refused before it runs.
    bare = proxy_factory([])
    page = bare.client.post("/v1/chat/completions", content=b'{"model": "m"}', headers=PAGE)
    assert page.status_code == 403 and envelope(page)["code"] == "origin_not_allowed"


def test_refusals_and_internal_errors_on_the_messages_routes_use_anthropics_envelope(
    proxy_factory, monkeypatch
) -> None:
    # Every error on /v1/messages is Anthropic's shape, the guard's and an unexpected 500's too.
    from imageworks.chat_proxy.routes import relay

    proxy = proxy_factory([])
    body = b'{"model": "m", "max_tokens": 5, "messages": []}'
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        page = proxy.client.post(path, content=body, headers=PAGE)
        rebound = proxy.client.post(path, content=body, headers={"host": "rebind.evil.example"})
        for answer in (page, rebound):
            assert answer.status_code == 403, answer.text
            assert answer.json()["type"] == "error", answer.text
            assert answer.json()["error"]["type"] == "permission_error"

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(relay, "forward", broken)
    crash = proxy.client.post("/v1/messages", content=body)
    assert crash.status_code == 500 and crash.json()["type"] == "error", crash.text
    assert crash.json()["error"]["type"] == "api_error"
    chat = proxy.client.post("/v1/chat/completions", content=b'{"model": "m"}')
    assert chat.status_code == 500 and envelope(chat)["code"] == "internal_error"


async def test_the_executor_refuses_page_style_requests(tmp_path: Path) -> None:
    config = ExecutorConfig.load(
        environ={}, registry_dir=REPO / "configs", staging_dir=tmp_path / "staging"
    )
    app = create_executor(config)
    starlette = app.app.app  # inside the browser guard and the body guard
    async with starlette.router.lifespan_context(starlette):
        local = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=local, base_url="http://127.0.0.1:8600") as client:
            for method, path in [
                ("GET", "/admin/state"),
                ("POST", "/admin/activate"),
                ("POST", "/admin/deactivate"),
            ]:
                body = b'{"model": "x"}' if method == "POST" else None
                page = await client.request(method, path, content=body, headers=PAGE)
                assert page.status_code == 403, (path, page.text)
                assert envelope(page)["code"] == "origin_not_allowed"
                rebound = await client.request(
                    method, path, content=body, headers={"host": "rebind.evil.example"}
                )
                assert rebound.status_code == 403 and envelope(rebound)["code"] == (
                    "host_not_allowed"
                )
            plain = await client.post("/admin/deactivate", content=b"{}", headers=PAGE)
            assert plain.status_code == 403
            untyped = await client.post(
                "/admin/deactivate", content=b"{}", headers={"content-type": "text/plain"}
            )
            assert untyped.status_code == 415 and envelope(untyped)["code"] == (
                "unsupported_media_type"
            )
            preflight = await client.options(
                "/admin/activate",
                headers={"origin": EVIL, "access-control-request-method": "POST"},
            )
            assert preflight.status_code == 403
            assert "access-control-allow-origin" not in preflight.headers
            assert (await client.get("/admin/state")).status_code == 200
        lan = httpx.ASGITransport(app=app, client=("192.168.1.20", 40000))
        async with httpx.AsyncClient(transport=lan, base_url="http://192.168.1.5:8600") as client:
            state = await client.get("/admin/state")  # pids, ports, log paths: not for the LAN
            assert state.status_code == 401 and envelope(state)["code"] == "unauthorized"
