"""The lease record and its file (expiry, what is public, what survives a restart), and the
lease desk on its own: the token check, grant, renew, release, force release, expiry and the
restores, with a scripted ``free``/``restore`` and a real request log and metrics."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from imageworks.chat_proxy.arbiter.leases import (
    LEASE_FILE,
    Lease,
    LeaseDesk,
    LeaseStore,
    new_token,
)
from imageworks.chat_proxy.errors import GpuLeaseActive, InvalidRequest
from imageworks.chat_proxy.observe.metrics import Metrics
from imageworks.chat_proxy.observe.requestlog import RequestLog
from testkit.entries import eventually


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


# --- the desk ----------------------------------------------------------------------------------


class Gpu:
    """What the desk asks of the arbiter and the lifecycle, scripted and recorded."""

    def __init__(self, evicts: list[str]) -> None:
        self.evicts = evicts
        self.freed: list[tuple[int | None, str]] = []
        self.restored: list[str] = []
        self.broken: set[str] = set()
        self.desk: LeaseDesk | None = None
        self.pending_seen: list[str | None] = []
        self.fail_free = False

    async def free(self, need_mb: int | None, why: str, device: int = 0) -> list[str]:
        self.freed.append((need_mb, why))
        assert self.desk is not None
        self.pending_seen.append(self.desk.public()["pending"])
        with pytest.raises(GpuLeaseActive, match="being lent to 'jv'; retry later") as refused:
            self.desk.admit(None)
        assert refused.value.headers == {"Retry-After": "30"}
        if self.fail_free:
            raise RuntimeError("eviction failed")
        return list(self.evicts)

    async def restore(self, name: str) -> None:
        if name in self.broken:
            raise RuntimeError(f"{name} would not start")
        self.restored.append(name)


class Desk:
    def __init__(self, tmp: Path, evicts: list[str] | None = None, **options: Any) -> None:
        self.tmp = tmp
        self.gpu = Gpu(["big-a", "small"] if evicts is None else evicts)
        self.log = RequestLog(tmp / "log" / "requests.jsonl", max_bytes=10**6, backups=1).start()
        self.metrics = Metrics()
        self.desk = self.open(**options)

    def open(self, **options: Any) -> LeaseDesk:
        desk = LeaseDesk(
            self.tmp,
            free=self.gpu.free,
            restore=self.gpu.restore,
            request_log=self.log,
            metrics=self.metrics,
            **options,
        )
        self.gpu.desk = desk
        return desk

    async def grant(self, owner: str = "jv", **fields: Any) -> Lease:
        values: dict[str, Any] = {
            "reason": "stage 2",
            "restart_model": True,
            "ttl_s": 60.0,
            "need_mb": None,
            **fields,
        }
        reason = values.pop("reason")
        return await self.desk.grant(owner, reason, **values)

    def events(self) -> list[dict[str, Any]]:
        self.log.close()
        lines = self.log.path.read_text().splitlines()
        return [
            {k: v for k, v in json.loads(line).items() if k != "ts"}
            for line in lines
            if json.loads(line)["component"] == "gpu-arbiter"
        ]

    def active(self) -> float | None:
        return self.metrics.registry.get_sample_value("chat_proxy_gpu_lease_active")

    def counted(self, event: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "chat_proxy_gpu_lease_events_total", {"event": event}
        )

    def saved(self) -> dict[str, Any] | None:
        path = self.tmp / LEASE_FILE
        return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture
async def desk(tmp_path: Path) -> Any:
    world = Desk(tmp_path)
    yield world
    await world.desk.close(release=False)
    world.log.close()


async def settle(desk: LeaseDesk) -> None:
    """Let the desk's background work (forgetting an expired lease, restores) finish; a task
    that finished is forgotten (a restore started by that work is awaited in the next round)."""
    for _ in range(10):
        if not desk._restoring:
            return
        await asyncio.gather(*desk._restoring)
    assert not desk._restoring, "finished background tasks are never forgotten"


async def test_the_desk_admits_anyone_while_nothing_is_lent(desk: Desk) -> None:
    desk.desk.admit(None)
    desk.desk.admit("anything")
    assert desk.desk.public() == {"leased": False, "lease": None, "pending": None, "leases": []}
    assert desk.active() == 0


async def test_a_grant_frees_the_gpu_and_hands_out_the_token_once(desk: Desk) -> None:
    before = time.time()
    lease = await desk.grant(need_mb=8000)
    assert desk.gpu.freed == [(8000, "lease jv")]
    assert desk.gpu.pending_seen == ["jv"]  # newcomers were refused while it was freeing
    assert lease.owner == "jv" and lease.reason == "stage 2" and lease.restart_model is True
    assert lease.ttl_s == 60.0 and lease.need_mb == 8000 and lease.evicted == ["big-a", "small"]
    assert before <= lease.granted_at <= time.time() and len(lease.token) >= 32
    saved = desk.saved()
    assert saved is not None and saved["token"] == lease.token and saved["owner"] == "jv"
    assert LeaseStore(desk.tmp).load() == lease
    shown = desk.desk.public()
    assert shown["leased"] is True and shown["pending"] is None
    assert shown["lease"]["owner"] == "jv" and lease.token not in json.dumps(shown)
    assert desk.active() == 1 and desk.counted("granted") == 1
    assert desk.events() == [
        {
            "event": "lease_granted",
            "component": "gpu-arbiter",
            "owner": "jv",
            "reason": "stage 2",
            "evicted": ["big-a", "small"],
            "device": 0,
        }
    ]


@pytest.mark.parametrize("ttl_s", [None, 0])
async def test_a_grant_without_a_ttl_gets_the_default(tmp_path: Path, ttl_s: float | None) -> None:
    world = Desk(tmp_path, default_ttl_s=123.0)
    lease = await world.grant(ttl_s=ttl_s)
    assert lease.ttl_s == 123.0
    world.log.close()


async def test_the_default_ttl_is_fifteen_minutes(tmp_path: Path) -> None:
    world = Desk(tmp_path)
    assert (await world.grant(ttl_s=None)).ttl_s == 900.0
    world.log.close()


async def test_a_failed_eviction_grants_nothing_and_lets_requests_in(desk: Desk) -> None:
    desk.gpu.fail_free = True
    with pytest.raises(RuntimeError, match="eviction failed"):
        await desk.grant()
    assert desk.desk.public() == {"leased": False, "lease": None, "pending": None, "leases": []}
    desk.desk.admit(None)
    assert desk.saved() is None and desk.active() == 0


async def test_only_the_token_admits_gpu_work_during_a_lease(desk: Desk) -> None:
    lease = await desk.grant(reason="")
    desk.desk.admit(lease.token)
    for wrong in (None, "", "x", lease.token[:-1], lease.token + "x", lease.token.upper()):
        if wrong == lease.token:
            continue
        with pytest.raises(GpuLeaseActive) as refused:
            desk.desk.admit(wrong)
        assert refused.value.message.startswith(
            "the GPU is leased to 'jv' (no reason given) for up to 5"
        )
        assert refused.value.message.endswith(
            " s more; requests that need it must send X-GPU-Lease-Token"
        )
        assert refused.value.headers["Retry-After"] in ("58", "59")


async def test_the_refusal_names_the_reason_and_caps_retry_after_at_a_minute(desk: Desk) -> None:
    lease = await desk.grant(ttl_s=900.0)
    with pytest.raises(GpuLeaseActive, match=r"leased to 'jv' \(stage 2\) for up to 89\d s"):
        desk.desk.admit("wrong")
    lease.renewed_at = time.time() - 900 + 0.5  # half a second left
    with pytest.raises(GpuLeaseActive, match="for up to 0 s more") as refused:
        desk.desk.admit("wrong")
    assert refused.value.headers == {"Retry-After": "1"}
    lease.renewed_at = time.time() - 900 + 30.5
    with pytest.raises(GpuLeaseActive) as refused:
        desk.desk.admit(None)
    assert refused.value.headers == {"Retry-After": "30"}
    lease.renewed_at = time.time() - 900 + 60.5
    with pytest.raises(GpuLeaseActive) as refused:
        desk.desk.admit(None)
    assert refused.value.headers == {"Retry-After": "60"}
    lease.renewed_at = time.time() - 900 + 61.5
    with pytest.raises(GpuLeaseActive) as refused:
        desk.desk.admit(None)
    assert refused.value.headers == {"Retry-After": "60"}


async def test_a_second_grant_is_refused(desk: Desk) -> None:
    first = await desk.grant()
    with pytest.raises(GpuLeaseActive, match=r"^the GPU is already leased to 'jv'$") as refused:
        await desk.grant("other")
    assert refused.value.headers == {"Retry-After": "30"}
    assert desk.desk.lease is first and desk.gpu.freed == [(None, "lease jv")]


async def test_renewal_moves_the_expiry_and_is_saved(desk: Desk) -> None:
    lease = await desk.grant()
    lease.renewed_at -= 50
    before = time.time()
    renewed = await desk.desk.renew(lease.token)
    assert renewed is lease and before <= lease.renewed_at <= time.time()
    assert desk.saved()["renewed_at"] == lease.renewed_at  # type: ignore[index]
    assert desk.events()[-1] == {
        "event": "lease_renewed",
        "component": "gpu-arbiter",
        "owner": "jv",
    }


@pytest.mark.parametrize("action", ["renew", "release"])
async def test_a_wrong_token_renews_or_releases_nothing(desk: Desk, action: str) -> None:
    lease = await desk.grant()
    with pytest.raises(
        InvalidRequest, match=r"^the lease token is invalid or the lease has expired$"
    ) as refused:
        await getattr(desk.desk, action)(lease.token + "x")
    assert refused.value.param == "token"
    assert desk.desk.lease is lease and desk.saved() is not None


async def test_release_restores_what_the_lease_evicted(desk: Desk) -> None:
    lease = await desk.grant()
    assert await desk.desk.release(lease.token) == ["big-a", "small"]
    assert desk.desk.lease is None and desk.saved() is None
    await settle(desk.desk)
    assert desk.gpu.restored == ["big-a", "small"]
    assert desk.active() == 0 and desk.counted("released") == 1
    events = [e["event"] for e in desk.events()]
    assert events == ["lease_granted", "lease_released", "restore", "restore"]
    desk.desk.admit(None)


@pytest.mark.parametrize(
    ("granted", "asked", "restored"),
    [
        (True, None, True),
        (True, True, True),
        (True, False, False),
        (False, None, False),
        (False, True, False),
        (False, False, False),
    ],
)
async def test_release_restores_only_when_the_lease_and_the_release_allow_it(
    desk: Desk, granted: bool, asked: bool | None, restored: bool
) -> None:
    lease = await desk.grant(restart_model=granted)
    expected = ["big-a", "small"] if restored else []
    assert await desk.desk.release(lease.token, restart_model=asked) == expected
    await settle(desk.desk)
    assert desk.gpu.restored == expected


async def test_a_restore_that_fails_is_logged_and_the_others_go_on(desk: Desk) -> None:
    desk.gpu.broken = {"big-a"}
    lease = await desk.grant()
    await desk.desk.release(lease.token)
    await settle(desk.desk)
    assert desk.gpu.restored == ["small"]
    restores = [e for e in desk.events() if e["event"] == "restore"]
    assert sorted(restores, key=lambda e: e["model"]) == [
        {
            "event": "restore",
            "component": "gpu-arbiter",
            "model": "big-a",
            "result": "failed",
            "error": "big-a would not start",
        },
        {"event": "restore", "component": "gpu-arbiter", "model": "small", "result": "ready"},
    ]


async def test_force_release_checks_the_owner_and_the_age(desk: Desk) -> None:
    assert await desk.desk.force_release() is None
    lease = await desk.grant()
    with pytest.raises(InvalidRequest, match=r"^the lease belongs to 'jv', not 'other'$") as bad:
        await desk.desk.force_release(owner="other")
    assert bad.value.param == "owner"
    with pytest.raises(InvalidRequest, match=r"^the lease is younger than 3600 s$") as young:
        await desk.desk.force_release(max_age_s=3600)
    assert young.value.param == "max_age_s"
    assert desk.desk.lease is lease
    lease.granted_at -= 3600
    assert await desk.desk.force_release(owner="jv", max_age_s=3600, restart_model=False) == []
    assert desk.desk.lease is None and desk.saved() is None
    assert desk.counted("force_released") == 1 and desk.active() == 0
    assert desk.events()[-1]["event"] == "lease_force_released"


async def test_force_release_restores_by_default(desk: Desk) -> None:
    await desk.grant()
    assert await desk.desk.force_release(owner="jv", max_age_s=0) == ["big-a", "small"]
    await settle(desk.desk)
    assert desk.gpu.restored == ["big-a", "small"]


async def test_an_expired_lease_is_ended_on_next_use_and_restores(desk: Desk) -> None:
    lease = await desk.grant()
    lease.renewed_at -= 59.5
    with pytest.raises(GpuLeaseActive):
        desk.desk.admit(None)
    lease.renewed_at -= 0.5
    desk.desk.admit(None)  # expired: anyone may use the GPU again
    assert desk.desk.lease is None
    await settle(desk.desk)
    assert desk.saved() is None and desk.gpu.restored == ["big-a", "small"]
    assert desk.active() == 0 and desk.counted("expired") == 1
    assert [e["event"] for e in desk.events()][:2] == ["lease_granted", "lease_expired"]


async def test_an_expired_lease_cannot_be_renewed_or_force_released(desk: Desk) -> None:
    lease = await desk.grant(restart_model=False)
    lease.renewed_at -= 60
    with pytest.raises(InvalidRequest, match="expired"):
        await desk.desk.renew(lease.token)
    assert await desk.desk.force_release() is None
    assert desk.desk.public()["leased"] is False


async def test_the_expiry_loop_ends_a_stale_lease_without_any_request(desk: Desk) -> None:
    lease = await desk.grant(restart_model=False)
    looping = asyncio.create_task(desk.desk.expiry_loop(interval_s=0.01))
    lease.renewed_at -= 60
    assert await asyncio.to_thread(eventually, lambda: desk.desk.lease is None)
    looping.cancel()
    await settle(desk.desk)
    assert desk.saved() is None


async def test_a_lease_survives_a_restart_and_an_expired_one_is_dropped_at_start(
    desk: Desk,
) -> None:
    lease = await desk.grant()
    again = desk.open()
    assert again.lease == lease and desk.active() == 1
    again.admit(lease.token)
    with pytest.raises(GpuLeaseActive):
        again.admit(None)
    lease.renewed_at -= 60
    await asyncio.to_thread(LeaseStore(desk.tmp).save, lease)
    fresh = desk.open()
    assert fresh.lease is None and desk.saved() is None and desk.active() == 0
    assert desk.events()[-1] == {
        "event": "lease_expired",
        "component": "gpu-arbiter",
        "owner": "jv",
        "while_down": True,
    }


async def test_close_releases_the_lease_unless_told_to_keep_it(tmp_path: Path) -> None:
    kept = Desk(tmp_path / "kept")
    await kept.grant()
    await kept.desk.close(release=False)
    assert kept.saved() is not None and kept.desk.lease is not None
    kept.log.close()
    released = Desk(tmp_path / "released")
    await released.grant()
    await released.desk.close()
    assert released.saved() is None and released.desk.lease is None
    assert released.counted("released_at_shutdown") == 1 and released.active() == 0
    assert released.events()[-1]["event"] == "lease_released_at_shutdown"


async def test_close_cancels_restores_still_running(desk: Desk) -> None:
    started = asyncio.Event()

    async def slow_restore(name: str) -> None:
        started.set()
        await asyncio.sleep(3600)

    desk.desk.restore_model = slow_restore
    lease = await desk.grant()
    await desk.desk.release(lease.token)
    await started.wait()
    running = list(desk.desk._restoring)
    await desk.desk.close()
    await asyncio.gather(*running, return_exceptions=True)
    assert all(task.cancelled() for task in running)
