"""Two real proxies on loopback that name each other as peers, each with its own registry and
fake engine: each lists the other's models, forwards requests for them, sends a model both
serve to the box where it is warm, never forwards a forwarded request again, and drops a peer
that stops answering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiohttp import web
from click.testing import CliRunner
from conftest import Engine, Proxy, ProxyFactory

from imageworks.chat_proxy.config import ConfigError, ProxyConfig
from imageworks.chat_proxy.upstream.peers import FORWARDED_HEADER, load_peers
from imageworks.model_loader.cli import main as cli_main
from testkit.entries import eventually
from testkit.servers import AiohttpServer, free_port

GRACE_S = 1.5


def upstream(name: str, engine: Engine) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "openai",
        "capabilities": {"text": True},
        "backend_config": {"base_url": engine.url + "/v1"},
    }


def chat(proxy: Proxy, model: str, **headers: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return proxy.client.post("/v1/chat/completions", json=body, headers=headers)


def ids(proxy: Proxy) -> dict[str, dict[str, Any]]:
    return {m["id"]: m["imageworks"] for m in proxy.client.get("/v1/models").json()["data"]}


@dataclass
class Boxes:
    a: Proxy
    b: Proxy
    engine_a: Engine
    engine_b: Engine


@pytest.fixture
def boxes(proxy_factory: ProxyFactory, fake_vllm: Engine, fake_llamacpp: Engine) -> Iterator[Boxes]:
    port_a = free_port()
    b = proxy_factory(
        [upstream("beta", fake_llamacpp), upstream("shared", fake_llamacpp)],
        peers=json.dumps([{"name": "a", "url": f"http://127.0.0.1:{port_a}"}]),
        peer_poll_s=0.2,
        peer_grace_s=GRACE_S,
    )
    a = proxy_factory(
        [upstream("alpha", fake_vllm), upstream("shared", fake_vllm)],
        port=port_a,
        peers=json.dumps([{"name": "b", "url": b.url}]),
        peer_poll_s=0.2,
        peer_grace_s=GRACE_S,
    )
    assert eventually(lambda: "beta" in ids(a) and "alpha" in ids(b))
    yield Boxes(a, b, fake_vllm, fake_llamacpp)


def test_each_box_lists_the_others_models_once(boxes: Boxes) -> None:
    at_a = ids(boxes.a)
    # Unique names stay logical names; a name both serve is this box's, plus 'peer/name'.
    assert set(at_a) == {"alpha", "shared", "beta", "b/shared"}
    assert at_a["beta"]["peer"] == "b"
    assert at_a["b/shared"]["peer"] == "b"
    assert at_a["b/shared"]["boxes"] == ["local", "b"]
    assert "peer" not in at_a["alpha"]
    # B lists A's own models only, never what A learnt from B (no echo, no loop).
    assert set(ids(boxes.b)) == {"beta", "shared", "alpha", "a/shared"}


def test_a_request_for_a_peers_model_is_forwarded_once(boxes: Boxes) -> None:
    answer = chat(boxes.a, "beta")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from llamacpp!"
    seen = boxes.engine_b.engine.requests[-1]
    assert seen.body is not None and seen.body["model"] == "beta"
    # A forwarded request is served from the receiving box's own registry only.
    again = chat(boxes.a, "beta", **{FORWARDED_HEADER: "somebox"})
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "model_not_found"


def test_a_model_on_both_boxes_goes_where_it_is_warm(boxes: Boxes) -> None:
    def content(answer: httpx.Response) -> str:
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["message"]["content"])

    # Warm nowhere: each box serves its own copy (no GPU of another box is woken).
    assert content(chat(boxes.a, "shared")) == "Hello from vllm!"
    # Now warm on A: B's own copy is cold, so B sends it to A.
    assert eventually(lambda: ids(boxes.b)["a/shared"].get("state") == "ready")
    assert content(chat(boxes.b, "shared")) == "Hello from vllm!"
    assert not any(
        r.body and r.body.get("model") == "shared" for r in boxes.engine_b.engine.requests
    )
    # A copy pinned by 'box/model' goes to that box whatever its state.
    assert content(chat(boxes.a, "b/shared")) == "Hello from llamacpp!"
    assert content(chat(boxes.a, "shared")) == "Hello from vllm!"


def test_a_silent_peer_drops_out_and_its_models_are_502(boxes: Boxes) -> None:
    assert chat(boxes.a, "beta").status_code == 200
    boxes.b.server.stop()
    assert eventually(lambda: "beta" not in ids(boxes.a), GRACE_S + 10)
    assert "b/shared" not in ids(boxes.a)
    answer = chat(boxes.a, "beta")
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["code"] == "backend_unavailable"
    assert "peer 'b'" in error["message"]
    # This box's own models are untouched.
    assert chat(boxes.a, "alpha").status_code == 200


def test_admin_state_says_where_each_model_runs_and_admin_is_never_forwarded(
    boxes: Boxes,
) -> None:
    state = boxes.a.client.get("/admin/state").json()
    where = {m["name"]: m["location"] for m in state["models"]}
    assert where["alpha"] == {"kind": "local"}
    assert where["beta"] == {"kind": "peer", "peer": "b"}
    assert [p["name"] for p in state["peers"]] == ["b"]
    assert state["peers"][0]["alive"] is True
    listed = CliRunner().invoke(cli_main, ["list", "--live", "--proxy-url", boxes.a.url])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split()[-1] for line in listed.output.splitlines()[1:]}
    assert rows["alpha"] == "local"
    assert rows["beta"] == "peer:b"
    refused = boxes.a.client.post("/admin/activate", json={"model": "beta"})
    assert refused.status_code == 404
    assert not any(r.path.startswith("/admin") for r in boxes.engine_b.engine.requests)


def test_a_bad_peer_list_names_its_source(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="CHAT_PROXY_PEERS"):
        load_peers(ProxyConfig.load(environ={}, cwd=tmp_path, peers='[{"name": "x"}]'))
    (tmp_path / "peers.json").write_text(
        json.dumps([{"name": "x", "url": "http://h:1"}, {"name": "x", "url": "http://h:2"}])
    )
    with pytest.raises(ConfigError, match="unique"):
        load_peers(ProxyConfig.load(environ={}, cwd=tmp_path, registry_dir=tmp_path))
    (tmp_path / "peers.json").write_text(json.dumps([{"name": "x", "url": "http://h:1"}]))
    loaded = load_peers(ProxyConfig.load(environ={}, cwd=tmp_path, registry_dir=tmp_path))
    assert [(p.name, p.url) for p in loaded] == [("x", "http://h:1")]


class LyingPeer:
    """A 'peer' whose model list is whatever the test says; counts the lists it is asked for."""

    def __init__(self) -> None:
        self.body = b'{"object": "list", "data": []}'
        self.polls = 0
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.server = AiohttpServer(app)
        self.url = self.server.url

    async def models(self, request: web.Request) -> web.Response:
        self.polls += 1
        return web.Response(body=self.body, content_type="application/json")

    async def chat(self, request: web.Request) -> web.Response:
        message = {"role": "assistant", "content": "from the peer"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response({"id": "c", "object": "chat.completion", "choices": [choice]})

    def answers(self, body: bytes) -> bool:
        """Serve ``body`` and wait until the proxy has read it twice (so it was read, and the
        polling went on after it)."""
        self.body, seen = body, self.polls
        return eventually(lambda: self.polls >= seen + 2)


@pytest.fixture
def liar(proxy_factory: ProxyFactory) -> Iterator[tuple[LyingPeer, Proxy]]:
    peer = LyingPeer()
    proxy = proxy_factory(
        [],
        peers=json.dumps([{"name": "liar", "url": peer.url}]),
        peer_poll_s=0.1,
        peer_grace_s=60,
    )
    yield peer, proxy
    peer.server.stop()


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'"models"',
        b'{"data": 5}',
        b"<html>not json</html>",
        json.dumps({"data": [{"id": "big"}], "padding": "x" * 9_000_000}).encode(),
    ],
)
def test_a_peer_that_answers_nonsense_lists_nothing_and_the_polling_goes_on(
    liar: tuple[LyingPeer, Proxy], body: bytes
) -> None:
    """A model list that is not one (or is larger than 8 MB) counts as no answer; the next poll
    still happens (a list that was not an object used to end the poll loop for good)."""
    peer, proxy = liar
    assert peer.answers(body)
    assert ids(proxy) == {}
    assert peer.answers(b'{"data": [{"id": "fine"}]}')
    assert eventually(lambda: "fine" in ids(proxy))


def test_a_peers_models_that_cannot_be_sent_to_are_left_out_and_duplicates_listed_once(
    liar: tuple[LyingPeer, Proxy],
) -> None:
    peer, proxy = liar
    models = [
        {"id": "ok"},
        {"id": "ok"},
        {"id": "padded "},
        {"id": ""},
        {"id": "x" * 300},
        {"id": "odd", "imageworks": {"capabilities": {"vision": "maybe", "nonsense": [1]}}},
    ]
    assert peer.answers(json.dumps({"data": models}).encode())
    listed = [m["id"] for m in proxy.client.get("/v1/models").json()["data"]]
    assert listed == ["ok"]
    assert chat(proxy, "ok").status_code == 200
    for name in ("padded ", "odd"):
        assert chat(proxy, name).status_code == 404  # not a model here, never a 500
