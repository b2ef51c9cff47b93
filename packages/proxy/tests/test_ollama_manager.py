"""The Ollama manager against a fake Ollama that really tracks loaded models, and one that is
down."""

from __future__ import annotations

import logging

import aiohttp

from imageworks.chat_proxy.engines.backends.ollama import OllamaManager
from testkit.servers import free_port


async def test_residency_and_keep_alive_unload(fake_ollama, caplog) -> None:
    engine = fake_ollama.engine
    engine.loaded = {"qwen2.5vl:7b": 1.0, "llama3.1:8b": 2.0}
    engine.vram_mb = {"qwen2.5vl:7b": 9000}
    caplog.set_level(logging.INFO, "imageworks.chat_proxy.engines.backends.ollama")
    async with aiohttp.ClientSession() as session:
        manager = OllamaManager(session, fake_ollama.url + "/v1")  # the /v1 base is accepted
        loaded = await manager.loaded()
        assert {t: m.vram_mb for t, m in loaded.items()} == {
            "qwen2.5vl:7b": 9000,
            "llama3.1:8b": 4096,
        }
        assert await manager.unload("qwen2.5vl:7b") is True
        assert list(engine.loaded) == ["llama3.1:8b"]
        assert await manager.unload("llama3.1:8b") is True
    assert engine.loaded == {}
    assert engine.unload_requests == ["/api/generate qwen2.5vl:7b", "/api/generate llama3.1:8b"]
    assert all(r.body and r.body["keep_alive"] == 0 for r in engine.requests)
    assert not any("stop" in r.path for r in engine.requests)  # /api/stop does not exist
    assert "[ollama-manager] keep_alive unload qwen2.5vl:7b ok" in caplog.text


async def test_falls_back_to_api_chat_when_generate_fails(fake_ollama, caplog) -> None:
    engine = fake_ollama.engine
    engine.tags.append("generate-broken:1b")
    engine.loaded = {"generate-broken:1b": 1.0}
    async with aiohttp.ClientSession() as session:
        assert await OllamaManager(session, fake_ollama.url).unload("generate-broken:1b")
    assert engine.unload_requests == [
        "/api/generate generate-broken:1b",
        "/api/chat generate-broken:1b",
    ]


async def test_a_model_that_stays_loaded_is_reported_as_failed(fake_ollama, caplog) -> None:
    engine = fake_ollama.engine
    engine.tags.append("sticky:1b")
    engine.loaded = {"sticky:1b": 1.0}
    caplog.set_level(logging.INFO, "imageworks.chat_proxy.engines.backends.ollama")
    async with aiohttp.ClientSession() as session:
        manager = OllamaManager(session, fake_ollama.url, unload_timeout_s=0.3, poll_s=0.05)
        assert await manager.unload("sticky:1b") is False
    assert "[ollama-manager] keep_alive unload sticky:1b failed (still loaded after" in caplog.text


async def test_ollama_down_is_not_an_error() -> None:
    async with aiohttp.ClientSession() as session:
        manager = OllamaManager(session, f"http://127.0.0.1:{free_port()}")
        assert await manager.loaded() == {}
        assert manager.reachable is False
        assert await manager.unload("llama3.1:8b") is False  # nothing reached, nothing claimed


async def test_garbage_from_api_ps_is_skipped_never_an_error() -> None:
    from aiohttp import web

    from testkit.servers import AiohttpServer

    bodies = iter(
        [
            b'{"models": [1, "x", null]}',
            b'{"models": "abc"}',
            b'{"models": [{"name": "x", "size_vram": "lots"},'
            b' {"name": "ok:1b", "size_vram": 1048576}]}',
            b"[1, 2]",
            b"not json",
        ]
    )

    async def ps(request: web.Request) -> web.Response:
        return web.Response(body=next(bodies), content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/ps", ps)
    server = AiohttpServer(app)
    try:
        async with aiohttp.ClientSession() as session:
            manager = OllamaManager(session, server.url)
            assert await manager.loaded() == {}
            assert await manager.loaded() == {}
            assert list(await manager.loaded()) == ["ok:1b"]  # the good item survives
            assert await manager.loaded() == {}
            assert await manager.loaded() == {} and manager.reachable is False
    finally:
        server.stop()


def test_record_file_names_keep_distinct_models_apart() -> None:
    from imageworks.chat_proxy.supervision.process import safe_name

    assert len({safe_name(n) for n in ("org/m", "org_m", "org%2Fm", "../m")}) == 4
    assert "/" not in safe_name("../../etc/passwd")
