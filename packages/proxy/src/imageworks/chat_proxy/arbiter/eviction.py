"""How the arbiter evicts what a placement chose: each model by sleep where the sleep tiers
choose it (its host RAM within the budget, its measured wake cheaper than a cold start), else
by stop; the evictions reported as events and metrics. A part of ``VramArbiter``, kept apart
so the placement loop reads on its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imageworks.chat_proxy.arbiter import ledger
from imageworks.chat_proxy.arbiter.estimate import Estimate
from imageworks.chat_proxy.arbiter.seams import Holding
from imageworks.chat_proxy.arbiter.tiers import SLEEP, SleepBook
from imageworks.model_loader.schema import ModelEntry

if TYPE_CHECKING:
    from imageworks.chat_proxy.observe.metrics import Metrics


class Evictions:
    """The eviction half of the arbiter; ``VramArbiter`` provides what is declared here."""

    sleeps: SleepBook
    load_s: dict[str, float]
    last_holdings: list[Holding]
    metrics: Metrics | None

    def estimate_of(self, entry: ModelEntry) -> Estimate | None:
        raise NotImplementedError

    def need_mb(self, entry: ModelEntry) -> int:
        raise NotImplementedError

    def _event(self, event: str, **fields: Any) -> None:
        raise NotImplementedError

    async def _evict(
        self,
        names: tuple[str, ...],
        evictors: dict[str, Holding],
        reason: str,
        held: list[ledger.Held] | None,
    ) -> list[str]:
        """Evict each: by sleep where ``tiers`` chooses it (``held``: the ledger, for the host
        RAM budget; None: stop them all), else by stop."""
        evicted = []
        spent = 0
        for name in names:
            holding = evictors[name]
            how, why = "stop", "a lease takes the whole device"
            if held is not None:
                host = self._sleep_host_mb(holding)
                tier = self.sleeps.tier(
                    holding, held, load_s=self.load_s.get(name), host_mb=host, spent_mb=spent
                )
                how, why = tier.how, tier.why
            if how == SLEEP and holding.sleep is not None:
                done = await holding.sleep()
                spent += self._sleep_host_mb(holding) if done else 0
            else:
                assert holding.evict is not None
                done = await holding.evict()
            if done:
                evicted.append(name)
                self._event("evict", model=name, reason=reason, tier=how, why=why)
                self.last_holdings = [h for h in self.last_holdings if h.name != name]
                if self.metrics is not None:
                    self.metrics.evictions.labels(reason.split()[0]).inc()
        return evicted

    def _sleep_host_mb(self, holding: Holding) -> int:
        """The host RAM ``holding`` will hold asleep: measured last time, else its weights."""
        entry = holding.entry
        found = self.estimate_of(entry) if entry is not None else None
        need = self.need_mb(entry) if entry is not None else holding.vram_mb
        weights = found.weights_mb if found is not None else None
        return self.sleeps.host_guess(holding.name, weights, need)
