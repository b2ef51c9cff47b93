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


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        (None, True),  # no address: a Unix socket or an in-process client
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback
        ("fe80::1%eth0", False),  # a zone id is stripped, the address is not loopback
        ("::1%lo", True),
        ("::ffff:10.0.0.5", False),
        ("10.0.0.5", False),
        ("0.0.0.0", False),
        ("192.168.1.20", False),
        ("LOCALHOST", False),  # a name other than the literal "localhost" is not resolved
        ("gpu-box", False),
        ("", False),
    ],
)
def test_which_hosts_are_loopback(host: str | None, loopback: bool) -> None:
    from imageworks.chat_proxy.auth import is_loopback

    assert is_loopback(host) is loopback


def test_without_a_token_admin_calls_from_another_host_are_refused_even_with_a_key() -> None:
    with pytest.raises(Unauthorized) as refused:
        require_admin({"x-api-key": "k1"}, None, peer="10.0.0.5", api_keys=KEYS)
    assert refused.value.message == (
        "admin calls from 10.0.0.5 need an admin token, and none is set: set "
        "CHAT_PROXY_ADMIN_TOKEN to administer from another host"
    )
    require_admin({}, None, peer="::1")  # loopback, no keys: open


def test_with_keys_and_no_token_admin_calls_need_a_key() -> None:
    for headers in ({"x-api-key": "k2"}, {"authorization": "Bearer k1"}):
        require_admin(headers, None, peer="127.0.0.1", api_keys=KEYS)
    for headers in ({}, {"x-api-key": "nope"}, {"x-admin-token": "k1"}):
        with pytest.raises(Unauthorized) as refused:
            require_admin(headers, None, peer="127.0.0.1", api_keys=KEYS)
        assert refused.value.message == (
            "missing or invalid key: with CHAT_PROXY_API_KEYS set and no "
            "CHAT_PROXY_ADMIN_TOKEN, admin calls need one of the API keys"
        )


def test_with_a_token_the_peer_does_not_matter_only_the_token() -> None:
    require_admin({"x-admin-token": "t0k"}, "t0k", peer="10.0.0.5", api_keys=KEYS)
    with pytest.raises(Unauthorized, match="CHAT_PROXY_ADMIN_TOKEN"):
        require_admin({"x-api-key": "k1"}, "t0k", peer="127.0.0.1", api_keys=KEYS)
