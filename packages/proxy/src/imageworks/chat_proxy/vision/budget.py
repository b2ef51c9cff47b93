"""The memory budget for decoded pixels: an image's decode cost is known from its header before
it is decoded (``images.Opened``), and taken here first, so a handful of huge PNGs cannot take
gigabytes between them (``CHAT_PROXY_VISION_DECODE_BUDGET_MB``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from imageworks.chat_proxy.errors import ServerBusy

MB = 1024 * 1024


class DecodeBudget:
    """Bytes of decoded pixels the vision pool may hold at once, taken first come, first
    served: a small image never overtakes a big one that waits (it would starve)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, cost: int, timeout_s: float) -> None:
        """Wait until ``cost`` bytes are free (at most ``timeout_s``: then a 503), and take
        them. ``cost`` must be within ``total``."""
        if not self.waiting and self.used + cost <= self.total:
            self.used += cost
            return
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append((cost, turn))
        try:
            async with asyncio.timeout(timeout_s):
                await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self.give(cost)  # granted as it was given up
            else:
                with contextlib.suppress(ValueError):
                    self.waiting.remove((cost, turn))
                self._wake()  # the head may have been the one in the way
            if isinstance(exc, TimeoutError):
                raise ServerBusy(
                    f"image preparation is at its memory budget ({self.used // MB} of "
                    f"{self.total // MB} MB of decoded pixels in use, "
                    f"CHAT_PROXY_VISION_DECODE_BUDGET_MB) and this image waited "
                    f"{timeout_s:g} s for room; retry shortly",
                    headers={"Retry-After": "5"},
                ) from None
            raise

    def give(self, cost: int) -> None:
        self.used -= cost
        self._wake()

    def _wake(self) -> None:
        while self.waiting and self.used + self.waiting[0][0] <= self.total:
            cost, turn = self.waiting.popleft()
            if not turn.done():
                self.used += cost
                turn.set_result(None)
