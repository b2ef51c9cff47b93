"""Other ImageWorks boxes (peers): their models appear in this proxy's ``/v1/models`` and requests
for them are forwarded to the box that serves them. Each box stays the owner of its own GPUs,
engines, queues and leases: a peer's model is, to this proxy, an OpenAI-compatible upstream.

Peers are configured by the operator only (``CHAT_PROXY_PEERS`` or ``<registry>/peers.json``),
never learnt over HTTP. A request this proxy forwards carries ``FORWARDED_HEADER``; a proxy that
receives one serves it from its own registry only, so a request crosses at most one hop and two
boxes that name each other never loop. The model lists are read with the same header (so a peer
lists only its own models). Admin actions are never forwarded.

Ids: a model served by one box keeps its logical name; a name served by several boxes is listed
once under that name (sent to a box where it is warm, this one first) and once per peer as
``peer/model`` to pin a box. A peer that has not answered for ``CHAT_PROXY_PEER_GRACE_S`` leaves
the list; requests for its models get 502 ``backend_unavailable`` naming it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from imageworks.chat_proxy.config import ConfigError, ProxyConfig
from imageworks.chat_proxy.engines.modelstate import READY
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.chat_proxy.redact import redact_text, redact_url
from imageworks.chat_proxy.upstream.egress import tls_context
from imageworks.chat_proxy.upstream.reading import TooLarge, read_capped
from imageworks.model_loader.schema import ModelEntry

log = logging.getLogger(__name__)

FORWARDED_HEADER = "x-imageworks-forwarded"
PEERS_FILE = "peers.json"

# What a peer's model list may weigh: a lying or broken peer must not fill this box's memory
# (a 100-byte id a model: tens of thousands of models).
MAX_MODELS_BYTES = 8 * 1024 * 1024
MAX_MODELS = 10_000


class PeerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    url: str = Field(pattern=r"^https?://")
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    ca_file: str | None = None


def load_peers(config: ProxyConfig) -> list[PeerConfig]:
    """The operator's list: ``CHAT_PROXY_PEERS`` (JSON), else ``<registry dir>/peers.json``."""
    source, text = "CHAT_PROXY_PEERS", config.peers.strip()
    path = config.registry_dir / PEERS_FILE
    if not text and path.is_file():
        source, text = str(path), path.read_text()
    if not text:
        return []
    try:
        peers = TypeAdapter(list[PeerConfig]).validate_python(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(
            f"{source}: not a list of peers {{name, url, api_key_env}}: {exc}"
        ) from None
    names = [p.name for p in peers]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: peer names must be unique ({names})")
    for peer in peers:  # a CA file that cannot be read fails the start, not every poll
        if peer.ca_file:
            try:
                tls_context(peer.ca_file)
            except BackendUnavailable as exc:
                raise ConfigError(f"{source}: peer {peer.name!r}: {exc.message}") from None
    return peers


@dataclass
class PeerModel:
    peer: str
    id: str  # as the peer lists it
    info: dict[str, Any]  # its ``imageworks`` extension

    @property
    def warm(self) -> bool:
        return self.info.get("state") == READY


@dataclass
class Peer:
    config: PeerConfig
    models: list[PeerModel] = field(default_factory=list)
    last_ok: float | None = None  # monotonic time of the last answer
    last_error: str | None = None
    seen: Any = None  # what the model list last showed of it

    @property
    def ssl(self) -> ssl.SSLContext | bool:
        """The egress's context for its CA file; True: the session's default context."""
        return tls_context(self.config.ca_file) if self.config.ca_file else True

    @property
    def name(self) -> str:
        return self.config.name

    def alive(self, now: float, grace_s: float) -> bool:
        return self.last_ok is not None and now - self.last_ok <= grace_s

    def entry(self, model: PeerModel, self_name: str) -> ModelEntry:
        """The peer's model as an upstream of ours: an ``openai`` entry pointing at the peer,
        marked as forwarded (so the peer never forwards it again)."""
        bc: dict[str, Any] = {
            "base_url": self.config.url.rstrip("/") + "/v1",
            "headers": {FORWARDED_HEADER: self_name},
        }
        if self.config.api_key_env:
            bc["api_key_env"] = self.config.api_key_env
        if self.config.ca_file:
            bc["ca_file"] = self.config.ca_file
        capabilities = model.info.get("capabilities")
        return ModelEntry.model_validate(
            {
                "name": f"{self.name}/{model.id}",
                "backend": "openai",
                "served_model_id": model.id,
                "backend_config": bc,
                "capabilities": capabilities if isinstance(capabilities, dict) else {},
                "metadata": {"peer": self.name},
            }
        )


@dataclass(frozen=True)
class Listed:
    """One id in this box's ``/v1/models`` that a peer serves."""

    id: str
    model: PeerModel
    boxes: list[str]


class Peers:
    """The peers' model lists, refreshed by a poll loop in the lifespan."""

    def __init__(self, config: ProxyConfig, session: Callable[[], aiohttp.ClientSession]) -> None:
        self.config = config
        self.peers = {p.name: Peer(p) for p in load_peers(config)}
        self._session = session
        # Who we are to a peer (in the forwarded header): our own address.
        self.self_name = f"{config.host}:{config.port}"
        self.version = 0  # bumped when what peers serve changes (the model list's cache key)

    def __bool__(self) -> bool:
        return bool(self.peers)

    # --- polling -------------------------------------------------------------------------------

    async def poll_loop(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.config.peer_poll_s)

    async def poll(self) -> None:
        await asyncio.gather(*(self._poll(peer) for peer in self.peers.values()))

    async def _poll(self, peer: Peer) -> None:
        try:
            peer.models = await self._models(peer)
            peer.last_ok, peer.last_error = time.monotonic(), None
        except (aiohttp.ClientError, TimeoutError, ValueError, BackendUnavailable) as exc:
            peer.last_error = str(exc) or type(exc).__name__
            log.debug("peer %s did not answer: %s", peer.name, peer.last_error)
        except Exception as exc:  # whatever a peer sends, the loop polling every peer goes on
            peer.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("peer %s: unexpected answer: %s", peer.name, peer.last_error)
        # Compared with what the last poll saw: a peer falls silent between polls, by time.
        seen = (self._alive(peer), [(m.id, m.info.get("state")) for m in peer.models])
        if seen != peer.seen:
            peer.seen = seen
            self.version += 1

    async def _models(self, peer: Peer) -> list[PeerModel]:
        headers = {FORWARDED_HEADER: self.self_name}
        if peer.config.api_key_env:
            key = os.environ.get(peer.config.api_key_env)
            if not key:
                raise BackendUnavailable(f"peer key variable {peer.config.api_key_env} is not set")
            headers["authorization"] = f"Bearer {key}"
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.config.peer_poll_s))
        async with self._session().get(
            peer.config.url.rstrip("/") + "/v1/models",
            headers=headers,
            timeout=timeout,
            ssl=peer.ssl,
        ) as response:
            if response.status != 200:
                raise ValueError(f"GET /v1/models answered {response.status}")
            try:
                body = await read_capped(response, MAX_MODELS_BYTES)
            except TooLarge:
                raise ValueError(
                    f"GET /v1/models is larger than {MAX_MODELS_BYTES} bytes"
                ) from None
            data = json.loads(body)
        listed = data.get("data") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            raise ValueError("GET /v1/models is not an OpenAI model list ({'data': [...]})")
        found: dict[str, PeerModel] = {}
        for item in listed[:MAX_MODELS]:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                continue
            info = item.get("imageworks")
            model = PeerModel(peer.name, item["id"], info if isinstance(info, dict) else {})
            if model.id in found or not self._usable(peer, model):
                continue
            found[model.id] = model
        return list(found.values())

    def _usable(self, peer: Peer, model: PeerModel) -> bool:
        """Can a request be sent to it? Checked here, once a poll, so that an id or
        capabilities this box cannot take (blank, padded, a wrong type) leave the model out of
        the list instead of failing the requests for it."""
        if not model.id.strip() or len(model.id) > 256 or not model.id.isprintable():
            return False
        try:
            peer.entry(model, self.self_name)
        except ValidationError:
            log.debug("peer %s: model %r left out (not a valid entry here)", peer.name, model.id)
            return False
        return True

    def _alive(self, peer: Peer) -> bool:
        return peer.alive(time.monotonic(), self.config.peer_grace_s)

    # --- what the other modules ask ------------------------------------------------------------

    def listed(self, local: set[str]) -> list[Listed]:
        """The peers' models as this box lists them, given the ids listed locally."""
        live = [p for p in self.peers.values() if self._alive(p)]
        boxes: dict[str, list[str]] = {}
        for peer in live:
            for model in peer.models:
                boxes.setdefault(model.id, []).append(peer.name)
        out: list[Listed] = []
        for peer in live:
            for model in peer.models:
                where = (["local"] if model.id in local else []) + boxes[model.id]
                if len(where) > 1:
                    out.append(Listed(f"{peer.name}/{model.id}", model, where))
                    if model.id not in local and boxes[model.id][0] == peer.name:
                        out.append(Listed(model.id, self._warmest(model.id, live), where))
                else:
                    out.append(Listed(model.id, model, where))
        return out

    def route(self, name: str, local: ModelEntry | None, local_warm: bool) -> ModelEntry | None:
        """The entry a request for ``name`` goes to when a peer serves it (None: serve it
        here). A name several boxes serve goes where it is warm, this box first."""
        pinned = self._pinned(name)
        if pinned is not None:
            return pinned
        if local is not None and (local_warm or not self.peers or local.name != name):
            return None  # warm here, or the name is an alias of ours: another model elsewhere
        candidates = [
            (peer, model)
            for peer in self.peers.values()
            for model in peer.models
            if model.id == name
        ]
        if not candidates:
            return None
        live = [(p, m) for p, m in candidates if self._alive(p)]
        if local is not None and not any(m.warm for _, m in live):
            return None  # warm nowhere: start it here rather than on someone else's box
        if not live:
            raise self._down(candidates[0][0], name)
        peer, model = next(((p, m) for p, m in live if m.warm), live[0])
        return peer.entry(model, self.self_name)

    def _pinned(self, name: str) -> ModelEntry | None:
        box, _, model_id = name.partition("/")
        peer = self.peers.get(box)
        if peer is None or not model_id:
            return None
        model = next((m for m in peer.models if m.id == model_id), None)
        if model is None:
            return None
        if not self._alive(peer):
            raise self._down(peer, name)
        return peer.entry(model, self.self_name)

    def _warmest(self, model_id: str, live: list[Peer]) -> PeerModel:
        found = [m for p in live for m in p.models if m.id == model_id]
        return next((m for m in found if m.warm), found[0])

    def _down(self, peer: Peer, name: str) -> BackendUnavailable:
        silent = (
            f"has not answered for {time.monotonic() - peer.last_ok:.0f} s"
            if peer.last_ok is not None
            else "has not answered yet"
        )
        why = f" ({peer.last_error})" if peer.last_error else ""
        return BackendUnavailable(
            f"model {name!r} is served by peer {peer.name!r} ({peer.config.url}), which "
            f"{silent}{why}"
        )

    def public(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "name": p.name,
                "url": redact_url(p.config.url),
                "alive": self._alive(p),
                "last_ok_s_ago": None if p.last_ok is None else round(now - p.last_ok, 1),
                "last_error": None if p.last_error is None else redact_text(p.last_error),
                "models": [m.id for m in p.models],
            }
            for p in self.peers.values()
        ]
