"""Hot reload for long-running users (the proxy, the console).

A daemon thread polls the layer files' (mtime, size) signature. A change is applied once the
signature has stayed the same for one more poll (an editor's save is often two writes). A new
registry replaces the current one only if it validates; otherwise the last good registry stays
and the error is kept for ``/admin/state``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from imageworks.model_loader.errors import RegistryError
from imageworks.model_loader.registry import (
    Registry,
    build_registry,
    layer_signature,
    registry_dir,
)

log = logging.getLogger(__name__)

Subscriber = Callable[[Registry], None]


class RegistryWatcher:
    def __init__(
        self, directory: str | os.PathLike[str] | None = None, *, interval_s: float = 0.25
    ) -> None:
        self.directory: Path = registry_dir(directory)
        self.interval_s = interval_s
        self._signature = layer_signature(self.directory)
        # The first load must succeed: there is no last good registry to fall back on.
        self._current = build_registry(self.directory)
        self.last_error: str | None = None
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Registry:
        return self._current

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def reload(self) -> Registry:
        """Rebuild now. On a bad layer, keep the last good registry and raise the error."""
        with self._lock:
            signature = layer_signature(self.directory)
            try:
                registry = build_registry(self.directory)
            except RegistryError as exc:
                self._signature = signature  # do not retry the same bad bytes every poll
                self.last_error = str(exc)
                log.error(
                    "registry reload failed, keeping version %s: %s", self._current.version, exc
                )
                raise
            self._signature = signature
            self.last_error = None
            changed = registry.version != self._current.version
            self._current = registry
            subscribers = list(self._subscribers)
        if changed:
            log.info("registry reloaded: version %s, %d entries", registry.version, len(registry))
            for callback in subscribers:
                try:
                    callback(registry)
                except Exception:
                    log.exception("registry subscriber failed")
        return registry

    def poll_once(self) -> bool:
        """Reload if the layers changed and have settled. Returns True if a reload was attempted."""
        seen = layer_signature(self.directory)
        if seen == self._signature:
            return False
        if self._stop.wait(self.interval_s) or layer_signature(self.directory) != seen:
            return False  # still being written; look again next poll
        with contextlib.suppress(RegistryError):  # recorded in last_error
            self.reload()
        return True

    def start(self) -> RegistryWatcher:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # the watcher must outlive any surprise (a vanished dir, ...)
                log.exception("registry watcher poll failed")
