"""docs/scaling.md's examples, run as far as they can run here: the one-box entry and the peers
file with real proxies on loopback, the Ray LLM entry as the application the proxy would
deploy, the LiteLLM config checked against this proxy. (The ``ray-app`` example is deployed on
a real Ray head by tests/test_ray_backend.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Engine, ProxyFactory

from imageworks.chat_proxy.engines.backends import ray_apps
from imageworks.model_loader.schema import ModelEntry
from testkit.docs_examples import example, examples
from testkit.entries import eventually
from testkit.servers import free_port

DOC = "scaling.md"
SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "model_registry.curated.json"
ENGINE_IN_DOC = "http://127.0.0.1:8080"
PEER_IN_DOC = "http://127.0.0.1:8101"


def test_every_example_is_checked_here_or_in_the_ray_tests() -> None:
    assert set(examples(DOC)) == {"one-box", "peers", "ray-llm", "ray-app", "litellm"}


def test_the_one_box_entry_serves(proxy_factory: ProxyFactory, fake_llamacpp: Engine) -> None:
    entries = json.loads(example(DOC, "one-box").replace(ENGINE_IN_DOC, fake_llamacpp.url))
    proxy = proxy_factory(entries)
    body = {"model": "local-llm", "messages": [{"role": "user", "content": "hi"}]}
    answer = proxy.client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text


def test_the_peers_file_joins_two_boxes(
    proxy_factory: ProxyFactory, fake_vllm: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Box B (the doc's ``gpu2``) wants an API key; box A has the doc's peer list (only the
    port changed) and the key in the variable the list names."""
    port_b = free_port()
    peers = json.loads(example(DOC, "peers"))
    monkeypatch.setenv(peers[0]["api_key_env"], "gpu2-secret")
    entry = {
        "name": "qwen-on-gpu2",
        "backend": "openai",
        "capabilities": {"text": True},
        "backend_config": {"base_url": fake_vllm.url + "/v1"},
    }
    b = proxy_factory([entry], port=port_b, api_keys=("gpu2-secret",))
    text = example(DOC, "peers").replace(PEER_IN_DOC, f"http://127.0.0.1:{port_b}")
    a = proxy_factory([], peers=text, peer_poll_s=0.2)

    def listed() -> dict[str, Any]:
        return {m["id"]: m["imageworks"] for m in a.client.get("/v1/models").json()["data"]}

    assert eventually(lambda: "qwen-on-gpu2" in listed())
    assert listed()["qwen-on-gpu2"]["peer"] == "gpu2"
    body = {"model": "qwen-on-gpu2", "messages": [{"role": "user", "content": "hi"}]}
    answer = a.client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    # B lets nobody in without the key: A's request got there with the one the list names.
    assert b.client.post("/v1/chat/completions", json=body).status_code == 401


def test_the_ray_llm_entry_deploys_serve_llms_openai_app() -> None:
    entry = ModelEntry.model_validate(json.loads(example(DOC, "ray-llm")))
    app = ray_apps.application(entry)
    assert app["name"] == "imageworks-qwen2.5-7b"
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    [llm] = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {
        "model_id": "qwen2.5-7b",
        "model_source": "Qwen/Qwen2.5-7B-Instruct",
    }
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 4


def test_the_litellm_config_points_at_this_proxy_and_its_models() -> None:
    config = yaml.safe_load(example(DOC, "litellm"))
    shipped = {e["name"] for e in json.loads(SHIPPED.read_text())}
    for model in config["model_list"]:
        params = model["litellm_params"]
        assert params["api_base"] == "http://127.0.0.1:8100/v1"
        assert params["model"].removeprefix("openai/") in shipped
