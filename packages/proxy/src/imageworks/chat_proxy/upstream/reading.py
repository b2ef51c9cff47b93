"""Reading what a backend or a peer answers, never more than a cap.

``aiohttp``'s ``response.read()`` reads whatever length the other side sends (a lying
backend's 300 MB error page became 300 MB in this process), and ``content.read(n)`` returns
the first buffered chunk, not ``n`` bytes (a peer's 150 KB model list was cut to 64 KB and the
peer taken for dead). ``read_capped`` reads to the end, refusing past the cap.
"""

from __future__ import annotations

import aiohttp


class TooLarge(Exception):
    """The answer is longer than the cap."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"larger than {cap} bytes")
        self.cap = cap


async def read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body, or ``TooLarge`` as soon as it is known to exceed ``cap`` bytes (by its
    ``Content-Length`` before reading, or while reading)."""
    if (response.content_length or 0) > cap:
        raise TooLarge(cap)
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > cap:
            raise TooLarge(cap)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
