"""A typed client for the proxy's HTTP API, as the console uses it (no Streamlit here).

Every call either returns data or raises ``ProxyDown`` (nothing answers at that address) or
``ProxyRequestFailed`` (the proxy answered with an error; its message is kept).
"""

from __future__ import annotations

import os
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
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise ProxyRequestFailed(response.status_code, error["message"], error.get("code"))
            except (ValueError, KeyError, TypeError):
                raise ProxyRequestFailed(response.status_code, response.text[:300]) from None
        return response.json()

    # --- reads -----------------------------------------------------------------------------

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
                    model["backend"],
                    model["state"],
                    model["in_flight"],
                    model["managed"],
                    model["visible"],
                    model.get("last_error"),
                    model.get("load_ms"),
                    model.get("since"),
                    caps,
                    restart=model.get("restart"),
                    retry_in_s=(model.get("restarts") or {}).get("retry_in_s") or 0.0,
                    halted=(model.get("restarts") or {}).get("halted"),
                )
            )
        return rows

    def recent_requests(self, limit: int = 100) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._call("GET", f"/admin/requests?limit={limit}")["data"]
        return data

    def gpu(self) -> dict[str, Any]:
        data: dict[str, Any] = self._call("GET", "/v1/gpu/status")
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

    def set_autostart(self, enabled: bool) -> bool:
        return bool(self._call("PUT", "/admin/autostart", {"enabled": enabled})["enabled"])

    def set_profile(self, name: str) -> str:
        return str(self._call("PUT", "/admin/profile", {"name": name})["name"])

    def reload_registry(self) -> dict[str, Any]:
        data: dict[str, Any] = self._call("POST", "/admin/registry/reload")
        return data
