"""GPU leases: lending a GPU to a non-LLM job, one holder per device at a time.

A lease is on one device (named, or the one where its ``need_mb`` fits: the arbiter decides;
neither: device 0, "the GPU" of a one-GPU box). It evicts what it needs there (through the
arbiter), waits for the memory, and while it is held any request for a model that would use
that device gets 423 unless it carries the lease's token. It has a TTL
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
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageworks.chat_proxy.errors import GpuLeaseActive, InvalidRequest
from imageworks.model_loader.layers import write_atomic

if TYPE_CHECKING:
    from imageworks.chat_proxy.observe.metrics import Metrics
    from imageworks.chat_proxy.observe.requestlog import RequestLog

log = logging.getLogger(__name__)

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
    device: int = 0

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
            "device": self.device,
        }


def new_token() -> str:
    return secrets.token_urlsafe(24)


class LeaseStore:
    """Reads and writes the lease file (mode 0600: it holds the token)."""

    def __init__(self, staging_dir: Path) -> None:
        self.path = staging_dir / LEASE_FILE

    def load_all(self) -> list[Lease]:
        """The saved leases; a file from before leases had devices holds one, on device 0."""
        try:
            data = json.loads(self.path.read_text())
            # The top level is the first lease (what a one-lease writer edits), the rest follow.
            rest = data.pop("leases", [{}])[1:] if isinstance(data, dict) else []
            return [Lease(**item) for item in [data, *rest]]
        except (OSError, ValueError, TypeError, KeyError):
            return []

    def save_all(self, leases: list[Lease]) -> None:
        """Every lease under ``leases``; the first one's fields also at the top, the shape a
        one-lease reader (an older proxy) knows."""
        if not leases:
            self.path.unlink(missing_ok=True)
            return
        body = {**asdict(leases[0]), "leases": [asdict(lease) for lease in leases]}
        write_atomic(self.path, json.dumps(body, indent=2).encode())
        self.path.chmod(0o600)

    def load(self) -> Lease | None:
        leases = self.load_all()
        return leases[0] if leases else None

    def save(self, lease: Lease | None) -> None:
        self.save_all([lease] if lease is not None else [])


# What the desk needs from the arbiter: choose the device for a lease (the one asked for, or
# where ``need_mb`` fits); free memory there (None: the whole device) and report what was
# evicted; and from the lifecycle: start a model again.
Choose = Callable[[int | None, int | None], Awaitable[int]]
Free = Callable[[int | None, str, int], Awaitable[list[str]]]
Restore = Callable[[str], Awaitable[None]]


async def device_zero(need_mb: int | None, device: int | None) -> int:
    return 0 if device is None else device


class LeaseDesk:
    def __init__(
        self,
        staging_dir: Path,
        *,
        free: Free,
        restore: Restore,
        choose: Choose = device_zero,
        default_ttl_s: float = 900.0,
        request_log: RequestLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.free = free
        self.choose = choose
        self.restore_model = restore
        self.default_ttl_s = default_ttl_s
        self.request_log = request_log
        self.metrics = metrics
        self.store = LeaseStore(staging_dir)
        self.held: list[Lease] = []
        self.pending: str | None = None  # owner of a lease being granted
        self.pending_device: int | None = None  # None while its device is being chosen
        self._lock = asyncio.Lock()
        self._restoring: set[asyncio.Task[None]] = set()
        for lease in self.store.load_all():
            if lease.expired():
                self._event("lease_expired", owner=lease.owner, while_down=True)
            else:
                self.held.append(lease)
        self.store.save_all(self.held)  # at start-up, before the loop serves anyone
        self._count()

    @property
    def lease(self) -> Lease | None:
        """The lease a one-GPU client means: device 0's, else the first."""
        for lease in self.held:
            if lease.device == 0:
                return lease
        return self.held[0] if self.held else None

    def _saved_order(self) -> list[Lease]:
        lease = self.lease
        return [lease, *(h for h in self.held if h is not lease)] if lease else []

    def on(self, device: int) -> Lease | None:
        return next((lease for lease in self.held if lease.device == device), None)

    def lent(self) -> set[int]:
        """Devices lent out or being lent (a lease whose device is not chosen yet: -1)."""
        self._expire_if_due()
        devices = {lease.device for lease in self.held}
        if self.pending is not None:
            devices.add(-1 if self.pending_device is None else self.pending_device)
        return devices

    def admit(self, token: str | None, devices: Collection[int] | None = None) -> None:
        """Refuse GPU work on ``devices`` (None: any) while one of them is lent, unless the
        request carries that lease's token."""
        self._expire_if_due()
        if self.pending is not None and (
            devices is None or self.pending_device is None or self.pending_device in devices
        ):
            raise GpuLeaseActive(
                f"the GPU is being lent to {self.pending!r}; retry later",
                headers={"Retry-After": "30"},
            )
        for lease in self.held:
            if devices is not None and lease.device not in devices:
                continue
            if token is not None and secrets.compare_digest(token, lease.token):
                continue
            left = max(0, int(lease.expires_at - time.time()))
            raise GpuLeaseActive(
                f"{_gpu(lease.device)} is leased to {lease.owner!r} "
                f"({lease.reason or 'no reason given'}) for up to {left} s more; requests that "
                "need it must send X-GPU-Lease-Token",
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
        device: int | None = None,
    ) -> Lease:
        async with self._lock:
            self._expire_if_due()
            if device is not None and (taken := self.on(device)) is not None:
                raise _already(taken)
            self.pending, self.pending_device = owner, device
            try:
                chosen = await self.choose(need_mb, device)
                if (taken := self.on(chosen)) is not None:
                    raise _already(taken)
                self.pending_device = chosen
                evicted = await self.free(need_mb, f"lease {owner}", chosen)
            finally:
                self.pending, self.pending_device = None, None
            lease = Lease(
                new_token(),
                owner,
                reason,
                restart_model,
                ttl_s or self.default_ttl_s,
                need_mb,
                evicted=evicted,
                device=chosen,
            )
            self.held.append(lease)
            await asyncio.to_thread(self.store.save_all, self._saved_order())
            self._changed("lease_granted", lease)
            return lease

    async def renew(self, token: str) -> Lease:
        lease = self._held(token)
        lease.renewed_at = time.time()
        await asyncio.to_thread(self.store.save_all, self._saved_order())
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
        device: int | None = None,
    ) -> list[str] | None:
        self._expire_if_due()
        lease = self.lease if device is None else self.on(device)
        if owner is not None and device is None:
            lease = next((held for held in self.held if held.owner == owner), lease)
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
        lease = self.lease
        return {
            "leased": bool(self.held),
            "lease": lease.public() if lease else None,
            "pending": self.pending,
            "leases": [held.public() for held in self.held],
        }

    def _held(self, token: str) -> Lease:
        self._expire_if_due()
        for lease in self.held:
            if secrets.compare_digest(token, lease.token):
                return lease
        raise InvalidRequest("the lease token is invalid or the lease has expired", param="token")

    def _expire_if_due(self) -> None:
        """Expiry is checked on every use (and once a second by ``expiry_loop``)."""
        for lease in [held for held in self.held if held.expired()]:
            self.held.remove(lease)
            self._changed("lease_expired", lease)
            self._spawn(self._forget_and_restore(lease, None))

    async def _end(self, lease: Lease, event: str, restart_model: bool | None) -> list[str]:
        self.held.remove(lease)
        self._changed(event, lease)
        await asyncio.to_thread(self.store.save_all, self._saved_order())
        return self._restore(lease, restart_model)

    async def _forget_and_restore(self, lease: Lease, restart_model: bool | None) -> None:
        await asyncio.to_thread(self.store.save_all, self._saved_order())
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
        if release and self.held:
            leases, self.held = self.held, []
            for lease in leases:
                self._changed("lease_released_at_shutdown", lease)
            await asyncio.to_thread(self.store.save_all, [])

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.lease_active.set(len(self.held))

    def _changed(self, event: str, lease: Lease) -> None:
        self._event(
            event,
            owner=lease.owner,
            reason=lease.reason,
            evicted=lease.evicted,
            device=lease.device,
        )
        self._count()
        if self.metrics is not None:
            self.metrics.lease_events.labels(event.removeprefix("lease_")).inc()

    def _event(self, event: str, **fields: Any) -> None:
        if self.request_log is not None:
            self.request_log.event(event, "gpu-arbiter", **fields)


def _gpu(device: int) -> str:
    return "the GPU" if device == 0 else f"GPU {device}"


def _already(lease: Lease) -> GpuLeaseActive:
    return GpuLeaseActive(
        f"{_gpu(lease.device)} is already leased to {lease.owner!r}", headers={"Retry-After": "30"}
    )
