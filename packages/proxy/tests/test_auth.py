"""API keys and the admin token: which headers count, and that nothing else does."""

from __future__ import annotations

import pytest

from imageworks.chat_proxy.auth import require_admin, require_api_key
from imageworks.chat_proxy.errors import Unauthorized

KEYS = ("k1", "k2")


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer k1"},
        {"authorization": "bearer k2"},
        {"authorization": "BEARER   k1  "},
        {"x-api-key": "k2"},
        {"x-api-key": " k1 "},
        {"authorization": "Bearer wrong", "x-api-key": "k1"},
    ],
)
def test_a_valid_key_in_either_header_is_accepted(headers: dict[str, str]) -> None:
    require_api_key(headers, KEYS)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer"},
        {"authorization": "Bearer "},
        {"authorization": "k1"},
        {"authorization": "Basic k1"},
        {"authorization": "Bearer k3"},
        {"authorization": "Bearer k1k2"},
        {"authorization": "Bearer k"},
        {"x-api-key": ""},
        {"x-api-key": "K1"},
        {"x-admin-token": "k1"},
    ],
)
def test_anything_else_is_401(headers: dict[str, str]) -> None:
    with pytest.raises(Unauthorized, match="CHAT_PROXY_API_KEYS") as caught:
        require_api_key(headers, KEYS)
    assert caught.value.status == 401 and caught.value.code == "unauthorized"


def test_no_keys_configured_means_open() -> None:
    require_api_key({}, ())
    require_admin({}, None, peer="127.0.0.1")
    require_admin({}, "", peer="127.0.0.1")


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({"x-admin-token": "t0k"}, True),
        ({"authorization": "Bearer t0k"}, True),
        ({"x-admin-token": "t0k "}, True),
        ({"x-api-key": "t0k"}, False),  # an API key header is not the admin token's
        ({"x-admin-token": "t0"}, False),
        ({"x-admin-token": "t0kk"}, False),
        ({"authorization": "Bearer T0K"}, False),
        ({}, False),
    ],
)
def test_the_admin_token(headers: dict[str, str], ok: bool) -> None:
    if ok:
        require_admin(headers, "t0k", peer="127.0.0.1")
    else:
        with pytest.raises(Unauthorized, match="CHAT_PROXY_ADMIN_TOKEN"):
            require_admin(headers, "t0k", peer="127.0.0.1")


def test_the_messages_say_how_to_authenticate() -> None:
    with pytest.raises(Unauthorized) as key:
        require_api_key({}, KEYS)
    assert key.value.message == (
        "missing or invalid API key: send 'Authorization: Bearer <key>' "
        "(keys are set with CHAT_PROXY_API_KEYS)"
    )
    with pytest.raises(Unauthorized) as admin:
        require_admin({}, "t0k", peer="127.0.0.1")
    assert admin.value.message == (
        "missing or invalid admin token: send 'Authorization: Bearer <token>' or "
        "'X-Admin-Token' (set with CHAT_PROXY_ADMIN_TOKEN)"
    )
