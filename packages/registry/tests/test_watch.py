"""Hot reload: real files, the real watcher thread, bounded waits (no timing assertions)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imageworks.model_loader.errors import RegistryValidationError
from imageworks.model_loader.registry import Registry
from imageworks.model_loader.watch import RegistryWatcher

LayerWriter = Callable[..., Path]


CURATED = "model_registry.curated.json"


def touch_forward(path: Path) -> None:
    """Make sure the signature changes even on a coarse-mtime filesystem."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def watched(
    layers: LayerWriter,
) -> Iterator[tuple[Path, RegistryWatcher, list[Registry], threading.Event]]:
    root = layers(curated=[{"name": "a", "backend": "ollama"}])
    watcher = RegistryWatcher(root, interval_s=0.05)
    seen: list[Registry] = []
    changed = threading.Event()
    watcher.subscribe(lambda r: (seen.append(r), changed.set()))
    watcher.start()
    yield root, watcher, seen, changed
    watcher.stop()


def test_a_good_edit_is_picked_up_and_announced(watched, layers: LayerWriter) -> None:
    root, watcher, seen, changed = watched
    layers(curated=[{"name": "a", "backend": "ollama"}, {"name": "b", "backend": "vllm"}])
    touch_forward(root / CURATED)
    assert changed.wait(5), "the watcher did not notice the edit"
    assert watcher.current.names == ["a", "b"] and seen[-1] is watcher.current
    assert watcher.last_error is None


def test_a_bad_edit_keeps_the_last_good_registry_and_exposes_the_error(
    watched, layers: LayerWriter
) -> None:
    root, watcher, seen, changed = watched
    good = watcher.current
    (root / CURATED).write_text('[{"name": "a", "backend": "ollama"}, {"name": "b"}')
    touch_forward(root / CURATED)
    for _ in range(100):
        if watcher.last_error:
            break
        threading.Event().wait(0.05)
    assert watcher.last_error and "not valid JSON" in watcher.last_error
    assert watcher.current is good and seen == []
    # Fixing the file recovers without a restart.
    layers(curated=[{"name": "fixed", "backend": "ollama"}])
    touch_forward(root / CURATED)
    assert changed.wait(5)
    assert watcher.current.names == ["fixed"] and watcher.last_error is None


def test_reload_on_demand_raises_and_keeps_the_old_registry(layers: LayerWriter) -> None:
    root = layers(curated=[{"name": "a", "backend": "ollama"}])
    watcher = RegistryWatcher(root)
    good = watcher.current
    layers(curated=[{"name": "a", "backend": "bogus"}])
    with pytest.raises(RegistryValidationError):
        watcher.reload()
    assert watcher.current is good and "unknown backend 'bogus'" in (watcher.last_error or "")


def test_an_unchanged_reload_does_not_notify(layers: LayerWriter) -> None:
    root = layers(curated=[{"name": "a", "backend": "ollama"}])
    watcher = RegistryWatcher(root)
    calls: list[Registry] = []
    watcher.subscribe(calls.append)
    watcher.reload()
    assert calls == []
