"""Nothing secret or internal in any answer or log (issue 24, finding 3): credentials in a
backend's or a peer's URL never reach an API client, the JSONL log or an admin view; API
clients are not told backend addresses at all; the registry view hides camelCase and glued
secret names and Ray's ``runtime_env.env_vars``; a ``base_url`` with a query keeps it."""

from __future__ import annotations

import json

from imageworks.chat_proxy.redact import public_text, redact, redact_text, secret_name
from testkit.fake_engine import entry_for
from testkit.servers import free_port

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
SECRETS = ("pw-one", "SECRET-KEY", "pw-two")


def test_credentials_and_addresses_are_absent_from_answers_logs_and_admin_views(
    proxy_factory,
) -> None:
    dead = free_port()
    base = f"http://user:pw-one@127.0.0.1:{dead}/v1?api_key=SECRET-KEY"
    peers = json.dumps([{"name": "bob", "url": f"http://bob:pw-two@127.0.0.1:{free_port()}"}])
    entry = entry_for("m", "http://x", backend="openai")
    entry["backend_config"] = {"base_url": base}
    proxy = proxy_factory([entry], peers=peers, peer_poll_s=0.2)
    for stream in (False, True):
        answer = proxy.client.post(
            "/v1/chat/completions", json={**CHAT, "model": "m", "stream": stream}
        )
        assert answer.status_code == 502, answer.text
        message = answer.json()["error"]["message"]
        assert "'m'" in message and "cannot connect" in message  # the model, and what failed
        for leaked in (*SECRETS, "127.0.0.1", str(dead), "user"):
            assert leaked not in answer.text, (leaked, answer.text)
    views = [
        proxy.client.get("/admin/requests").text,
        proxy.client.get("/admin/state").text,
        proxy.client.get("/admin/registry").text,
    ]
    proxy.server.stop()
    records = proxy.log_path.read_text()
    assert "error_message" in records
    for text in (*views, records):
        for leaked in SECRETS:
            assert leaked not in text, (leaked, text[:2000])
    state = json.loads(views[1])
    assert state["peers"][0]["url"].startswith("http://<hidden>@127.0.0.1:")
    [first, _] = [r for r in map(json.loads, records.splitlines()) if r.get("event") == "request"]
    # Admins see where it failed, credentials hidden.
    assert f"127.0.0.1:{dead}/v1/chat/completions?api_key=<hidden>" in first["error_message"]


def test_a_base_url_with_a_query_keeps_it_after_the_path(proxy_factory, fake_vllm) -> None:
    entry = entry_for("m", fake_vllm.url, backend="openai")
    entry["backend_config"]["base_url"] = fake_vllm.url + "/v1?api-version=2024-06-01"
    proxy = proxy_factory([entry])
    answer = proxy.client.post("/v1/chat/completions", json={**CHAT, "model": "m"})
    assert answer.status_code == 200, answer.text
    [seen] = fake_vllm.engine.requests
    assert (seen.path, seen.query) == ("/v1/chat/completions", "api-version=2024-06-01")


def test_secret_names_in_camel_case_glued_and_ray_env_vars_are_hidden() -> None:
    for name in ("accessToken", "clientSecret", "PGPASSWORD", "hf_token", "--api-key", "AuthKey"):
        assert secret_name(name), name
    for name in ("max_tokens", "tokenizer", "api_key_env", "accessTokenEnv", "model", "author"):
        assert not secret_name(name), name
    entry = {
        "backend_config": {
            "accessToken": "t1",
            "clientSecret": "t2",
            "extra": {"PGPASSWORD": "t3"},
            "runtime_env": {"env_vars": {"HF_HOME": "/models", "WANDB": "t4"}},
            "url": "https://h.example/v1?sig=t5&x=1",
            "max_tokens": 5,
        }
    }
    shown = json.dumps(redact(entry))
    for secret in ("t1", "t2", "t3", "t4", "t5", "/models"):
        assert f'"{secret}' not in shown and f"={secret}" not in shown, (secret, shown)
    assert '"max_tokens": 5' in shown and "h.example" in shown


def test_messages_for_api_clients_name_no_address() -> None:
    text = (
        "cannot connect to the backend of model 'qwen2.5vl:72' (http://u:p@10.1.2.3:8209/v1): "
        "refused; the executor at http://imageworks-vllm:8600 and host box.lan:8100 and 10.0.0.9"
    )
    public = public_text(text)
    for leaked in ("10.1.2.3", "8209", "imageworks-vllm", "box.lan", "10.0.0.9", "u:p"):
        assert leaked not in public, (leaked, public)
    assert "'qwen2.5vl:72'" in public and "refused" in public
    assert (
        redact_text("at http://u:p@h:1/v1?k=v#f") == "at http://<hidden>@h:1/v1?k=<hidden>#<hidden>"
    )
