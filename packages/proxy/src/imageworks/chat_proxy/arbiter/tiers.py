"""Eviction tiers: what the arbiter knows of sleeping models, and the choice for each eviction.

A vLLM model whose engine runs with sleep mode can leave the GPU by sleeping (level 1: weights
to host RAM, VRAM freed) instead of stopping. Which one is ``policy.choose_tier``'s call over
what is measured here: each model's wake time (timed by the executor), the host RAM it held
asleep last time (measured; before that, the weights the estimate read from its files, else
its whole VRAM need), and the host RAM budget (``CHAT_PROXY_SLEEP_RAM_MB``) less what the
models asleep now hold. A sleeping model costs its wake to bring back, not its cold start, and
the eviction order weighs that (``cost_of``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from imageworks.chat_proxy.arbiter.ledger import Held, host_used
from imageworks.chat_proxy.arbiter.policy import SLEEP, Tier, choose_tier
from imageworks.chat_proxy.arbiter.seams import Holding


def default_budget_mb() -> int:
    """Half of this machine's physical RAM (the default sleep budget), MiB."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
    return int(total // 2 // (1024 * 1024))


class SleepBook:
    def __init__(self, budget_mb: int | None = None) -> None:
        self.budget_mb = default_budget_mb() if budget_mb is None else budget_mb
        self.wake_s: dict[str, float] = {}
        self.host_mb: dict[str, int] = {}  # measured while asleep, the last time

    def slept(self, name: str, host_mb: int | None) -> None:
        if host_mb is not None:
            self.host_mb[name] = host_mb

    def woke(self, name: str, wake_s: float) -> None:
        self.wake_s[name] = wake_s

    def host_guess(self, name: str, weights_mb: int | None, need_mb: int) -> int:
        """The host RAM ``name`` will hold asleep: measured, else its weights, else its need."""
        return self.host_mb.get(name) or weights_mb or need_mb

    def free_mb(self, held: Sequence[Held], spent_mb: int = 0) -> int:
        return max(0, self.budget_mb - host_used(held) - spent_mb)

    def tier(
        self,
        holding: Holding,
        held: Sequence[Held],
        *,
        load_s: float | None,
        host_mb: int,
        spent_mb: int = 0,
    ) -> Tier:
        """How ``holding`` leaves the GPU now (``spent_mb``: host RAM that models put to sleep
        earlier in the same round will hold)."""
        return choose_tier(
            sleepable=holding.sleep is not None and not holding.sleeping,
            load_s=load_s,
            wake_s=self.wake_s.get(holding.name),
            host_mb=host_mb,
            host_free_mb=self.free_mb(held, spent_mb),
        )

    def cost_s(self, name: str, sleepable: bool, load_s: float | None) -> float | None:
        """What evicting ``name`` costs to undo: its wake when it would sleep and waking is
        measured cheaper, else its cold start."""
        wake = self.wake_s.get(name)
        if sleepable and wake is not None and (load_s is None or wake < load_s):
            return wake
        return load_s

    def public(self, held: Sequence[Held]) -> dict[str, Any]:
        """``/v1/gpu/status`` ``host_ram``: the budget and the models asleep in it."""
        used = host_used(held)
        return {
            "budget_mb": self.budget_mb,
            "used_mb": used,
            "free_mb": max(0, self.budget_mb - used),
            "sleeping": [
                {"name": h.name, "host_mb": h.holding.host_mb} for h in held if h.holding.sleeping
            ],
        }


__all__ = ["SLEEP", "SleepBook", "Tier", "default_budget_mb"]
