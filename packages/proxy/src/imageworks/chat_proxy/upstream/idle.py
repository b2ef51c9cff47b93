"""The idle-read limit of a relayed stream (``CHAT_PROXY_READ_TIMEOUT_S``), kept with one timer
per stream instead of one per chunk.

aiohttp keeps its read limit (``ClientTimeout.sock_read``) by cancelling and re-arming a timer on
every network read: for a stream, one timer per chunk, ~5% of the proxy's CPU per stream on the
bench's 256 streams. The relay turns that off once the head has come (``take_over``) and marks,
per chunk, when it began waiting for the next one (an attribute set); the one timer here looks at
that mark when it fires and arms itself again for the rest (a stream that sends every second,
under the default 600 s, wakes it once every 600 s). A stream that stays silent past the
limit fails as aiohttp's would (``SocketTimeoutError`` on its body, in the same read). Time the
relay spends sending to a slow client is not counted: the backend is not the one late then.
"""

from __future__ import annotations

import asyncio

import aiohttp


class IdleLimit:
    """Fails ``response``'s body when the relay has waited ``seconds`` for its next chunk."""

    def __init__(self, response: aiohttp.ClientResponse, seconds: float) -> None:
        self.response = response
        self.seconds = seconds
        self.loop = asyncio.get_running_loop()
        self.since: float | None = self.loop.time()  # when the wait began; None: not waiting
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(seconds, self._check)

    @classmethod
    def take_over(cls, response: aiohttp.ClientResponse) -> IdleLimit | None:
        """Turn aiohttp's per-read timer off for ``response``'s body and keep its limit here;
        None if it has none (or the connection is already gone)."""
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        seconds = protocol.read_timeout if protocol is not None else None
        if protocol is None or not seconds:
            return None
        # Its timer armed by the last read is cancelled at the next one (aiohttp re-arms only
        # with a limit set); should it fire first, it fails the body as ours would.
        protocol.read_timeout = None
        return cls(response, seconds)

    def waiting(self) -> None:
        """The relay begins waiting for the next chunk."""
        self.since = self.loop.time()

    def got(self) -> None:
        """The relay sends a chunk on: not waiting for the backend until ``waiting``."""
        self.since = None

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        now = self.loop.time()
        since = self.since
        if since is not None and now - since >= self.seconds:
            self.timer = None
            self.response.content.set_exception(
                aiohttp.SocketTimeoutError("Timeout on reading data from socket")
            )
            return
        start = since if since is not None else now
        self.timer = self.loop.call_at(start + self.seconds, self._check)
