"""A typed client for the proxy's HTTP API, as the console uses it (no Streamlit here).

Every call either returns data or raises ``ProxyDown`` (nothing answers at that address) or
``ProxyRequestFailed`` (the proxy answered with an error; its message is kept).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8100"


class ProxyDown(RuntimeError):
    pass


class ProxyRequestFailed(RuntimeError):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ModelRow:
    name: str
    backend: str
    state: str
    in_flight: int
    managed: bool
    visible: bool
    last_error: str | None = None
    load_ms: float | None = None
    since: float | None = None
    capabilities: list[str] = field(default_factory=list)
    vram_estimate_mb: int | None = None
    restart: str | None = None  # the registry's restart policy (managed models)
    retry_in_s: float = 0.0  # backoff left before the next automatic start
    halted: str | None = None  # a crash loop: only a manual activation starts it again
    idle_unload_in_s: float | None = None  # seconds before an idle unload (None: not counting)
    pinned: bool = False
    last_used_s_ago: float | None = None  # None: no request since the proxy started
    devices: list[int] = field(default_factory=list)  # GPU indices it runs on (when known)
    location: dict[str, Any] | None = None  # {"kind": "local" | "peer" | "ray", ...}


@dataclass(frozen=True)
class DeviceModel:
    name: str
    vram_mb: int
    in_flight: int = 0


@dataclass(frozen=True)
class Lease:
    owner: str
    reason: str
    age_s: float
    time_left_s: float | None
    evicted: list[str]
    restart_model: bool
    device: int | None = None


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    total_mb: int
    used_mb: int
    free_mb: int
    ours_mb: int  # held by engines this proxy runs
    foreign_mb: int  # held by anything else
    models: list[DeviceModel]
    foreign: list[DeviceModel]
    lease: Lease | None


@dataclass(frozen=True)
class GpuView:
    """The GPU as the proxy sees it. ``budget``: ``measured`` (NVML or a simulated GPU),
    ``declared`` (CHAT_PROXY_GPU_TOTAL_MB, nothing measured) or ``none``."""

    budget: str
    probe: str
    devices: list[GpuDevice]
    leases: list[Lease]
    pending: int


@dataclass(frozen=True)
class LogTail:
    model: str
    source: str
    exists: bool
    lines: list[str]


def _lease(data: dict[str, Any] | None, device: int | None = None) -> Lease | None:
    if not data:
        return None
    expires = data.get("expires_at")
    return Lease(
        str(data.get("owner", "")),
        str(data.get("reason") or ""),
        float(data.get("age_s") or 0.0),
        max(0.0, float(expires) - time.time()) if expires else None,
        list(data.get("evicted") or []),
        bool(data.get("restart_model", True)),
        data.get("device", device),
    )


def _held(items: list[dict[str, Any]] | None) -> list[DeviceModel]:
    return [
        DeviceModel(str(i["name"]), int(i.get("vram_mb") or 0), int(i.get("in_flight") or 0))
        for i in items or []
    ]


def gpu_view(status: dict[str, Any]) -> GpuView:
    """Read ``/v1/gpu/status``: one card per device from ``devices``; a proxy that predates
    it has one GPU summary (``gpu``) with the models and foreign holders at the top level."""
    probe = str(status.get("probe") or "none")
    devices: list[GpuDevice] = []
    for d in status.get("devices") or []:
        devices.append(
            GpuDevice(
                int(d["index"]),
                str(d.get("name") or f"GPU {d['index']}"),
                int(d.get("total_mb") or 0),
                int(d.get("used_mb") or 0),
                int(d.get("free_mb") or 0),
                int(d.get("ours_mb") or 0),
                int(d.get("foreign_mb") or 0),
                _held(d.get("models")),
                _held(d.get("foreign")),
                _lease(d.get("lease"), int(d["index"])),
            )
        )
    card = status.get("gpu")
    if not devices and card:
        models, foreign = _held(status.get("models")), _held(status.get("foreign"))
        devices.append(
            GpuDevice(
                0,
                str(card.get("name") or "GPU 0"),
                int(card["total_mb"]),
                int(card["used_mb"]),
                int(card["free_mb"]),
                sum(m.vram_mb for m in models),
                sum(f.vram_mb for f in foreign),
                models,
                foreign,
                _lease(status.get("lease"), 0),
            )
        )
    if "leases" in status:
        leases = [lease for lease in map(_lease, status["leases"] or []) if lease]
    else:
        one = _lease(status.get("lease"))
        leases = [one] if one else []
    # Before ``budget`` was reported, a card with no probe was the declared budget.
    budget = status.get("budget") or (
        "none" if not card else "declared" if probe == "none" else "measured"
    )
    return GpuView(str(budget), probe, devices, leases, len(status.get("pending") or []))


class ReplyStream:
    """A streamed chat completion through the proxy, as any client sees it. Iterate for the
    text; afterwards ``ttft_ms``, ``total_ms``, ``tokens`` and ``tokens_per_s`` are set."""

    def __init__(self, response: httpx.Response, started: float, client: httpx.Client) -> None:
        self._response = response
        self._client = client
        self._started = started
        self.ttft_ms: float | None = None
        self.total_ms: float | None = None
        self.tokens = 0
        self.usage_reported = False
        self.finish_reason: str | None = None
        self._first_at: float | None = None

    def __iter__(self) -> Iterator[str]:
        chunks = 0
        try:
            for line in self._response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    raise ProxyRequestFailed(200, str(error.get("message")), error.get("code"))
                if event.get("usage"):
                    self.tokens = int(event["usage"].get("completion_tokens") or 0)
                    self.usage_reported = True
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    if text:
                        if self._first_at is None:
                            self._first_at = time.monotonic()
                            self.ttft_ms = (self._first_at - self._started) * 1000
                        chunks += 1
                        yield text
        except httpx.TransportError as exc:
            raise ProxyDown(f"the stream from the chat proxy broke off ({exc})") from None
        finally:
            self._response.close()
            self._client.close()
            self.total_ms = (time.monotonic() - self._started) * 1000
            if not self.usage_reported:
                self.tokens = chunks  # one token per streamed piece: llama.cpp and vLLM send so

    @property
    def tokens_per_s(self) -> float | None:
        if self._first_at is None or self.total_ms is None or self.tokens < 2:
            return None
        generating_s = self.total_ms / 1000 - (self._first_at - self._started)
        return self.tokens / generating_s if generating_s > 0 else None


@dataclass(frozen=True)
class Health:
    status: str
    version: str
    uptime_s: float
    profile: str
    models: int
    registry_error: str | None


class ProxyClient:
    def __init__(
        self, base_url: str | None = None, *, admin_token: str | None = None, timeout: float = 10.0
    ) -> None:
        self.base_url = (
            base_url or os.environ.get("IMAGEWORKS_CHAT_PROXY_URL") or DEFAULT_URL
        ).rstrip("/")
        token = admin_token if admin_token is not None else os.environ.get("CHAT_PROXY_ADMIN_TOKEN")
        keys = [k.strip() for k in os.environ.get("CHAT_PROXY_API_KEYS", "").split(",")]
        key = next((k for k in keys if k), None)
        # An API key for /v1/* (and for /admin/* when no admin token is set), the admin token
        # in its own header: the proxy accepts each where it applies.
        self._headers = {}
        if key or token:
            self._headers["authorization"] = f"Bearer {key or token}"
        if token:
            self._headers["x-admin-token"] = token
        self.timeout = timeout

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        try:
            response = httpx.request(
                method,
                self.base_url + path,
                json=body,
                headers=self._headers,
                timeout=timeout or self.timeout,
            )
        except httpx.TransportError as exc:
            raise ProxyDown(f"the chat proxy is not reachable at {self.base_url} ({exc})") from None
        _raise_for_error(response)
        return response.json()

    # --- reads -----------------------------------------------------------------------------

    def is_up(self) -> bool:
        """Does the proxy answer at all (an error answer counts: it is there)?"""
        try:
            self.health()
        except ProxyDown:
            return False
        except ProxyRequestFailed:
            return True
        return True

    def health(self) -> Health:
        data = self._call("GET", "/v1/healthz", timeout=3)
        return Health(
            data["status"],
            data.get("version", ""),
            data.get("uptime_s", 0.0),
            data.get("profile", ""),
            data.get("models", 0),
            data.get("registry_error"),
        )

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = self._call("GET", "/admin/state")
        return data

    def models(self) -> list[ModelRow]:
        """Every registry entry with its live state, and capabilities where it is listed."""
        listed = {m["id"]: m for m in self._call("GET", "/v1/models")["data"]}
        rows = []
        for model in self.state()["models"]:
            info = listed.get(model["name"], {}).get("imageworks", {})
            caps = sorted(k for k, v in (info.get("capabilities") or {}).items() if v)
            rows.append(
                ModelRow(
                    model["name"],
                    model.get("backend") or "?",  # a peer's model may not say
                    model.get("state") or "unknown",
                    model.get("in_flight") or 0,
                    bool(model.get("managed")),
                    bool(model.get("visible")),
                    model.get("last_error"),
                    model.get("load_ms"),
                    model.get("since"),
                    caps,
                    restart=model.get("restart"),
                    retry_in_s=(model.get("restarts") or {}).get("retry_in_s") or 0.0,
                    halted=(model.get("restarts") or {}).get("halted"),
                    idle_unload_in_s=model.get("idle_unload_in_s"),
                    pinned=bool(model.get("pinned")),
                    last_used_s_ago=model.get("last_used_s_ago"),
                    devices=list(model.get("devices") or []),
                    location=model.get("location"),
                )
            )
        return rows

    def recent_requests(self, limit: int = 100) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._call("GET", f"/admin/requests?limit={limit}")["data"]
        return data

    def gpu(self) -> dict[str, Any]:
        data: dict[str, Any] = self._call("GET", "/v1/gpu/status")
        return data

    def gpu_view(self) -> GpuView:
        return gpu_view(self.gpu())

    def engine_log(self, name: str, source: str = "engine", lines: int = 200) -> LogTail:
        """The last ``lines`` of a model's engine log (``engine``) or of the vLLM executor's log
        of it (``executor``), read by the proxy from its staging dir."""
        query = httpx.QueryParams({"model": name, "source": source, "lines": lines})
        data = self._call("GET", f"/admin/logs?{query}")
        return LogTail(data["model"], data["source"], bool(data["exists"]), list(data["lines"]))

    def registry(self) -> dict[str, Any]:
        """The merged entries with the layer each field came from, and the held-off error."""
        data: dict[str, Any] = self._call("GET", "/admin/registry")
        return data

    def autostart(self) -> bool:
        return bool(self._call("GET", "/admin/autostart")["enabled"])

    def profile(self) -> tuple[str, list[str]]:
        data = self._call("GET", "/admin/profile")
        return data["name"], [p["name"] for p in data["profiles"]]

    # --- actions ---------------------------------------------------------------------------

    def activate(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = self._call("POST", "/admin/activate", {"model": name}, timeout=900)
        return data

    def deactivate(self, name: str | None = None) -> list[str]:
        body = {"model": name} if name else None
        stopped: list[str] = self._call("POST", "/admin/deactivate", body, timeout=300)["stopped"]
        return stopped

    def restart(self, name: str) -> dict[str, Any]:
        """Stop the model, then start it again; answers once it is ready."""
        self.deactivate(name)
        return self.activate(name)

    def force_release(self, owner: str | None = None) -> dict[str, Any]:
        """End the GPU lease (only ``owner``'s, so a lease granted since is not cut)."""
        body = {"owner": owner} if owner else None
        data: dict[str, Any] = self._call("POST", "/v1/gpu/force_release", body)
        return data

    def chat_stream(self, model: str, prompt: str, max_tokens: int = 256) -> ReplyStream:
        """Send ``prompt`` to ``model`` through the proxy, streamed, as any client would."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.monotonic()
        client = httpx.Client(headers=self._headers, timeout=httpx.Timeout(900, connect=5))
        try:
            request = client.build_request(
                "POST", self.base_url + "/v1/chat/completions", json=body
            )
            response = client.send(request, stream=True)
        except httpx.TransportError as exc:
            client.close()
            raise ProxyDown(f"the chat proxy is not reachable at {self.base_url} ({exc})") from None
        if response.status_code >= 400:
            response.read()
            client.close()
            _raise_for_error(response)
        return ReplyStream(response, started, client)

    def set_autostart(self, enabled: bool) -> bool:
        return bool(self._call("PUT", "/admin/autostart", {"enabled": enabled})["enabled"])

    def set_profile(self, name: str) -> str:
        return str(self._call("PUT", "/admin/profile", {"name": name})["name"])

    def reload_registry(self) -> dict[str, Any]:
        data: dict[str, Any] = self._call("POST", "/admin/registry/reload")
        return data


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message, code = str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = response.text[:300], None
    raise ProxyRequestFailed(response.status_code, message, code)
