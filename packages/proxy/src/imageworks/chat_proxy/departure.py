"""A client's departure told by the server's connection, instead of watched by a task.

Forwarding must stop when the client goes away (``upstream/forwarding.until_disconnect``).
ASGI says so only through ``receive()``, which needs a task waiting on it: one more task per
request, made, run once and cancelled (about a tenth of the proxy's CPU per request, and its
first step ran before the upstream request was written). The proxy's own uvicorn protocol
(``server/serving.py``) gives each request's task its connection's ``Departure`` (set in
``CONNECTION`` while uvicorn makes the task, which copies the context) and calls ``gone`` when
the connection is lost; a request watched here is cancelled at once. Under any other server
``CONNECTION`` is unset and the watcher task is used.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar


class Departure:
    """One client connection's end, told to the one request watching it."""

    __slots__ = ("_resume", "_watcher", "lost")

    def __init__(self, resume_reading: Callable[[], None]) -> None:
        self._resume = resume_reading
        self._watcher: Callable[[], None] | None = None
        self.lost = False

    def watch(self, watcher: Callable[[], None] | None) -> Callable[[], None] | None:
        """Call ``watcher`` when the connection is lost (None: stop); the one it replaces is
        returned, to be put back. The connection is read meanwhile (uvicorn pauses reading
        while a pipelined request waits; a paused socket would not see the client go)."""
        previous, self._watcher = self._watcher, watcher
        if watcher is not None:
            self._resume()
        return previous

    def gone(self) -> None:
        self.lost = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher()


# The connection of the request whose task is running (unset: not the proxy's own server).
CONNECTION: ContextVar[Departure | None] = ContextVar("imageworks_connection", default=None)
