"""Sleep or stop: the tier of each eviction is a pure choice over measured figures (a table),
and the sleep book keeps the host RAM budget over what the models asleep hold."""

from __future__ import annotations

import pytest

from imageworks.chat_proxy.arbiter.ledger import Held, host_used
from imageworks.chat_proxy.arbiter.policy import SLEEP, STOP, choose_tier
from imageworks.chat_proxy.arbiter.seams import Holding
from imageworks.chat_proxy.arbiter.tiers import SleepBook, default_budget_mb


async def _noop() -> bool:
    return True


@pytest.mark.parametrize(
    ("sleepable", "load_s", "wake_s", "host_mb", "host_free", "how", "why"),
    [
        # Its engine has no sleep mode: stop, whatever else is true.
        (False, 40.0, 0.3, 1000, 99999, STOP, "no sleep mode"),
        # Sleep mode, room in the budget, nothing measured yet: sleep (and measure the wake).
        (True, None, None, 6000, 8000, SLEEP, "wake not measured yet"),
        (True, 40.0, None, 6000, 8000, SLEEP, "wake not measured yet"),
        # Measured: a wake far below the cold start sleeps.
        (True, 40.0, 0.3, 6000, 8000, SLEEP, "wake 0.30 s against a cold start of 40.0 s"),
        (True, None, 0.3, 6000, 8000, SLEEP, "cold start of unmeasured"),
        # The host RAM budget is full (or too small for this one): stop.
        (True, 40.0, 0.3, 6000, 5999, STOP, "host RAM budget full"),
        (True, 40.0, 0.3, 6000, 0, STOP, "host RAM budget full"),
        # Exactly what is left still fits.
        (True, 40.0, 0.3, 6000, 6000, SLEEP, "wake 0.30 s"),
        # A measured wake no cheaper than the measured cold start: stop.
        (True, 2.0, 2.0, 100, 8000, STOP, "no cheaper"),
        (True, 2.0, 3.5, 100, 8000, STOP, "no cheaper"),
        # Just cheaper is cheaper.
        (True, 2.0, 1.9, 100, 8000, SLEEP, "wake 1.90 s"),
    ],
)
def test_choose_tier(
    sleepable: bool,
    load_s: float | None,
    wake_s: float | None,
    host_mb: int,
    host_free: int,
    how: str,
    why: str,
) -> None:
    tier = choose_tier(
        sleepable=sleepable, load_s=load_s, wake_s=wake_s, host_mb=host_mb, host_free_mb=host_free
    )
    assert (tier.how, why in tier.why) == (how, True), tier


def held(name: str, *, sleeping: bool = False, host_mb: int = 0, sleepable: bool = True) -> Held:
    holding = Holding(
        name,
        0 if sleeping else 8000,
        1.0,
        sleep=_noop if sleepable else None,
        sleeping=sleeping,
        host_mb=host_mb,
    )
    return Held(holding, holding.vram_mb, (0,))


def test_the_budget_counts_what_sleeping_models_hold() -> None:
    book = SleepBook(budget_mb=10000)
    asleep, awake = held("a", sleeping=True, host_mb=6000), held("b", host_mb=999)
    assert host_used([asleep, awake]) == 6000  # only sleeping models hold host RAM
    assert book.free_mb([asleep, awake]) == 4000
    assert book.free_mb([asleep], spent_mb=3000) == 1000
    # b would hold 5000 asleep: the budget has 4000 left, so it stops.
    tier = book.tier(awake.holding, [asleep, awake], load_s=30.0, host_mb=5000)
    assert tier.how == STOP and "4000 MB left" in tier.why
    assert book.tier(awake.holding, [awake], load_s=30.0, host_mb=5000).how == SLEEP
    # A model already asleep is not slept again (evicting it stops it).
    assert book.tier(asleep.holding, [asleep], load_s=30.0, host_mb=1).how == STOP
    assert book.public([asleep, awake]) == {
        "budget_mb": 10000,
        "used_mb": 6000,
        "free_mb": 4000,
        "sleeping": [{"name": "a", "host_mb": 6000}],
    }


def test_measured_figures_replace_the_guess_and_set_the_cost() -> None:
    book = SleepBook(budget_mb=0)
    assert book.host_guess("m", weights_mb=3000, need_mb=9000) == 3000
    assert book.host_guess("m", weights_mb=None, need_mb=9000) == 9000
    book.slept("m", 3500)
    assert book.host_guess("m", weights_mb=3000, need_mb=9000) == 3500
    assert book.cost_s("m", True, 40.0) == 40.0  # no wake measured: its cold start
    book.woke("m", 0.4)
    assert book.cost_s("m", True, 40.0) == 0.4
    assert book.cost_s("m", False, 40.0) == 40.0  # it cannot sleep: the wake is moot
    book.woke("m", 50.0)
    assert book.cost_s("m", True, 40.0) == 40.0
    # A zero budget never sleeps anyone.
    assert book.tier(held("m").holding, [], load_s=40.0, host_mb=1).how == STOP


def test_the_default_budget_is_half_the_ram() -> None:
    assert 0 < default_budget_mb() < 10**8
    assert SleepBook().budget_mb == default_budget_mb()
