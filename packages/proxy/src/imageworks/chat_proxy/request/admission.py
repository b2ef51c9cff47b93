"""Back-pressure: how many requests per model are forwarded at once, and how many may wait.

Each model with a limit (its entry's ``max_concurrency``, else ``CHAT_PROXY_MAX_CONCURRENCY``;
0 is no limit) has a ``Turnstile``: up to the limit, requests pass at once; beyond it they wait
in a FIFO of at most ``CHAT_PROXY_MAX_QUEUE``; beyond that, or after waiting
``CHAT_PROXY_QUEUE_TIMEOUT_S``, they are refused with 429 ``rate_limited`` and ``Retry-After``,
so that an overloaded backend tells clients to back off instead of every latency growing.

A finished request hands its turn straight to the oldest waiter (no stampede, FIFO order).
"""

from __future__ import annotations

import asyncio
from collections import deque

from imageworks.chat_proxy.errors import RateLimited
from imageworks.chat_proxy.observe.metrics import Metrics
from imageworks.model_loader.schema import ModelEntry

RETRY_AFTER_S = 1


class Turnstile:
    """One model's turnstile: at most ``limit`` requests through at once, the rest in a FIFO.
    (Not the GPU gate, ``arbiter/seams.GpuGate``: GPU memory and leases for a model's start.)
    """

    def __init__(self, name: str, limit: int, admission: Admission) -> None:
        self.name = name
        self.limit = limit
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self._admission = admission

    def try_enter(self) -> bool:
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return True
        return False

    async def wait(self, timeout: float) -> None:
        """Wait for a turn, or refuse with 429 if the queue is full or the wait too long."""
        admission = self._admission
        if len(self.waiters) >= admission.max_queue:
            raise self._refuse(f"{self.active} requests running and {len(self.waiters)} waiting")
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        admission.metrics.queue_depth.labels(self.name).inc()
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the turn was handed over as we left: pass it on
            else:
                waiter.cancel()
                if waiter in self.waiters:  # release() may have popped it in the same step
                    self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise self._refuse(f"no turn within {timeout:g} s") from None
            raise
        finally:
            admission.metrics.queue_depth.labels(self.name).dec()

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the turn passes on; ``active`` stays
                return
        self.active -= 1

    def _refuse(self, why: str) -> RateLimited:
        self._admission.metrics.rejections.labels(self.name).inc()
        return RateLimited(
            f"model {self.name!r} is at its concurrency limit ({self.limit}): {why}; "
            f"retry after {RETRY_AFTER_S} s",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


class Admission:
    def __init__(self, default_limit: int, max_queue: int, metrics: Metrics) -> None:
        self.default_limit = default_limit
        self.max_queue = max_queue
        self.metrics = metrics
        self._gates: dict[str, Turnstile] = {}

    def gate(self, entry: ModelEntry) -> Turnstile | None:
        """The model's turnstile; None when it has no limit (the common case costs a lookup)."""
        limit = entry.max_concurrency or self.default_limit
        if not limit:
            return None
        gate = self._gates.get(entry.name)
        if gate is None:
            gate = self._gates[entry.name] = Turnstile(entry.name, limit, self)
        gate.limit = limit  # a registry edit applies from the next request on
        return gate
