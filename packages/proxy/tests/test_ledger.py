"""The per-device ledger over plain data: where each holding is, what is free, what is
foreign."""

from __future__ import annotations

from imageworks.chat_proxy.arbiter import ledger
from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot
from imageworks.chat_proxy.arbiter.policy import Resident
from imageworks.chat_proxy.arbiter.seams import Holding

OLLAMA_PID = 500


def snap(index: int, used: int, processes: dict[int | str, int]) -> GpuSnapshot:
    return GpuSnapshot(24000, used, processes, f"GPU {index}", index)


def sizes(holding: Holding) -> int:
    return holding.vram_mb


def test_ollama_models_are_located_from_the_ollama_process_use_per_device() -> None:
    big = Holding("big", 9000, 1.0, pid=OLLAMA_PID)
    small = Holding("small", 3000, 2.0, pid=OLLAMA_PID)
    other = Holding("ollama:other", 2000, 0.0, foreign=True, pid=OLLAMA_PID)
    snaps = [snap(0, 11000, {OLLAMA_PID: 11000}), snap(1, 3000, {OLLAMA_PID: 3000})]
    where = {
        h.name: h.devices for h in ledger.locate([small, big, other], snaps, lambda h: None, sizes)
    }
    # largest first onto the device with most of the process's memory unaccounted for
    assert where == {"big": (0,), "small": (1,), "ollama:other": (0,)}


def test_placed_models_stay_where_they_were_placed_and_unknown_ones_go_to_device_0() -> None:
    ours = Holding("ours", 5000, 1.0, pid=42)
    lost = Holding("lost", 1000, 1.0)
    snaps = [snap(0, 0, {}), snap(1, 5000, {42: 5000})]
    held = ledger.locate([ours, lost], snaps, lambda h: (1,) if h.name == "ours" else None, sizes)
    assert [(h.name, h.devices) for h in held] == [("ours", (1,)), ("lost", (0,))]
    assert ledger.locate([lost], [], lambda h: None, sizes)[0].devices == ()


def test_a_model_still_loading_is_booked_against_free_memory_until_it_holds_it() -> None:
    loading = ledger.Held(Holding("loading", 0, 1.0, protected=True, pid=7), 10000, (0,))
    ready = ledger.Held(Holding("ready", 0, 1.0, pid=8), 4000, (0,))
    # The loading one holds 2,000 of its 10,000 so far: 8,000 more are spoken for.
    device = snap(0, 6000, {7: 2000, 8: 4000})
    assert ledger.effective_free(device, [loading, ready]) == 24000 - 6000 - 8000
    # A declared budget already counts it: nothing more is taken off.
    assert ledger.effective_free(device, [loading, ready], measured=False) == 18000
    # Never below zero.
    assert ledger.effective_free(snap(0, 20000, {}), [loading]) == 0


def test_the_report_splits_ours_foreign_and_strangers_per_device() -> None:
    mine = ledger.Held(Holding("mine", 0, 1.0, in_flight=2, pid=7), 6000, (0,))
    wide = ledger.Held(Holding("wide", 0, 1.0, pid=9), 8000, (0, 1))
    theirs = ledger.Held(Holding("ollama:x", 3000, 0.0, foreign=True, pid=OLLAMA_PID), 3000, (1,))
    snaps = [
        snap(0, 12000, {7: 6000, 9: 4000, 1234: 2000}),
        snap(1, 7000, {9: 4000, OLLAMA_PID: 3000}),
    ]
    rows = ledger.report(snaps, [mine, wide, theirs], [{"owner": "jv", "device": 1}])
    zero, one = rows
    assert zero["models"] == [
        {"name": "mine", "vram_mb": 6000, "in_flight": 2},
        {"name": "wide", "vram_mb": 4000, "in_flight": 0},
    ]
    assert zero["foreign"] == [{"name": "pid 1234", "vram_mb": 2000}]
    assert (zero["ours_mb"], zero["foreign_mb"], zero["free_mb"]) == (10000, 2000, 12000)
    assert zero["lease"] is None and one["lease"] == {"owner": "jv", "device": 1}
    assert one["models"] == [{"name": "wide", "vram_mb": 4000, "in_flight": 0}]
    assert one["foreign"] == [{"name": "ollama:x", "vram_mb": 3000}]
    assert (one["ours_mb"], one["foreign_mb"]) == (4000, 3000)


def test_a_placement_wins_over_where_the_process_holds_memory() -> None:
    # The arbiter placed it on device 1; its process shows memory on device 0 only (not yet
    # moved, or a probe that is behind): the placement is what counts.
    ours = Holding("ours", 5000, 1.0, pid=42)
    snaps = [snap(0, 5000, {42: 5000}), snap(1, 0, {})]
    held = ledger.locate([ours], snaps, lambda h: (1,), sizes)
    assert held[0].devices == (1,)


