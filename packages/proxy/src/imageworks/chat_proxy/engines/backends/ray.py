"""``backend: "ray"``: a model is a Ray Serve application on a Ray cluster.

Activate deploys the entry's application through the Serve REST API on the Ray dashboard
(``PUT /api/serve/applications/``), deactivate removes it, and the state comes from
``GET /api/serve/applications/``. Requests go to Serve's HTTP proxy under the application's route
prefix. Ray places the application on its nodes and GPUs, so this proxy's VRAM arbiter does not
budget these entries (``uses_gpu`` is False) and leases do not hold them back.

The PUT is declarative: it replaces every application on the cluster. So each change reads the
current config, changes only our application (``imageworks-`` names), carries everyone else's
over as deployed, and reads again just before writing: if anything changed in between, it starts
over. What remains is the gap between that second read and the PUT itself (milliseconds): an
application another client deploys inside it is overwritten, and Ray offers nothing to close it
(no version or compare-and-set on this API). Changes made by this proxy are serialised by a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.backends import ray_apps
from imageworks.chat_proxy.engines.backends.base import Backend, StartRequest
from imageworks.chat_proxy.errors import (
    BackendUnavailable,
    ModelStartFailed,
    ModelStartTimeout,
    ProxyError,
)
from imageworks.model_loader.schema import ModelEntry

API = "/api/serve/applications/"
POLL_S = 0.5
WRITE_ATTEMPTS = 5
STOP_TIMEOUT_S = 120.0
# Far above any real cluster's Serve status (a few KB an application); a dashboard that answers
# more is not one this proxy can carry over anyway.
MAX_ANSWER_BYTES = 32 * 1024 * 1024
FAILED_STATES = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})
GONE_STATES = FAILED_STATES | {"DELETING", "NOT_STARTED"}


class RayBackend(Backend):
    kind = "ray"
    budgeted_elsewhere = "placed and budgeted by the Ray cluster, not by this proxy's arbiter"

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self._writing = asyncio.Lock()
        serve = urlsplit(config.ray_serve_url)
        self._serve_host_port = (serve.hostname or "127.0.0.1", serve.port or 8000)

    def location(self, entry: ModelEntry) -> dict[str, Any]:
        return {
            "kind": "ray",
            "application": ray_apps.app_name(entry.name),
            "cluster": self.config.ray_dashboard_url,
        }

    def uses_gpu(self, entry: ModelEntry) -> bool:
        return False  # Ray places it and budgets its GPUs; our arbiter never sees it

    def slot_key(self, entry: ModelEntry) -> str | None:
        return "ray:" + ray_apps.app_name(entry.name)  # each application is its own slot

    def base_url(self, entry: ModelEntry) -> str:
        prefix = ray_apps.route_prefix(entry)
        return self.config.ray_serve_url + ("" if prefix == "/" else prefix) + "/v1"

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, request: StartRequest) -> str:
        entry, log_path, timeout = request.entry, request.log_path, request.timeout
        app = ray_apps.application(entry)
        name = app["name"]
        await asyncio.to_thread(
            _note, log_path, f"deploying Serve application {name!r} through {self._dashboard}"
        )
        await self._write(name, app)
        deadline = time.monotonic() + timeout
        try:
            while True:
                details = (await self._read()).get("applications", {}).get(name)
                status = details.get("status") if details else None
                if status == "RUNNING":
                    break
                if status in FAILED_STATES:
                    assert details is not None
                    await asyncio.to_thread(_note, log_path, str(details.get("message")))
                    raise ModelStartFailed(
                        f"Ray Serve could not deploy {name!r} for {entry.name!r} ({status}): "
                        f"{ray_apps.ray_message(details)}"
                    )
                if time.monotonic() > deadline:
                    raise ModelStartTimeout(
                        f"Ray Serve application {name!r} is still {status or 'absent'} after "
                        f"{timeout:.0f} s"
                    )
                await asyncio.sleep(POLL_S)
        except BaseException:
            # Nothing we asked for may stay behind a failed start (Ray would keep retrying it).
            await asyncio.shield(self._remove_quietly(name))
            raise
        base = self.base_url(entry)
        await asyncio.to_thread(_note, log_path, f"ready at {base}")
        return base

    async def stop(self, name: str) -> None:
        await self._remove(ray_apps.app_name(name))

    async def _remove(self, app: str) -> None:
        """Remove the application and wait until Ray has deleted it (its replicas gone)."""
        if app not in ((await self._read()).get("applications") or {}):
            return
        await self._write(app, None)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while app in ((await self._read()).get("applications") or {}):
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"Ray Serve has not deleted {app!r} after {STOP_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(POLL_S)

    async def reconcile(self, entry: ModelEntry) -> bool | None:
        """Ray's word on our application; an unreachable dashboard: cannot tell."""
        try:
            apps = (await self._read()).get("applications") or {}
        except ProxyError:
            return None
        details = apps.get(ray_apps.app_name(entry.name))
        return details is not None and details.get("status") not in GONE_STATES

    async def recover(self, entries: Iterable[ModelEntry]) -> dict[str, str]:
        """An application of ours still running as this proxy would deploy it is adopted. Other
        ``imageworks-`` applications are left alone: another box may share the cluster."""
        try:
            apps = (await self._read()).get("applications") or {}
        except ProxyError:
            return {}
        found: dict[str, str] = {}
        for entry in entries:
            try:
                wanted = ray_apps.application(entry)
            except ProxyError:
                continue
            details = apps.get(wanted["name"])
            if (
                details
                and details.get("status") == "RUNNING"
                and details.get("deployed_app_config") == wanted
            ):
                found[entry.name] = self.base_url(entry)
        return found

    # --- the Serve REST API ------------------------------------------------------------------

    @property
    def _dashboard(self) -> str:
        return self.config.ray_dashboard_url

    async def _write(self, name: str, app: dict[str, Any] | None) -> None:
        """Put ``app`` in place of our application ``name`` (None: remove it), keeping every
        other application as deployed; see the module docstring for the guard and its gap."""
        async with self._writing:
            for _ in range(WRITE_ATTEMPTS):
                before = await self._read()
                body = ray_apps.deploy_config(before, name, app, self._serve_host_port)
                if ray_apps.deployed(await self._read()) != ray_apps.deployed(before):
                    continue  # someone changed the cluster's config meanwhile: start over
                await self._call("PUT", body)
                return
            raise BackendUnavailable(
                f"the Serve config on {self._dashboard} kept changing under us; "
                f"{name!r} was not {'deployed' if app else 'removed'}"
            )

    async def _remove_quietly(self, name: str) -> None:
        with contextlib.suppress(ProxyError):  # the start's own error is the one to report
            await self._remove(name)

    async def _read(self) -> dict[str, Any]:
        status = await self._call("GET", None)
        if (wrong := ray_apps.status_error(status)) is not None:
            raise BackendUnavailable(
                f"the Ray dashboard at {self._dashboard} did not answer Serve's status: {wrong}"
            )
        return status

    async def _call(self, method: str, body: dict[str, Any] | None) -> dict[str, Any]:
        url = self._dashboard + API
        headers = {"accept": "application/json"}
        if self.config.ray_token_env:
            token = os.environ.get(self.config.ray_token_env)
            if not token:
                raise BackendUnavailable(
                    f"the Ray dashboard's token variable {self.config.ray_token_env} "
                    "(CHAT_PROXY_RAY_TOKEN_ENV) is not set in the proxy's environment"
                )
            headers["authorization"] = f"Bearer {token}"
        try:
            async with self.session.request(
                method,
                url,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=60, sock_connect=10),
            ) as response:
                raw = await response.content.read(MAX_ANSWER_BYTES + 1)
                status = response.status
                if len(raw) > MAX_ANSWER_BYTES:
                    raise BackendUnavailable(
                        f"the Ray dashboard at {url} answered more than {MAX_ANSWER_BYTES} bytes"
                    )
        except TimeoutError:
            raise BackendUnavailable(f"the Ray dashboard at {url} did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(
                f"the Ray dashboard is unreachable at {url} ({exc}); is the Ray cluster "
                "running? (CHAT_PROXY_RAY_DASHBOARD_URL)"
            ) from None
        if status >= 400:
            text = raw[:2000].decode("utf-8", "replace").strip() or f"HTTP {status}"
            raise ModelStartFailed(f"Ray Serve REST API ({method} {url}): {text}")
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise BackendUnavailable(f"the Ray dashboard at {url} did not answer JSON") from None
        return data if isinstance(data, dict) else {}


def _note(log_path: Path, line: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
