"""GPU leases: lending the GPU to a non-LLM job, one holder at a time.

A lease evicts what it needs (through the arbiter), waits for the memory, and while it is held
any request that would use the GPU gets 423 unless it carries the lease's token. It has a TTL
renewed by its holder and expires for any owner when stale. It is persisted, so it survives a
proxy *crash*; a graceful stop releases it (the runbook's Ctrl+C step). Release can restore the
models it evicted, Ollama's included.

The token is the holder's secret: it is returned once, by ``grant``, and never shown by
``public()``. File writes (fsync'd) run in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageworks.chat_proxy.errors import GpuLeaseActive, InvalidRequest
from imageworks.model_loader.layers import write_atomic

if TYPE_CHECKING:
    from imageworks.chat_proxy.metrics import Metrics
    from imageworks.chat_proxy.requestlog import RequestLog

log = logging.getLogger("imageworks.chat_proxy.leases")

LEASE_FILE = "gpu_lease.json"


@dataclass
class Lease:
    token: str
    owner: str
    reason: str
    restart_model: bool
    ttl_s: float
    need_mb: int | None  # None: the whole GPU
    granted_at: float = field(default_factory=time.time)
    renewed_at: float = field(default_factory=time.time)
    evicted: list[str] = field(default_factory=list)

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.ttl_s

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) >= self.expires_at

    def public(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "reason": self.reason,
            "restart_model": self.restart_model,
            "ttl_s": self.ttl_s,
            "need_mb": self.need_mb,
            "granted_at": self.granted_at,
            "renewed_at": self.renewed_at,
            "expires_at": self.expires_at,
            "age_s": round(time.time() - self.granted_at, 1),
            "evicted": list(self.evicted),
        }


def new_token() -> str:
    return secrets.token_urlsafe(24)


class LeaseStore:
    """Reads and writes the lease file (mode 0600: it holds the token)."""

    def __init__(self, staging_dir: Path) -> None:
        self.path = staging_dir / LEASE_FILE

    def load(self) -> Lease | None:
        try:
            data = json.loads(self.path.read_text())
            return Lease(**data)
        except (OSError, ValueError, TypeError):
            return None

    def save(self, lease: Lease | None) -> None:
        if lease is None:
            self.path.unlink(missing_ok=True)
            return
        write_atomic(self.path, json.dumps(asdict(lease), indent=2).encode())
        self.path.chmod(0o600)


# What the desk needs from the arbiter: free memory (None: the whole GPU) and report what was
# evicted; and from the lifecycle: start a model again.
Free = Callable[[int | None, str], Awaitable[list[str]]]
Restore = Callable[[str], Awaitable[None]]


class LeaseDesk:
    def __init__(
        self,
        staging_dir: Path,
        *,
        free: Free,
        restore: Restore,
        default_ttl_s: float = 900.0,
        request_log: RequestLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.free = free
        self.restore_model = restore
        self.default_ttl_s = default_ttl_s
        self.request_log = request_log
        self.metrics = metrics
        self.store = LeaseStore(staging_dir)
        self.lease: Lease | None = self.store.load()
        self.pending: str | None = None  # owner of a lease being granted
        self._lock = asyncio.Lock()
        self._restoring: set[asyncio.Task[None]] = set()
        if self.lease is not None and self.lease.expired():
            self._event("lease_expired", owner=self.lease.owner, while_down=True)
            self.lease = None
            self.store.save(None)  # at start-up, before the loop serves anyone
        if self.metrics is not None:
            self.metrics.lease_active.set(1 if self.lease else 0)

    def admit(self, token: str | None) -> None:
        """Refuse GPU work while the GPU is lent, unless the request carries the lease token."""
        self._expire_if_due()
        if self.pending is not None:
            raise GpuLeaseActive(
                f"the GPU is being lent to {self.pending!r}; retry later",
                headers={"Retry-After": "30"},
            )
        lease = self.lease
        if lease is not None and (token is None or not secrets.compare_digest(token, lease.token)):
            left = max(0, int(lease.expires_at - time.time()))
            raise GpuLeaseActive(
                f"the GPU is leased to {lease.owner!r} ({lease.reason or 'no reason given'}) for "
                f"up to {left} s more; requests that need it must send X-GPU-Lease-Token",
                headers={"Retry-After": str(min(left, 60) or 1)},
            )

    async def grant(
        self,
        owner: str,
        reason: str,
        *,
        restart_model: bool,
        ttl_s: float | None,
        need_mb: int | None,
    ) -> Lease:
        async with self._lock:
            self._expire_if_due()
            if self.lease is not None:
                raise GpuLeaseActive(
                    f"the GPU is already leased to {self.lease.owner!r}",
                    headers={"Retry-After": "30"},
                )
            self.pending = owner
            try:
                evicted = await self.free(need_mb, f"lease {owner}")
            finally:
                self.pending = None
            lease = Lease(
                new_token(),
                owner,
                reason,
                restart_model,
                ttl_s or self.default_ttl_s,
                need_mb,
                evicted=evicted,
            )
            self.lease = lease
            await asyncio.to_thread(self.store.save, lease)
            self._changed("lease_granted", lease)
            return lease

    async def renew(self, token: str) -> Lease:
        lease = self._held(token)
        lease.renewed_at = time.time()
        await asyncio.to_thread(self.store.save, lease)
        self._event("lease_renewed", owner=lease.owner)
        return lease

    async def release(self, token: str, *, restart_model: bool | None = None) -> list[str]:
        return await self._end(self._held(token), "lease_released", restart_model)

    async def force_release(
        self,
        *,
        owner: str | None = None,
        max_age_s: float | None = None,
        restart_model: bool | None = None,
    ) -> list[str] | None:
        self._expire_if_due()
        lease = self.lease
        if lease is None:
            return None
        if owner is not None and owner != lease.owner:
            raise InvalidRequest(
                f"the lease belongs to {lease.owner!r}, not {owner!r}", param="owner"
            )
        if max_age_s is not None and time.time() - lease.granted_at < max_age_s:
            raise InvalidRequest(f"the lease is younger than {max_age_s:.0f} s", param="max_age_s")
        return await self._end(lease, "lease_force_released", restart_model)

    def public(self) -> dict[str, Any]:
        self._expire_if_due()
        return {
            "leased": self.lease is not None,
            "lease": self.lease.public() if self.lease else None,
            "pending": self.pending,
        }

    def _held(self, token: str) -> Lease:
        self._expire_if_due()
        if self.lease is None or not secrets.compare_digest(token, self.lease.token):
            raise InvalidRequest(
                "the lease token is invalid or the lease has expired", param="token"
            )
        return self.lease

    def _expire_if_due(self) -> None:
        """Expiry is checked on every use (and once a second by ``expiry_loop``)."""
        if self.lease is not None and self.lease.expired():
            lease, self.lease = self.lease, None
            self._changed("lease_expired", lease)
            self._spawn(self._forget_and_restore(lease, None))

    async def _end(self, lease: Lease, event: str, restart_model: bool | None) -> list[str]:
        self.lease = None
        self._changed(event, lease)
        await asyncio.to_thread(self.store.save, None)
        return self._restore(lease, restart_model)

    async def _forget_and_restore(self, lease: Lease, restart_model: bool | None) -> None:
        await asyncio.to_thread(self.store.save, None)
        self._restore(lease, restart_model)

    def _restore(self, lease: Lease, restart_model: bool | None) -> list[str]:
        restore = (
            lease.restart_model
            if restart_model is None
            else (restart_model and lease.restart_model)
        )
        if not restore:
            return []
        for name in lease.evicted:
            self._spawn(self._restore_one(name))
        return list(lease.evicted)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._restoring.add(task)
        task.add_done_callback(self._restoring.discard)

    async def _restore_one(self, name: str) -> None:
        try:
            await self.restore_model(name)
            self._event("restore", model=name, result="ready")
        except Exception as exc:
            self._event("restore", model=name, result="failed", error=str(exc))

    async def expiry_loop(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self._expire_if_due()

    async def close(self, *, release: bool = True) -> None:
        for task in list(self._restoring):
            task.cancel()
        if release and self.lease is not None:
            lease, self.lease = self.lease, None
            self._changed("lease_released_at_shutdown", lease)
            await asyncio.to_thread(self.store.save, None)

    def _changed(self, event: str, lease: Lease) -> None:
        self._event(event, owner=lease.owner, reason=lease.reason, evicted=lease.evicted)
        if self.metrics is not None:
            self.metrics.lease_active.set(1 if self.lease is not None else 0)
            self.metrics.lease_events.labels(event.removeprefix("lease_")).inc()

    def _event(self, event: str, **fields: Any) -> None:
        if self.request_log is not None:
            self.request_log.event(event, "gpu-arbiter", **fields)
