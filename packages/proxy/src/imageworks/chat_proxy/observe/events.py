"""The event bus behind ``GET /admin/events``: what changes, the moment it changes.

Every lifecycle and arbiter event (state changes, starts, wakes, sleeps, evictions, crashes,
leases, placements) that goes to the JSONL is also published here, with an ``id`` (a counter
that only grows) and its ``ts``. A subscriber gets a bounded queue of its own; publishing never
waits for anyone: when a subscriber's queue is full the event is dropped *for that
subscriber*, counted, and the next event it does get is preceded by a ``dropped`` event that
says how many it missed (so a slow client knows to re-read ``/admin/state``). The bus also
keeps the last ``history`` events, so a client that reconnects with ``Last-Event-ID`` gets
what it missed, as far as the bus still holds it.

It lives on the event loop: ``publish`` from another thread hops onto the loop first.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

# Request records are the JSONL's business (``/admin/requests``); the stream is for changes.
QUIET = frozenset({"request"})


class Subscriber:
    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(size)
        self.dropped = 0  # since the last ``dropped`` notice it received

    def offer(self, event: dict[str, Any]) -> bool:
        """Queue ``event`` without waiting; False: the queue was full and it was dropped."""
        if self.dropped and self.queue.qsize() < self.queue.maxsize - 1:
            notice = {"event": "dropped", "count": self.dropped, "ts": event.get("ts")}
            self.queue.put_nowait(notice)
            self.dropped = 0
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True


class EventBus:
    def __init__(self, *, queue_size: int = 256, history: int = 256) -> None:
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=history)
        self.published = 0
        self.dropped = 0  # over all subscribers, ever
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    def bind(self) -> None:
        """Remember the running loop (publishing from other threads goes through it)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def publish(self, record: dict[str, Any]) -> None:
        if record.get("event") in QUIET:
            return
        if self._loop is not None and threading.get_ident() != self._thread:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._publish, dict(record))
            return
        self._publish(dict(record))

    def _publish(self, record: dict[str, Any]) -> None:
        event = {"id": next(self._ids), **record}
        self.published += 1
        self.recent.append(event)
        for subscriber in list(self.subscribers):
            if not subscriber.offer(event):
                self.dropped += 1

    def open(self, after: int | None = None) -> Subscriber:
        """A new subscriber: events from now on, preceded by those after id ``after`` that the
        bus still holds. ``close`` it when done."""
        subscriber = Subscriber(self.queue_size)
        if after is not None:
            for event in [e for e in self.recent if e["id"] > after]:
                subscriber.offer(event)
        self.subscribers.add(subscriber)
        return subscriber

    def close(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    async def subscribe(self, after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The events as an iterator, until the caller stops iterating."""
        subscriber = self.open(after)
        try:
            while True:
                yield await subscriber.queue.get()
        finally:
            self.close(subscriber)

    def public(self) -> dict[str, Any]:
        return {
            "subscribers": len(self.subscribers),
            "published": self.published,
            "dropped": self.dropped,
        }


def sse(event: dict[str, Any]) -> bytes:
    """One event in the SSE wire format: ``id``, ``event`` and the JSON ``data``."""
    lines = []
    if "id" in event:
        lines.append(f"id: {event['id']}")
    lines.append(f"event: {event.get('event', 'message')}")
    lines.append("data: " + json.dumps(event, default=str, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()
