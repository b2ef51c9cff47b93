"""The JSONL request log: one line per request or lifecycle event, written off the event loop.

One writer thread owns the file, so records from concurrent requests never interleave and a
record is never split: rotation happens only between records. When the next record would take
the file past ``max_bytes`` the file is renamed to ``.1`` (older backups shift to ``.2`` ...,
the oldest beyond ``backups`` is deleted) and a new file is started.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

_STOP = object()


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RequestLog:
    def __init__(self, path: Path, *, max_bytes: int, backups: int, recent: int = 500) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.dropped = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._file: BinaryIO | None = None
        self._size = 0

    def start(self) -> RequestLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()
        return self

    def write(self, record: dict[str, Any]) -> None:
        """Queue a record (never blocks). ``ts`` is added if missing."""
        record.setdefault("ts", utc_now_iso())
        if record.get("event") == "request":
            self.recent.append(record)
        self._queue.put(record)

    def event(self, event: str, component: str, **fields: Any) -> None:
        self.write({"ts": utc_now_iso(), "event": event, "component": component, **fields})

    def close(self, timeout: float = 10.0) -> None:
        """Flush everything queued so far, then stop the writer."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            try:
                self._append(json.dumps(item, ensure_ascii=False, default=str).encode() + b"\n")
            except Exception:  # a bad record or a full disk must not kill the writer
                self.dropped += 1
                log.exception("request log write failed")
        if self._file is not None:
            self._file.close()
            self._file = None

    def _append(self, line: bytes) -> None:
        if self._file is None:
            self._open()
        assert self._file is not None
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
            assert self._file is not None
        self._file.write(line)
        self._file.flush()  # a crash loses at most the record being written
        self._size += len(line)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        self._size = self._file.tell()

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            self._backup(self.backups).unlink(missing_ok=True)
            for index in range(self.backups - 1, 0, -1):
                if self._backup(index).exists():
                    self._backup(index).replace(self._backup(index + 1))
            self.path.replace(self._backup(1))
        self._open()

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")
