"""A typed client for the proxy's HTTP API, as the console uses it (no Streamlit here).

Every call either returns data or raises ``ProxyDown`` (nothing answers at that address, or
nothing within the call's time limit) or ``ProxyRequestFailed`` (the proxy answered with an
error; its message is kept). An answer the console cannot read (not JSON, missing fields,
text where numbers belong: another program at that address, or another version) is a
``ProxyBadAnswer``, a kind of ``ProxyRequestFailed``, so no page shows a traceback for it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8100"
# No answer of the proxy's API is near this: more is not the proxy, and is not kept in memory.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
# Colour codes and other escape sequences an engine writes to its log, and control characters.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class ProxyDown(RuntimeError):
    pass


class ProxyRequestFailed(RuntimeError):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ProxyBadAnswer(ProxyRequestFailed):
    """The proxy's answer is not what the console reads."""


@contextmanager
def _reading(what: str, status: int = 200) -> Iterator[None]:
    """Turn a malformed answer (a missing key, a string where a number belongs, a list where an
    object belongs) into a ``ProxyBadAnswer`` naming ``what`` was read."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        raise ProxyBadAnswer(
            status, f"the proxy's answer to {what} is not what the console reads ({exc!r})"
        ) from None


def printable(line: str) -> str:
    """A log line without terminal escape sequences and control characters (tabs stay)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", line))


def _mb(value: Any) -> int:
    """Memory in MB as the console shows it: never negative."""
    return max(0, int(value or 0))


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


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
    wake_ms: float | None = None  # vLLM sleep mode: the last wake, measured
    host_mb: int | None = None  # host RAM it holds while sleeping


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
    # Telemetry, where the proxy's probe reads it (NVML, the simulated GPU): None otherwise.
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None


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
        DeviceModel(str(i["name"]), _mb(i.get("vram_mb")), max(0, int(i.get("in_flight") or 0)))
        for i in items or []
    ]


