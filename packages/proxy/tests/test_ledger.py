"""The per-device ledger over plain data: where each holding is, what is free, what is
foreign."""

from __future__ import annotations

from imageworks.chat_proxy.arbiter import ledger
from imageworks.chat_proxy.arbiter.gpu import GpuSnapshot
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
