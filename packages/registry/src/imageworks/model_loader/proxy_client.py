"""A minimal client for the proxy's admin API, for the CLI (stdlib only, no async)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from imageworks.model_loader.errors import RegistryError

DEFAULT_PROXY_URL = "http://127.0.0.1:8100"


class ProxyUnavailable(RegistryError):
    """The proxy could not be reached, or it answered with an error."""


def call(
    base_url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    url = base_url.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload: dict[str, Any] = json.loads(response.read() or b"{}")
            return payload
    except urllib.error.HTTPError as exc:
        raise ProxyUnavailable(f"proxy answered {exc.code}: {_message(exc.read())}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProxyUnavailable(
            f"cannot reach the chat proxy at {base_url} ({reason}); is it running? "
            "(--proxy-url / IMAGEWORKS_CHAT_PROXY_URL)"
        ) from None


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:300].decode("utf-8", "replace")
