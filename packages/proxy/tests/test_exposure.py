"""Bad input and exposure, tried as a newcomer and an attacker would: who may administer,
body limits everywhere, deep nesting, query strings, slow clients, streams refused before
their first byte, a full disk under the request log, config errors at import."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imageworks.chat_proxy.app import ProxyApp, create_app
from imageworks.chat_proxy.config import ConfigError, ProxyConfig
from imageworks.vllm_executor.app import create_app as create_executor
from imageworks.vllm_executor.config import ExecutorConfig, ExecutorConfigError
from testkit.servers import free_port

REPO = Path(__file__).resolve().parents[3]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
LAN_PEER = ("192.168.1.20", 40000)
DEEP = b"[" * 30_000 + b"]" * 30_000  # under the 64 KiB admin limit
JSON_BODY = {"content-type": "application/json"}


def envelope(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@contextlib.asynccontextmanager
async def from_the_lan(app: ProxyApp) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, its lifespan run, reached by a peer on the LAN: the ASGI scope's
    ``client`` is the seam (no traffic leaves loopback, none even enters a socket)."""
    async with app.app.router.lifespan_context(app.app):
        transport = httpx.ASGITransport(app=app, client=LAN_PEER)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield client


def proxy_config(tmp_path: Path, **settings: Any) -> ProxyConfig:
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "deployment_profiles.json").write_text(
        (REPO / "configs" / "deployment_profiles.json").read_text()
    )
    (tmp_path / "configs" / "model_registry.curated.json").write_text("[]")
    return ProxyConfig.load(
        environ={},
        cwd=tmp_path,
        registry_dir=tmp_path / "configs",
        staging_dir=tmp_path / "_staging",
        log_path=tmp_path / "logs" / "chat_proxy.jsonl",
        gpu_probe="none",
        **settings,
    )


async def test_admin_and_lease_writes_from_the_lan_need_a_token_whatever_started_the_app(
    tmp_path: Path,
) -> None:
    # CHAT_PROXY_HOST says loopback, but uvicorn was told --host 0.0.0.0: the peer decides.
    async with from_the_lan(create_app(proxy_config(tmp_path))) as lan:
        for method, path, body in [
            ("PUT", "/admin/autostart", {"enabled": False}),
            ("PUT", "/admin/profile", {"name": "testing"}),
            ("POST", "/admin/registry/reload", None),
            ("GET", "/admin/state", None),
            ("POST", "/v1/gpu/lease", {"owner": "x"}),
            ("POST", "/v1/gpu/force_release", None),
        ]:
            answer = await lan.request(method, path, json=body)
            assert answer.status_code == 401, (path, answer.text)
            assert "CHAT_PROXY_ADMIN_TOKEN" in envelope(answer)["message"]
        assert (await lan.get("/v1/healthz")).status_code == 200
    token_config = proxy_config(tmp_path, admin_token="s3cret")
    async with from_the_lan(create_app(token_config)) as lan:
        allowed = await lan.put(
            "/admin/autostart", json={"enabled": False}, headers={"x-admin-token": "s3cret"}
        )
        assert allowed.status_code == 200 and allowed.json() == {"enabled": False}


async def test_the_executor_refuses_lan_activation_without_a_token(tmp_path: Path) -> None:
    with pytest.raises(ExecutorConfigError, match="requires CHAT_PROXY_ADMIN_TOKEN"):
        ExecutorConfig.load(environ={"IMAGEWORKS_VLLM_HOST": "0.0.0.0"})
    config = ExecutorConfig.load(
        environ={}, registry_dir=REPO / "configs", staging_dir=tmp_path / "staging"
    )
    app = create_executor(config)
    starlette = app.app.app  # inside the browser guard and the body guard
    async with starlette.router.lifespan_context(starlette):
        transport = httpx.ASGITransport(app=app, client=LAN_PEER)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as lan:
            for path in ("/admin/activate", "/admin/deactivate"):
                answer = await lan.post(path, json={"model": "anything"})
                assert answer.status_code == 401 and envelope(answer)["code"] == "unauthorized"
        local = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=local, base_url="http://127.0.0.1") as client:
            deep = await client.post("/admin/activate", content=DEEP, headers=JSON_BODY)
            assert deep.status_code == 400 and envelope(deep)["code"] == "invalid_request"


def test_api_keys_without_an_admin_token_protect_admin(proxy_factory) -> None:
    proxy = proxy_factory([], api_keys="k1,k2")
    assert proxy.client.get("/admin/state").status_code == 401
    assert proxy.client.put("/admin/autostart", json={"enabled": False}).status_code == 401
    keyed = {"authorization": "Bearer k2"}
    assert proxy.client.get("/admin/state", headers=keyed).status_code == 200
    assert proxy.client.post("/v1/gpu/force_release", headers=keyed).status_code == 200


