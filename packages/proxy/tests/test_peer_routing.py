"""The peer table over plain data and one loopback server: how a peer's model list is read (its
key, its status), where a name goes when several boxes serve it, and a pinned name on a silent
peer. The two-proxy behaviour is tested end to end in tests/test_peers.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import certifi
import pytest
from aiohttp import web

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.chat_proxy.upstream.peers import FORWARDED_HEADER, PeerModel, Peers
from imageworks.model_loader.schema import ModelEntry
from testkit.servers import AiohttpServer


class ModelList:
    """A peer's ``/v1/models``, answering ``status`` and recording the headers it got."""

    def __init__(self) -> None:
        self.status = 200
        self.count = 1
        self.headers: list[dict[str, str]] = []
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        self.server = AiohttpServer(app)

    async def models(self, request: web.Request) -> web.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        ids = ["m"] if self.count == 1 else [f"model-{i:05d}" for i in range(self.count)]
        info = {"state": "ready", "backend": "vllm", "display_name": "a model with a long label"}
        body = {"data": [{"id": i, "object": "model", "imageworks": info} for i in ids]}
        return web.json_response(body, status=self.status)


@pytest.fixture
def model_list() -> Iterator[ModelList]:
    served = ModelList()
    yield served
    served.server.stop()


def peers_of(tmp_path: Path, *peers: dict[str, Any]) -> Peers:
    config = ProxyConfig.load(environ={}, cwd=tmp_path, peers=json.dumps(list(peers)))
    return Peers(config, aiohttp.ClientSession)


async def poll(table: Peers) -> None:
    async with aiohttp.ClientSession() as session:
        table._session = lambda: session
        await table.poll()


async def test_a_peer_is_asked_with_its_key_and_marked_as_forwarded(
    tmp_path: Path, model_list: ModelList, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = peers_of(tmp_path, {"name": "b", "url": model_list.server.url, "api_key_env": "K"})
    monkeypatch.setenv("K", "secret")
    await poll(table)
    (asked,) = model_list.headers
    assert asked["authorization"] == "Bearer secret"
    assert asked[FORWARDED_HEADER] == table.self_name
    assert [m.id for m in table.peers["b"].models] == ["m"]
    assert table.public()[0]["alive"] is True


async def test_a_peer_whose_key_is_missing_or_that_refuses_is_not_alive(
    tmp_path: Path, model_list: ModelList, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = peers_of(tmp_path, {"name": "b", "url": model_list.server.url, "api_key_env": "K"})
    monkeypatch.delenv("K", raising=False)
    await poll(table)
    assert model_list.headers == []  # never asked without its key
    assert table.peers["b"].last_error == "peer key variable K is not set"
    monkeypatch.setenv("K", "wrong")
    model_list.status = 401
    await poll(table)
    (row,) = table.public()
    assert row["last_error"] == "GET /v1/models answered 401"
    assert row["alive"] is False and row["models"] == []


async def test_a_peer_listing_3000_models_is_listed_whole(
    tmp_path: Path, model_list: ModelList
) -> None:
    # About 330 KB: many network reads. ``content.read(n)`` returned the first one only, and
    # the cut JSON made the peer look dead with no models.
    model_list.count = 3000
    table = peers_of(tmp_path, {"name": "b", "url": model_list.server.url})
    await poll(table)
    (row,) = table.public()
    assert row["alive"] is True, row["last_error"]
    assert len(row["models"]) == 3000


def live_table(tmp_path: Path, models: dict[str, list[PeerModel]]) -> Peers:
    table = peers_of(tmp_path, *({"name": n, "url": f"http://{n}:1"} for n in models))
    for name, listed in models.items():
        table.peers[name].models = listed
        table.peers[name].last_ok = time.monotonic()
    return table


def model(peer: str, state: str) -> PeerModel:
    return PeerModel(peer, "m", {"state": state})


def test_a_name_two_peers_serve_is_listed_once_and_goes_where_it_is_warm(tmp_path: Path) -> None:
    table = live_table(tmp_path, {"b": [model("b", "stopped")], "c": [model("c", "ready")]})
    listed = {item.id: item for item in table.listed(set())}
    assert set(listed) == {"m", "b/m", "c/m"}
    assert listed["m"].model.peer == "c" and listed["m"].boxes == ["b", "c"]
    routed = table.route("m", None, False)
    assert routed is not None and routed.metadata["peer"] == "c"


def test_a_model_warm_here_stays_here_even_when_a_peer_has_it_warm(tmp_path: Path) -> None:
    table = live_table(tmp_path, {"b": [model("b", "ready")]})
    local = ModelEntry.model_validate(
        {"name": "m", "backend": "openai", "backend_config": {"base_url": "http://x/v1"}}
    )
    assert table.route("m", local, True) is None
    routed = table.route("m", local, False)  # cold here, warm there
    assert routed is not None and routed.name == "b/m"


def test_a_pinned_name_on_a_silent_peer_is_a_502_naming_it(tmp_path: Path) -> None:
    table = live_table(tmp_path, {"b": [model("b", "ready")]})
    table.peers["b"].last_ok = time.monotonic() - 3600
    with pytest.raises(BackendUnavailable, match="served by peer 'b'"):
        table.route("b/m", None, False)


def test_a_peer_with_its_own_ca_passes_it_on(tmp_path: Path) -> None:
    ca = certifi.where()
    table = peers_of(tmp_path, {"name": "b", "url": "https://b:1/", "ca_file": ca})
    peer = table.peers["b"]
    entry = peer.entry(model("b", "ready"), "me:1")
    assert entry.backend_config.ca_file == ca
    assert entry.backend_config.base_url == "https://b:1/v1"
    assert peer.ssl is not True  # its own context, not the session's default
