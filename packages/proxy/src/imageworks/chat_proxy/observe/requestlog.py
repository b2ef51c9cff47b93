"""The JSONL request log: one line per request or lifecycle event, written off the event loop.

One writer thread owns the file, so records from concurrent requests never interleave and a
record is never split: rotation happens only between records. When the next record would take
the file past ``max_bytes`` the file is renamed to ``.1`` (older backups shift to ``.2`` ...,
the oldest beyond ``backups`` is deleted) and a new file is started.

Waking a thread costs more than writing a record (futex calls and a GIL hand-over on the same
core as the event loop: ~80 us of CPU per request, measured), so the writer wakes for the first
record, writes it at once, then rests ``batch_s`` before looking again: an idle proxy logs each
request as it ends, a busy one writes a batch at most every ``batch_s`` and the event loop
never wakes a thread on its own request path. The rest is 0.1 s: at 0.01 s the writer still
took the GIL from the event loop every few requests (``strace``: one futex call per request
on the loop's thread at c=1), for records no reader needs sooner.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from imageworks.chat_proxy.observe.events import EventBus

log = logging.getLogger(__name__)


_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)  # one, not one per record
_GIL_EVERY = 16  # records serialised between chances for the event loop to take the GIL


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RequestLog:
    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        backups: int,
        recent: int = 500,
        batch_s: float = 0.1,
        bus: EventBus | None = None,
    ) -> None:
        self.path = path
        self.bus = bus  # events (not request records) are also published there
        self.max_bytes = max_bytes
        self.backups = backups
        self.batch_s = batch_s
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.dropped = 0
        # Records, and the marks of ``flush`` calls; append and popleft are thread-safe.
        self._pending: deque[dict[str, Any] | threading.Event] = deque()
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._hurry = threading.Event()  # cuts the writer's rest short (close, flush)
        self._thread: threading.Thread | None = None
        self._file: BinaryIO | None = None
        self._size = 0
        self._torn = False  # a failed write left a partial line that could not be cut off

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
        self._pending.append(record)
        if not self._ready.is_set():  # set() only wakes the writer while it is waiting
            self._ready.set()

    def event(self, event: str, component: str, **fields: Any) -> None:
        record = {"ts": utc_now_iso(), "event": event, "component": component, **fields}
        self.write(record)
        if self.bus is not None:
            self.bus.publish(record)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued before this call is in the file (or dropped); False
        if that took longer than ``timeout`` (or the writer is not running)."""
        if self._thread is None:
            return False
        written = threading.Event()
        self._pending.append(written)
        self._hurry.set()
        self._ready.set()
        return written.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush everything queued so far, then stop the writer."""
        if self._thread is None:
            return
        self._closing.set()
        self._hurry.set()
        self._ready.set()
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._closing.is_set():
            self._ready.wait()
            self._ready.clear()  # before draining: a record added after this sets it again
            self._drain()
            self._hurry.wait(self.batch_s)  # rest, unless closing or flushing
            self._hurry.clear()
        self._drain()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _drain(self) -> None:
        """Write every pending record; each file gets one write per batch, so a reader never
        sees half a line and rotation still falls between records."""
        batch: list[bytes] = []
        size = 0
        marks: list[threading.Event] = []
        serialised = 0
        while self._pending:
            record = self._pending.popleft()
            if isinstance(record, threading.Event):
                marks.append(record)  # a flush waits for what came before it
                continue
            try:
                # A lone surrogate (a client's "\ud800", kept by the body's decoding) is
                # written as its JSON escape, which reads back as the same string.
                line = _ENCODER.encode(record).encode("utf-8", "backslashreplace") + b"\n"
            except Exception:  # a bad record must not kill the writer
                self.dropped += 1
                log.exception("request log record could not be serialised")
                continue
            serialised += 1
            if serialised % _GIL_EVERY == 0:
                # The event loop gets the GIL if it wants it: it would otherwise wait for a
                # whole batch to be serialised (a hundred records: a millisecond and more,
                # the p99 of a request) before it could answer the next one.
                time.sleep(0)
            if batch and self._size + size + len(line) > self.max_bytes:
                self._write(batch)
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            self._write(batch)
        for mark in marks:
            mark.set()

    def _write(self, lines: list[bytes]) -> None:
        """One write of whole records. If it fails part-way (a full disk), the file is cut back
        to where the batch began and the batch counts as dropped: no partial line stays for the
        next record to be glued to. Should the cut fail too, the next batch starts on a line of
        its own."""
        start = None
        try:
            if self._file is None:
                self._open()
            assert self._file is not None
            data = b"".join(lines)
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
                assert self._file is not None
                self._torn = False  # a new file
            if self._torn:
                data = b"\n" + data
            start = self._size
            view = memoryview(data)
            while view:  # unbuffered: the batch reaches the file in one write
                view = view[self._file.write(view) :]
            self._size += len(data)
            self._torn = False
        except OSError:  # a full disk must not kill the writer either
            self.dropped += len(lines)
            log.exception("request log write failed; %d record(s) dropped", len(lines))
            if start is not None and self._file is not None:
                try:
                    self._file.truncate(start)
                    self._file.seek(start)
                except OSError:
                    self._torn = True

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab", buffering=0)
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
            # Deleted under us (an operator cleaning logs/): nothing to keep, and no reason to
            # lose the batch that is waiting.
            with contextlib.suppress(FileNotFoundError):
                self.path.replace(self._backup(1))
        self._open()

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")