def test_admin_and_lease_bodies_are_limited_while_they_stream(proxy_factory) -> None:
    # Chunked, so no content-length to refuse it by: only counting while reading stops it (a
    # body read whole first would be refused as blank JSON, 400, after buffering 16 MB).
    proxy = proxy_factory([])

    def chunked() -> Iterator[bytes]:
        for _ in range(16):
            yield b" " * (1 << 20)

    for path in ("/admin/profile", "/v1/gpu/lease"):
        method = "PUT" if path.startswith("/admin") else "POST"
        answer = proxy.client.request(method, path, content=chunked(), headers=JSON_BODY)
        assert answer.status_code == 413, answer.text
        assert envelope(answer)["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("PUT", "/admin/profile"),
        ("PUT", "/admin/autostart"),
        ("POST", "/admin/activate"),
        ("POST", "/v1/gpu/lease"),
    ],
)
def test_deeply_nested_json_is_400_and_logged(proxy_factory, method: str, path: str) -> None:
    proxy = proxy_factory([])
    nested = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    body = nested if path.startswith(("/v1/c", "/v1/e")) else DEEP
    answer = proxy.client.request(method, path, content=body, headers=JSON_BODY)
    assert answer.status_code == 400, answer.text
    assert envelope(answer)["code"] == "invalid_request"
    assert "nested too deeply" in envelope(answer)["message"]
    proxy.server.stop()
    [record] = proxy.records()
    assert record["status"] == 400 and record["error_code"] == "err_invalid_request"


@pytest.mark.parametrize("limit", ["%C2%B2", "-1", "0", "ten", "99999999999999999999", "1.5"])
def test_query_parameters_are_validated(proxy_factory, limit: str) -> None:
    proxy = proxy_factory([])
    answer = proxy.client.get(f"/admin/requests?limit={limit}")
    assert answer.status_code == 400, answer.text
    assert envelope(answer)["param"] == "limit"
    assert proxy.client.get("/admin/requests?limit=3").status_code == 200


def test_slow_clients_are_cut_off(proxy_factory) -> None:
    proxy = proxy_factory([], header_timeout_s=0.3, body_timeout_s=0.3)
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # never finished
        assert sock.recv(1024) == b""  # closed by the proxy, not by the 10 s socket timeout
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=10) as sock:
        sock.sendall(
            b"PUT /admin/profile HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n" + b"{" * 10
        )
        answer = b""
        while b"}}" not in answer and (more := sock.recv(4096)):
            answer += more
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b'"request_timeout"' in answer


def test_a_slow_head_is_timed_from_the_connection_opening(proxy_factory) -> None:
    proxy = proxy_factory([], header_timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=10) as sock:
        opened = time.monotonic()
        time.sleep(0.9)  # silent for most of the limit, then a head that never ends
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        assert sock.recv(1024) == b""
        waited = time.monotonic() - opened
    # Closed at the limit from the opening (1.0 s), not a whole limit after the first byte (1.9).
    assert 0.9 <= waited < 1.6, waited


def test_a_stream_for_a_stopped_model_with_autostart_off_is_refused_before_the_first_byte(
    proxy_factory,
) -> None:
    stopped = {
        "name": "v",
        "backend": "vllm",
        "chat_template": {"source": "external", "path": "t.jinja"},
    }
    proxy = proxy_factory([stopped], autostart_enabled=False)
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "v", "stream": True})
    assert answer.status_code == 502
    assert answer.headers["content-type"].startswith("application/json")
    assert envelope(answer)["code"] == "backend_unavailable"
    assert "autostart is disabled" in envelope(answer)["message"]


def test_dropped_log_records_are_counted_in_metrics(proxy_factory) -> None:
    proxy = proxy_factory([])
    metrics = proxy.client.get("/metrics").text
    assert "chat_proxy_request_log_dropped_records 0.0" in metrics


@pytest.mark.subprocess
def test_a_config_error_stops_uvicorn_as_it_loads_the_app(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CHAT_PROXY_PORT": "eighty", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "imageworks.chat_proxy.app:app", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Error: CHAT_PROXY_PORT: Input should be a valid integer" in result.stderr
    assert "lifespan" not in result.stderr.lower() and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="CHAT_PROXY_PORT"):
        ProxyConfig.load(environ={"CHAT_PROXY_PORT": "eighty"}, cwd=tmp_path)
    assert free_port()  # nothing left listening


def test_a_wrong_method_on_a_forwarded_endpoint_is_enveloped_and_logged(proxy_factory) -> None:
    proxy = proxy_factory([])
    answer = proxy.client.get("/v1/chat/completions", headers={"x-request-id": "wrong-method"})
    assert answer.status_code == 405 and envelope(answer)["code"] == "method_not_allowed"
    proxy.server.stop()
    [record] = proxy.records()
    assert record["request_id"] == "wrong-method" and record["status"] == 405
