"""The lease record and its file: expiry, what is public, and what survives a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from imageworks.chat_proxy.arbiter.leases import LEASE_FILE, Lease, LeaseStore, new_token


def lease(**fields: object) -> Lease:
    values: dict[str, object] = {
        "token": "secret-token",
        "owner": "jv",
        "reason": "stage 2",
        "restart_model": True,
        "ttl_s": 60.0,
        "need_mb": None,
        "granted_at": 1000.0,
        "renewed_at": 1000.0,
        **fields,
    }
    return Lease(**values)  # type: ignore[arg-type]


def test_a_lease_expires_ttl_after_its_last_renewal() -> None:
    held = lease(renewed_at=1030.0)
    assert held.expires_at == 1090.0
    assert not held.expired(now=1089.9)
    assert held.expired(now=1090.0)
    assert held.expired(now=5000.0)


def test_the_public_view_never_shows_the_token() -> None:
    shown = lease(evicted=["a"]).public()
    assert "secret-token" not in json.dumps(shown)
    assert shown["owner"] == "jv" and shown["reason"] == "stage 2"
    assert shown["restart_model"] is True and shown["ttl_s"] == 60.0
    assert shown["need_mb"] is None and shown["evicted"] == ["a"]
    assert shown["granted_at"] == 1000.0 and shown["renewed_at"] == 1000.0
    assert shown["expires_at"] == 1060.0 and shown["age_s"] > 0


def test_the_age_is_shown_in_tenths_of_a_second() -> None:
    assert lease(granted_at=time.time() - 12.32).public()["age_s"] == 12.3


def test_tokens_are_long_and_never_repeat() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 32 for t in tokens)


def test_the_store_round_trips_a_lease_with_mode_0600(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path)
    assert store.load() is None
    held = lease(need_mb=8000, evicted=["big-a"])
    store.save(held)
    path = tmp_path / LEASE_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert LeaseStore(tmp_path).load() == held
    store.save(None)
    assert not path.exists() and store.load() is None
    store.save(None)  # nothing to delete is fine


@pytest.mark.parametrize("content", ["", "{", "[]", '{"token": "x"}', '{"nope": 1}'])
def test_a_damaged_lease_file_is_no_lease(tmp_path: Path, content: str) -> None:
    (tmp_path / LEASE_FILE).write_text(content)
    assert LeaseStore(tmp_path).load() is None