def test_located_holdings_carry_their_size_and_ties_go_to_the_lower_device() -> None:
    model = Holding("model", 4000, 1.0, pid=OLLAMA_PID)
    silent = Holding("silent", 1000, 1.0, pid=77)  # its process holds nothing anywhere
    snaps = [snap(0, 4000, {OLLAMA_PID: 4000}), snap(1, 4000, {OLLAMA_PID: 4000})]
    held = ledger.locate([model, silent], snaps, lambda h: None, lambda h: h.vram_mb * 2)
    assert [(h.name, h.mb, h.devices) for h in held] == [
        ("model", 8000, (0,)),
        ("silent", 2000, (0,)),
    ]


def test_every_model_still_loading_is_booked_and_one_that_holds_enough_books_nothing() -> None:
    def loading(name: str, mb: int, pid: int | None) -> ledger.Held:
        return ledger.Held(Holding(name, 0, 1.0, protected=True, pid=pid), mb, (0,))

    device = snap(0, 5000, {7: 5000})
    # No pid yet: all of it is booked; a process that holds nothing yet: all of it too.
    assert ledger.effective_free(device, [loading("a", 3000, None)]) == 19000 - 3000
    assert ledger.effective_free(device, [loading("b", 2000, 8)]) == 19000 - 2000
    both = [loading("a", 3000, None), loading("b", 2000, 8)]
    assert ledger.effective_free(device, both) == 19000 - 5000
    # It holds all it was booked for (or more): nothing more is taken off.
    assert ledger.effective_free(device, [loading("c", 5000, 7)]) == 19000
    assert ledger.effective_free(device, [loading("c", 4000, 7)]) == 19000


def test_strangers_are_pids_in_a_stable_order_and_name_keys_are_no_strangers() -> None:
    # A fake probe keys by holder name; a real one by pid. Mixed keys must not break sorting.
    device = snap(0, 6000, {"llm": 3000, 99: 1000, 1234: 2000})
    assert ledger.strangers_on(device, []) == [("pid 1234", 2000), ("pid 99", 1000)]


def test_the_report_names_each_device_and_never_shows_negative_foreign_memory() -> None:
    # The estimate says more than the probe measured: no foreign memory, not a negative one.
    mine = ledger.Held(Holding("mine", 0, 1.0, pid=7), 6000, (0,))
    rows = ledger.report([snap(0, 5000, {7: 5000})], [mine], [])
    (row,) = rows
    assert (row["index"], row["name"], row["total_mb"], row["used_mb"]) == (0, "GPU 0", 24000, 5000)
    assert (row["ours_mb"], row["foreign_mb"], row["foreign"]) == (6000, 0, [])


def test_devices_for_placement_show_our_residents_effective_free_and_leases() -> None:
    wide = ledger.Held(Holding("wide", 0, 1.0, in_flight=1, pid=9), 8000, (0, 1))
    starting = ledger.Held(Holding("starting", 0, 2.0, protected=True, pid=10), 6000, (1,))
    theirs = ledger.Held(Holding("ollama:x", 3000, 0.0, foreign=True, pid=OLLAMA_PID), 3000, (0,))
    snaps = [snap(0, 7000, {9: 4000, OLLAMA_PID: 3000}), snap(1, 5000, {9: 4000, 10: 1000})]
    zero, one = ledger.devices_for_placement(snaps, [wide, starting, theirs], {1})
    assert (zero.index, zero.free_mb, zero.available) == (0, 17000, True)
    assert zero.residents == (wide.resident(0),)  # the foreign model is nobody's to evict
    assert (one.index, one.free_mb, one.available) == (1, 19000 - 5000, False)
    assert one.residents == (wide.resident(1), starting.resident(1))
    assert one.residents[1].protected and one.residents[0].vram_mb == 4000
    declared = ledger.devices_for_placement(snaps, [wide, starting, theirs], (), measured=False)
    assert [(d.free_mb, d.available) for d in declared] == [(17000, True), (19000, True)]


async def _evict() -> bool:
    return True


def test_a_held_model_as_the_eviction_policy_sees_it() -> None:
    holding = Holding("wide", 0, 3.5, in_flight=2, evict=_evict, pid=9)
    wide = ledger.Held(holding, 8000, (0, 1))
    assert wide.resident(1) == Resident("wide", 4000, 3.5, 2, False)
    assert wide.resident(None) == Resident("wide", 8000, 3.5, 2, False)  # all of it
    assert wide.resident(2).vram_mb == 0
    # Protected (starting or stopping), or with no way to evict it: never the policy's to evict.
    starting = ledger.Held(Holding("s", 0, 1.0, protected=True, evict=_evict), 1000, (0,))
    no_way = ledger.Held(Holding("n", 0, 1.0), 1000, (0,))
    assert starting.resident(0).protected and no_way.resident(0).protected