def _telemetry(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def gpu_view(status: dict[str, Any]) -> GpuView:
    """Read ``/v1/gpu/status``: one card per device from ``devices``; a proxy that predates
    it has one GPU summary (``gpu``) with the models and foreign holders at the top level."""
    with _reading("GET /v1/gpu/status"):
        return _gpu_view(status)


def _gpu_view(status: dict[str, Any]) -> GpuView:
    probe = str(status.get("probe") or "none")
    devices: list[GpuDevice] = []
    for d in status.get("devices") or []:
        devices.append(
            GpuDevice(
                int(d["index"]),
                str(d.get("name") or f"GPU {d['index']}"),
                _mb(d.get("total_mb")),
                _mb(d.get("used_mb")),
                _mb(d.get("free_mb")),
                _mb(d.get("ours_mb")),
                _mb(d.get("foreign_mb")),
                _held(d.get("models")),
                _held(d.get("foreign")),
                _lease(d.get("lease"), int(d["index"])),
                _telemetry(d.get("utilization_pct")),
                _telemetry(d.get("temperature_c")),
                _telemetry(d.get("power_w")),
            )
        )
    card = status.get("gpu")
    if not devices and card:
        models, foreign = _held(status.get("models")), _held(status.get("foreign"))
        devices.append(
            GpuDevice(
                0,
                str(card.get("name") or "GPU 0"),
                _mb(card["total_mb"]),
                _mb(card["used_mb"]),
                _mb(card["free_mb"]),
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
                with _reading("the chat stream"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                        raise ProxyRequestFailed(200, str(error.get("message")), error.get("code"))
                    if event.get("usage"):
                        self.tokens = int(event["usage"].get("completion_tokens") or 0)
                        self.usage_reported = True
                    pieces = []
                    for choice in event.get("choices") or []:
                        pieces.append(str((choice.get("delta") or {}).get("content") or ""))
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
                for text in pieces:
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
    ) -> dict[str, Any]:
        """One call, its whole answer within ``timeout`` (httpx's own limits are per read: a
        proxy trickling a byte at a time would hold the page forever) and within
        ``MAX_ANSWER_BYTES``; the answer must be a JSON object."""
        limit = timeout or self.timeout
        deadline = time.monotonic() + limit
        received = bytearray()
        try:
            with httpx.stream(
                method, self.base_url + path, json=body, headers=self._headers, timeout=limit
            ) as response:
                for chunk in response.iter_bytes():
                    received += chunk
                    if time.monotonic() > deadline:
                        raise ProxyDown(
                            f"the chat proxy at {self.base_url} did not answer "
                            f"{method} {path} within {limit:g} s"
                        )
                    if len(received) > MAX_ANSWER_BYTES:
                        raise ProxyBadAnswer(
                            response.status_code,
                            f"the answer to {method} {path} is over {MAX_ANSWER_BYTES} bytes",
                        )
        except httpx.TimeoutException:
            raise ProxyDown(
                f"the chat proxy at {self.base_url} did not answer {method} {path} "
                f"within {limit:g} s"
            ) from None
        except httpx.TransportError as exc:
            raise ProxyDown(f"the chat proxy is not reachable at {self.base_url} ({exc})") from None
        _raise_for_error(response.status_code, bytes(received))
        try:
            data = json.loads(received)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ProxyBadAnswer(
                response.status_code, f"the answer to {method} {path} is not a JSON object"
            )
        return data

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
        with _reading("GET /v1/healthz"):
            error = data.get("registry_error")
            return Health(
                str(data["status"]),
                str(data.get("version", "")),
                float(data.get("uptime_s") or 0.0),
                str(data.get("profile", "")),
                int(data.get("models") or 0),
                None if error is None else str(error),
            )

    def state(self) -> dict[str, Any]:
        """``/admin/state`` with its ``models`` (a list of objects, each with a name) and its
        ``config`` (an object) checked, so pages can read them."""
        data = self._call("GET", "/admin/state")
        with _reading("GET /admin/state"):
            # A row without a name cannot be shown or acted on: left out, the others shown.
            data["models"] = [
                m for m in data["models"] if isinstance(m, dict) and isinstance(m.get("name"), str)
            ]
            data["config"] = dict(data.get("config") or {})
        return data

    def models(self) -> list[ModelRow]:
        """Every registry entry with its live state, and capabilities where it is listed."""
        models = self._call("GET", "/v1/models")
        with _reading("GET /v1/models"):
            listed = {m["id"]: m for m in models["data"]}
        states = self.state()["models"]
        with _reading("GET /admin/state"):
            return [_row(model, listed.get(model["name"]) or {}) for model in states]

    def recent_requests(self, limit: int = 100) -> list[dict[str, Any]]:
        """The request records (objects; anything else in the list is left out)."""
        data = self._call("GET", f"/admin/requests?limit={limit}")
        with _reading("GET /admin/requests"):
            return [record for record in data["data"] if isinstance(record, dict)]

    def gpu(self) -> dict[str, Any]:
        return self._call("GET", "/v1/gpu/status")

    def gpu_view(self) -> GpuView:
        return gpu_view(self.gpu())

    def engine_log(self, name: str, source: str = "engine", lines: int = 200) -> LogTail:
        """The last ``lines`` of a model's engine log (``engine``) or of the vLLM executor's log
        of it (``executor``), read by the proxy from its staging dir."""
        query = httpx.QueryParams({"model": name, "source": source, "lines": lines})
        data = self._call("GET", f"/admin/logs?{query}")
        with _reading("GET /admin/logs"):
            return LogTail(
                str(data["model"]),
                str(data["source"]),
                bool(data["exists"]),
                [printable(str(line)) for line in data["lines"]],
            )

    def registry(self) -> dict[str, Any]:
        """The merged entries with the layer each field came from, and the held-off error,
        every field the Registry page reads present and of its type."""
        data = self._call("GET", "/admin/registry")
        with _reading("GET /admin/registry"):
            error = data.get("last_error")
            return {
                "version": str(data.get("version") or "?"),
                "directory": str(data.get("directory") or "?"),
                "profile": str(data.get("profile") or "?"),
                "last_error": None if error is None else str(error),
                "entries": [_registry_item(item) for item in data["entries"]],
            }

    def autostart(self) -> bool:
        return bool(self._call("GET", "/admin/autostart").get("enabled"))

    def profile(self) -> tuple[str, list[str]]:
        """The active profile and every profile's name (the active one among them)."""
        data = self._call("GET", "/admin/profile")
        with _reading("GET /admin/profile"):
            active = str(data["name"])
            names = [str(p["name"]) for p in data["profiles"]]
        return active, names if active in names else [*names, active]

    # --- actions ---------------------------------------------------------------------------

    def activate(self, name: str) -> dict[str, Any]:
        """The model's state once it is ready (``state`` always present)."""
        data = self._call("POST", "/admin/activate", {"model": name}, timeout=900)
        data["state"] = str(data.get("state") or "unknown")
        return data

    def deactivate(self, name: str | None = None) -> list[str]:
        body = {"model": name} if name else None
        data = self._call("POST", "/admin/deactivate", body, timeout=300)
        with _reading("POST /admin/deactivate"):
            return [str(stopped) for stopped in data["stopped"]]

    def restart(self, name: str) -> dict[str, Any]:
        """Stop the model, then start it again; answers once it is ready."""
        self.deactivate(name)
        return self.activate(name)

    def force_release(self, owner: str | None = None) -> dict[str, Any]:
        """End the GPU lease (only ``owner``'s, so a lease granted since is not cut)."""
        body = {"owner": owner} if owner else None
        return self._call("POST", "/v1/gpu/force_release", body)

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
            try:
                content = b"".join(_bounded(response.iter_bytes()))
            except httpx.TransportError:
                content = b""
            finally:
                response.close()
                client.close()
            _raise_for_error(response.status_code, content)
        return ReplyStream(response, started, client)

    def set_autostart(self, enabled: bool) -> bool:
        return bool(self._call("PUT", "/admin/autostart", {"enabled": enabled}).get("enabled"))

    def set_profile(self, name: str) -> str:
        return str(self._call("PUT", "/admin/profile", {"name": name}).get("name") or name)

    def reload_registry(self) -> dict[str, Any]:
        """``version`` and ``entries`` (their count) of the registry now in service."""
        data = self._call("POST", "/admin/registry/reload")
        with _reading("POST /admin/registry/reload"):
            return {**data, "version": str(data["version"]), "entries": int(data["entries"])}


def _bounded(chunks: Iterator[bytes]) -> Iterator[bytes]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > MAX_ANSWER_BYTES:
            return
        yield chunk


def _row(model: dict[str, Any], listed: dict[str, Any]) -> ModelRow:
    """One ``/admin/state`` row, each field of its type (a missing one takes its default)."""
    info = listed.get("imageworks") or {}
    caps = sorted(str(k) for k, v in (info.get("capabilities") or {}).items() if v)
    restarts = model.get("restarts") or {}
    location = model.get("location")
    error = model.get("last_error")
    return ModelRow(
        model["name"],
        str(model.get("backend") or "?"),  # a peer's model may not say
        str(model.get("state") or "unknown"),
        max(0, int(model.get("in_flight") or 0)),
        bool(model.get("managed")),
        bool(model.get("visible")),
        None if error is None else printable(str(error)),  # it may hold the engine's output
        _seconds(model.get("load_ms")),
        _seconds(model.get("since")),
        caps,
        restart=None if model.get("restart") is None else str(model["restart"]),
        retry_in_s=float(restarts.get("retry_in_s") or 0.0),
        halted=None if restarts.get("halted") is None else str(restarts["halted"]),
        idle_unload_in_s=_seconds(model.get("idle_unload_in_s")),
        pinned=bool(model.get("pinned")),
        last_used_s_ago=_seconds(model.get("last_used_s_ago")),
        devices=[int(d) for d in model.get("devices") or []],
        location=dict(location) if location else None,
        wake_ms=_seconds(model.get("wake_ms")),
        host_mb=int(model["host_mb"]) if isinstance(model.get("host_mb"), int) else None,
    )


def _registry_item(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": str(item["name"]),
        "visible": bool(item.get("visible", True)),
        "entry": dict(item.get("entry") or {}),
        "origins": {str(k): str(v) for k, v in (item.get("origins") or {}).items()},
        "sources": [
            {
                "layer": str(s.get("layer") or "?"),
                "file": str(s.get("file") or "?"),
                "index": s.get("index", "?"),
            }
            for s in item.get("sources") or []
        ],
    }


def _raise_for_error(status: int, content: bytes) -> None:
    if status < 400:
        return
    try:
        error = json.loads(content)["error"]
        message, code = str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = content[:300].decode("utf-8", "replace"), None
    raise ProxyRequestFailed(status, message, code)
