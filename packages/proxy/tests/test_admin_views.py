"""The console's read-only admin views: an engine log's tail and the registry with provenance."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

from testkit.fake_engine import entry_for

BROKEN = {
    "name": "org/broken",
    "backend": "llamacpp",
    "backend_config": {"model_path": "/nowhere/model.gguf"},
}


def test_engine_log_tail_is_read_by_model_name_only(proxy_factory) -> None:
    proxy = proxy_factory([BROKEN], admin_token="t0k")
    admin = {"x-admin-token": "t0k"}
    log = proxy.root / "_staging" / "autostart" / "org%2Fbroken.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {n}\n" for n in range(1, 501)))
    answer = proxy.client.get(
        "/admin/logs", params={"model": "org/broken", "lines": 3}, headers=admin
    )
    assert answer.status_code == 200
    assert answer.json() == {
        "model": "org/broken",
        "source": "engine",
        "exists": True,
        "lines": ["line 498", "line 499", "line 500"],
    }
    executor = proxy.client.get(
        "/admin/logs", params={"model": "org/broken", "source": "executor"}, headers=admin
    ).json()
    assert executor["exists"] is False and executor["lines"] == []


def test_engine_log_refuses_what_is_not_a_model(proxy_factory) -> None:
    proxy = proxy_factory([BROKEN], admin_token="t0k")
    admin = {"x-admin-token": "t0k"}
    assert proxy.client.get("/admin/logs", params={"model": "org/broken"}).status_code == 401
    for model in ("../proxy.lock", "/etc/passwd", "org%2Fbroken"):
        answer = proxy.client.get("/admin/logs", params={"model": model}, headers=admin)
        assert answer.status_code == 404, model
        assert answer.json()["error"]["code"] == "model_not_found"
    for params in ({"model": "org/broken", "source": "/etc"}, {"model": "org/broken", "lines": 0}):
        answer = proxy.client.get("/admin/logs", params=params, headers=admin)
        assert (
            answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
        )


def test_registry_view_names_the_layer_of_each_field(proxy_factory, fake_vllm) -> None:
    ext = entry_for("ext", fake_vllm.url, "openai", profiles=["staging"])
    ext["backend_config"]["headers"] = {"Authorization": "Bearer s3cret"}
    proxy = proxy_factory([ext])
    configs = proxy.root / "configs"
    (configs / "model_registry.discovered.json").write_text(
        json.dumps([{"name": "ext", "backend": "openai", "family": "demo"}])
    )
    proxy.client.post("/admin/registry/reload").raise_for_status()
    view = proxy.client.get("/admin/registry").json()
    assert view["last_error"] is None and view["profile"] == "production"
    (entry,) = view["entries"]
    assert entry["name"] == "ext" and entry["visible"] is False
    assert entry["origins"]["family"] == "discovered"
    assert entry["origins"]["backend_config.base_url"] == "curated"
    assert [s["layer"] for s in entry["sources"]] == ["discovered", "curated"]
    assert entry["entry"]["backend_config"]["headers"] == {"Authorization": "<hidden>"}
    assert "s3cret" not in json.dumps(view)

    (configs / "model_registry.curated.json").write_text("[{")
    assert proxy.client.post("/admin/registry/reload").status_code == 409
    held = proxy.client.get("/admin/registry").json()
    assert "not valid JSON" in held["last_error"] and held["version"] == view["version"]


def test_engine_log_does_not_follow_a_link_planted_in_the_staging_dir(proxy_factory) -> None:
    proxy = proxy_factory([BROKEN], admin_token="t0k")
    admin = {"x-admin-token": "t0k"}
    secret = proxy.root / "shadow"
    secret.write_text("root:$6$SECRET-HASH:19000:0:99999:7:::\n")
    log = proxy.root / "_staging" / "autostart" / "org%2Fbroken.log"
    log.parent.mkdir(parents=True)
    log.symlink_to(secret)
    answer = proxy.client.get("/admin/logs", params={"model": "org/broken"}, headers=admin)
    assert answer.status_code == 200
    assert answer.json()["exists"] is False and "SECRET-HASH" not in answer.text
    log.unlink()
    os.mkfifo(log)  # a FIFO nobody writes to: reading it would hang the request
    answer = proxy.client.get("/admin/logs", params={"model": "org/broken"}, headers=admin)
    assert answer.status_code == 200 and answer.json()["exists"] is False


def test_engine_log_of_a_huge_file_is_its_tail(proxy_factory) -> None:
    proxy = proxy_factory([BROKEN])
    log = proxy.root / "_staging" / "autostart" / "org%2Fbroken.log"
    log.parent.mkdir(parents=True)
    with log.open("wb") as handle:  # 4 GiB, sparse: only the tail is written
        handle.truncate(4 << 30)
        handle.seek(0, os.SEEK_END)
        handle.write(b"x" * 1000 + b"\n" + b"".join(b"line %d\n" % n for n in range(5000)))
    answer = proxy.client.get("/admin/logs", params={"model": "org/broken", "lines": 2000})
    lines = answer.json()["lines"]
    assert lines[-1] == "line 4999" and len(lines) == 2000
    assert all(line.startswith("line ") for line in lines)


@pytest.mark.parametrize("lines", ["-1", "0", "2001", "10" * 20, "abc", "1e3", "+5", " 5", "1_0"])
def test_engine_log_lines_must_be_plain_digits_in_range(proxy_factory, lines: str) -> None:
    proxy = proxy_factory([BROKEN])
    answer = proxy.client.get("/admin/logs", params={"model": "org/broken", "lines": lines})
    assert answer.status_code == 400, lines
    assert answer.json()["error"]["param"] == "lines"


def test_registry_view_hides_every_credential(proxy_factory) -> None:
    entry = {
        "name": "remote",
        "backend": "openai",
        "api_key": "SECRET-1",
        "backend_config": {
            "base_url": "https://user:SECRET-2@llm.example/v1?access_token=SECRET-3&x=1",
            "api_key_env": "REMOTE_KEY",
            "extra_args": ["--api-key", "SECRET-4", "--hf-token=SECRET-5", "--max-num-seqs", "8"],
            "env": {"ANYTHING": "SECRET-6"},
            "headers": {"X-Custom": "SECRET-7"},
        },
        "metadata": {"hf_token": "SECRET-8", "notes": "kept"},
        "generation_defaults": {"max_tokens": 64},
    }
    proxy = proxy_factory([entry])
    view = proxy.client.get("/admin/registry").json()
    assert "SECRET" not in json.dumps(view)
    shown = view["entries"][0]["entry"]
    config = shown["backend_config"]
    assert config["api_key_env"] == "REMOTE_KEY"  # the variable's name, not its value
    hidden_args = ["--api-key", "<hidden>", "--hf-token=<hidden>", "--max-num-seqs", "8"]
    assert config["extra_args"] == hidden_args
    assert config["base_url"].startswith("https://<hidden>@llm.example/v1?")
    assert shown["metadata"]["notes"] == "kept"
    assert shown["generation_defaults"] == {"max_tokens": 64}


def test_views_refuse_another_host_without_an_admin_token(proxy_factory) -> None:
    proxy = proxy_factory([BROKEN])  # no token: admin calls are for loopback peers only

    async def ask(peer: str) -> list[int]:
        # The running proxy's own app, called as a request from ``peer`` would reach it.
        transport = httpx.ASGITransport(app=proxy.server.app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            answers = [
                await client.get("/admin/logs", params={"model": "org/broken"}),
                await client.get("/admin/registry"),
            ]
        return [answer.status_code for answer in answers]

    assert asyncio.run(ask("192.0.2.10")) == [401, 401]
    assert asyncio.run(ask("127.0.0.1")) == [200, 200]
