"""API keys for /v1/* and the admin token for /admin/* and lease changes.

Who may administer, whatever started the app (our CLI, ``uvicorn ... --host 0.0.0.0``,
docker), decided per request from the socket's peer rather than from the configured host:

- with ``CHAT_PROXY_ADMIN_TOKEN`` set, admin calls need it;
- without it but with ``CHAT_PROXY_API_KEYS``, admin calls need one of the API keys;
- with neither, admin calls are answered for loopback peers only;
- without an admin token, admin calls from another host are refused even with an API key.

Tokens are compared in constant time.

API keys may be named (``CHAT_PROXY_API_KEYS=@/path/keys.json``: each key with a name and the
models or deployment profiles it may use); the name, never the key, goes to the JSONL record
and /metrics, and a key used for a model it may not use is a 403 naming the key's name.
Keys given as a plain comma list are named ``key1``, ``key2``... and may use every model.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from imageworks.chat_proxy.errors import Forbidden, Unauthorized


class _Entry(Protocol):
    @property
    def name(self) -> str: ...

    def visible_in(self, profile: str) -> bool: ...


class NamedKey(BaseModel):
    """One API key, its name (shown) and what it may use: the models whose names match one of
    ``models`` (exact names or ``*`` patterns) or that one of ``profiles`` offers; with
    neither, every model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
    key: str = Field(min_length=1, repr=False)
    models: tuple[str, ...] | None = None
    profiles: tuple[str, ...] | None = None

    def may_use(self, entry: _Entry) -> bool:
        if self.models is None and self.profiles is None:
            return True
        if any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in self.models or ()):
            return True
        return any(entry.visible_in(profile) for profile in self.profiles or ())

    def require(self, entry: _Entry) -> None:
        if not self.may_use(entry):
            raise Forbidden(
                f"the API key {self.name!r} may not use model {entry.name!r} (its models "
                "and profiles are set in the CHAT_PROXY_API_KEYS file)",
                param="model",
            )


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a peer or bind address) is this machine. ``None`` is a peer with no
    address: a Unix socket, or an in-process test client."""
    if host is None or host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


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


def identify(headers: Mapping[str, str], keys: tuple[NamedKey, ...]) -> NamedKey | None:
    """The named key the request presents (None when no keys are set); 401 otherwise. Every
    key is compared, in constant time, whichever matches."""
    if not keys:
        return None
    found = None
    for presented in _presented(headers, "x-api-key"):
        for key in keys:
            if hmac.compare_digest(presented.encode(), key.key.encode()):
                found = found or key
    if found is None:
        raise Unauthorized(
            "missing or invalid API key: send 'Authorization: Bearer <key>' "
            "(keys are set with CHAT_PROXY_API_KEYS)"
        )
    return found


def require_api_key(headers: Mapping[str, str], keys: tuple[str, ...]) -> None:
    if keys and not _matches(_presented(headers, "x-api-key"), keys):
        raise Unauthorized(
            "missing or invalid API key: send 'Authorization: Bearer <key>' "
            "(keys are set with CHAT_PROXY_API_KEYS)"
        )


def require_admin(
    headers: Mapping[str, str],
    token: str | None,
    *,
    peer: str | None,
    api_keys: tuple[str, ...] = (),
) -> None:
    if token:
        if not _matches(_presented(headers, "x-admin-token"), [token]):
            raise Unauthorized(
                "missing or invalid admin token: send 'Authorization: Bearer <token>' or "
                "'X-Admin-Token' (set with CHAT_PROXY_ADMIN_TOKEN)"
            )
        return
    if not is_loopback(peer):
        raise Unauthorized(
            f"admin calls from {peer} need an admin token, and none is set: set "
            "CHAT_PROXY_ADMIN_TOKEN to administer from another host"
        )
    if api_keys and not _matches(_presented(headers, "x-api-key"), api_keys):
        raise Unauthorized(
            "missing or invalid key: with CHAT_PROXY_API_KEYS set and no "
            "CHAT_PROXY_ADMIN_TOKEN, admin calls need one of the API keys"
        )
