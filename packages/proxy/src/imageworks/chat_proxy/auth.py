"""API keys for /v1/* and the admin token for /admin/* and lease changes.

Keys are optional on loopback; binding elsewhere requires an admin token (see config).
Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from imageworks.chat_proxy.errors import Unauthorized


def _presented(headers: Mapping[str, str], *extra_headers: str) -> list[str]:
    found = []
    authorization = headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        found.append(authorization[7:].strip())
    for name in extra_headers:
        value = headers.get(name)
        if value:
            found.append(value.strip())
    return found


def _matches(presented: Iterable[str], accepted: Iterable[str]) -> bool:
    accepted = list(accepted)
    return any(hmac.compare_digest(p.encode(), a.encode()) for p in presented for a in accepted)


def require_api_key(headers: Mapping[str, str], keys: tuple[str, ...]) -> None:
    if keys and not _matches(_presented(headers, "x-api-key"), keys):
        raise Unauthorized(
            "missing or invalid API key: send 'Authorization: Bearer <key>' "
            "(keys are set with CHAT_PROXY_API_KEYS)"
        )


def require_admin(headers: Mapping[str, str], token: str | None) -> None:
    if token and not _matches(_presented(headers, "x-admin-token"), [token]):
        raise Unauthorized(
            "missing or invalid admin token: send 'Authorization: Bearer <token>' or "
            "'X-Admin-Token' (set with CHAT_PROXY_ADMIN_TOKEN)"
        )
