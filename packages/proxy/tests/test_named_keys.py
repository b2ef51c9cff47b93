"""Named API keys (issue 24): ``CHAT_PROXY_API_KEYS=@file`` gives each key a name and the
models or profiles it may use; the JSONL record and /metrics carry the name, never the key; a
key used for a model it may not use is a 403 naming the key, in the client's envelope; the
model list shows only what the key may use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imageworks.chat_proxy.config import ConfigError, ProxyConfig
from testkit.fake_engine import entry_for

ALICE = "sk-alice-0123456789"  # may use m1 and the vision-* models
BOB = "sk-bob-9876543210"  # may use what the 'staging' profile offers
CAROL = "sk-carol-5555555555"  # may use everything


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            [
                {"name": "alice", "key": ALICE, "models": ["m1", "vision-*"]},
                {"name": "bob", "key": BOB, "profiles": ["staging"]},
                {"name": "carol", "key": CAROL},
            ]
        )
    )
    return path


@pytest.fixture
def proxy(proxy_factory, fake_vllm, tmp_path: Path) -> Any:
    entries = [
        entry_for("m1", fake_vllm.url),
        entry_for("m2", fake_vllm.url, profiles=["production", "staging"]),
        entry_for("vision-a", fake_vllm.url, profiles=["production"]),
    ]
    return proxy_factory(entries, api_keys="@" + str(keys_file(tmp_path)))


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_a_key_may_use_its_models_and_gets_a_403_naming_it_for_others(proxy) -> None:
    post = proxy.client.post
    assert post("/v1/chat/completions", json=chat("m1"), headers=bearer(ALICE)).status_code == 200
    ok = post("/v1/chat/completions", json=chat("vision-a"), headers=bearer(ALICE))
    assert ok.status_code == 200
    refused = post("/v1/chat/completions", json=chat("m2"), headers=bearer(ALICE))
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["type"] == "permission_error" or error["code"] == "forbidden"
    assert "'alice'" in error["message"] and "'m2'" in error["message"]
    assert ALICE not in refused.text
    # Profiles: bob may use what 'staging' offers (m2, and m1, which names no profile).
    assert post("/v1/chat/completions", json=chat("m2"), headers=bearer(BOB)).status_code == 200
    assert (
        post("/v1/chat/completions", json=chat("vision-a"), headers=bearer(BOB)).status_code == 403
    )
    assert post("/v1/chat/completions", json=chat("m2"), headers=bearer(CAROL)).status_code == 200
    bad = post("/v1/chat/completions", json=chat("m1"), headers=bearer("sk-nobody"))
    assert bad.status_code == 401


def test_the_refusal_is_in_anthropics_envelope_on_messages(proxy) -> None:
    body = {"model": "m2", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    refused = proxy.client.post(
        "/v1/messages", json=body, headers={"x-api-key": ALICE, "anthropic-version": "2023-06-01"}
    )
    assert refused.status_code == 403
    answer = refused.json()
    assert answer["type"] == "error" and answer["error"]["type"] == "permission_error"
    assert "'alice'" in answer["error"]["message"]


def test_the_model_list_shows_only_what_the_key_may_use(proxy) -> None:
    def listed(key: str) -> list[str]:
        response = proxy.client.get("/v1/models", headers=bearer(key))
        assert response.status_code == 200
        return sorted(item["id"] for item in response.json()["data"])

    assert listed(ALICE) == ["m1", "vision-a"]
    assert listed(BOB) == ["m1", "m2"]
    assert listed(CAROL) == ["m1", "m2", "vision-a"]
    assert listed(ALICE) == ["m1", "vision-a"]  # no cached list of another key
    one = proxy.client.get("/v1/models/m2", headers=bearer(ALICE))
    assert one.status_code == 403 and "'alice'" in one.json()["error"]["message"]
    assert proxy.client.get("/v1/models/m2", headers=bearer(BOB)).status_code == 200


def test_the_record_and_metrics_carry_the_name_never_the_key(proxy) -> None:
    post = proxy.client.post
    post("/v1/chat/completions", json=chat("m1"), headers=bearer(ALICE))
    post("/v1/chat/completions", json=chat("m2"), headers=bearer(ALICE))
    post("/v1/chat/completions", json=chat("m2"), headers=bearer(BOB))
    records = proxy.records()
    assert [(r["key_name"], r["model"], r["status"]) for r in records] == [
        ("alice", "m1", 200),
        ("alice", "m2", 403),
        ("bob", "m2", 200),
    ]
    metrics = proxy.client.get("/metrics").text
    assert 'chat_proxy_key_requests_total{key="alice",model="m1",status="200"} 1.0' in metrics
    assert 'chat_proxy_key_requests_total{key="bob",model="m2",status="200"} 1.0' in metrics
    log = proxy.log_path.read_text()
    state = proxy.client.get("/admin/state", headers=bearer(CAROL)).text
    for secret in (ALICE, BOB, CAROL):
        assert secret not in log and secret not in metrics and secret not in state
    assert "alice" in state  # the names are shown (api_key_names)


def test_a_plain_key_list_names_its_keys_and_lets_them_use_everything(
    proxy_factory, fake_vllm
) -> None:
    proxy = proxy_factory([entry_for("m1", fake_vllm.url)], api_keys="first-key,second-key")
    answer = proxy.client.post(
        "/v1/chat/completions", json=chat("m1"), headers=bearer("second-key")
    )
    assert answer.status_code == 200
    assert proxy.records()[-1]["key_name"] == "key2"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("not json", "is not JSON"),
        ("[]", "non-empty JSON array"),
        ('[{"name": "a", "key": "k1"}, {"name": "a", "key": "k2"}]', "same name"),
        ('[{"name": "a", "key": "k1"}, {"name": "b", "key": "k1"}]', "same key"),
        ('[{"name": "a b", "key": "k1"}]', "entry 0: name"),
        ('[{"name": "a", "key": "k1", "model": ["x"]}]', "entry 0: model"),
    ],
)
def test_a_bad_keys_file_fails_at_start_naming_the_variable_and_no_key(
    tmp_path: Path, content: str, says: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as failed:
        ProxyConfig.load(environ={"CHAT_PROXY_API_KEYS": f"@{path}"}, cwd=tmp_path)
    assert "CHAT_PROXY_API_KEYS" in str(failed.value) and says in str(failed.value)
    assert "k1" not in str(failed.value).replace("keys.json", "")


def test_a_missing_keys_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CHAT_PROXY_API_KEYS file .* cannot be read"):
        ProxyConfig.load(environ={"CHAT_PROXY_API_KEYS": f"@{tmp_path}/none.json"}, cwd=tmp_path)


def test_the_derived_key_list_cannot_be_set_from_the_environment(tmp_path: Path) -> None:
    config = ProxyConfig.load(environ={"CHAT_PROXY_NAMED_KEYS": "[]"}, cwd=tmp_path)
    assert config.named_keys == () and config.api_keys == ()
