"""Big ``data:`` strings lifted out of a JSON body before it is parsed, and put back when it is
written again.

A camera photograph is 8-16 MB of base64 in one JSON string. ``json.loads`` and ``json.dumps``
walk such a string in one C call that holds the GIL for 50-150 ms on a busy core: even in a
worker thread that stops the event loop, and every text request with it. So a big body is
first cut (in the vision pool, with ``bytes.find``, which is memchr-fast): each long string
that starts with ``data:`` and needs no JSON unescaping is replaced by a short placeholder,
the small rest is parsed, and ``dump`` splices the strings back as bytes. The image bytes
never become a Python ``str`` unless they are rewritten.

A placeholder carries a per-request random nonce, so a client cannot forge one. The cut keeps
JSON validity as it was: only runs of plain string characters (no backslash, no control
character) between two quotes are replaced by other plain string characters.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

LIFT_MIN = 64 * 1024  # shorter strings are parsed with the rest
_STEP = 256 * 1024  # one GIL-holding call at a time stays around a millisecond
_CONTROLS = bytes(range(0x20))
_PREFIX = "imageworks-lifted:"


class LiftedBody:
    def __init__(self, skeleton: bytes, strings: list[bytes], nonce: str) -> None:
        self.skeleton = skeleton  # the body with placeholders, for ``json.loads``
        self.strings = strings
        self.marker = f"{_PREFIX}{nonce}:"
        self._pattern = re.compile(re.escape(self.marker.encode()) + rb"(\d+)")

    @classmethod
    def lift(cls, raw: bytes) -> LiftedBody:
        nonce = secrets.token_hex(8)
        marker = f"{_PREFIX}{nonce}:".encode()
        pieces: list[bytes] = []
        strings: list[bytes] = []
        kept = search = 0
        while (start := raw.find(b'"data:', search)) >= 0:
            end = raw.find(b'"', start + 1)
            if end < 0:
                break
            search = end + 1
            if end - start - 1 < LIFT_MIN or _escaped(raw, start) or not _plain(raw, start, end):
                continue
            pieces += [raw[kept : start + 1], marker + str(len(strings)).encode()]
            strings.append(raw[start + 1 : end])
            kept = end
        if not strings:
            return cls(raw, [], nonce)
        pieces.append(raw[kept:])
        return cls(b"".join(pieces), strings, nonce)

    def value(self, text: str) -> bytes | None:
        """The lifted string a placeholder stands for (None: ``text`` is no placeholder)."""
        if not self.strings or not text.startswith(self.marker):
            return None
        index = text[len(self.marker) :]
        return self.strings[int(index)] if index.isdigit() else None

    def dump(self, body: Any) -> bytes:
        """``body`` as JSON bytes, the placeholders still in it replaced by their strings."""
        text = json.dumps(body).encode()
        if not self.strings:
            return text
        return self._pattern.sub(lambda m: self.strings[int(m[1])], text)


def _escaped(raw: bytes, quote: int) -> bool:
    """Is the quote at ``quote`` escaped (inside a string)? An odd run of backslashes."""
    count = 0
    while quote - count - 1 >= 0 and raw[quote - count - 1] == 0x5C:
        count += 1
    return count % 2 == 1


def _plain(raw: bytes, start: int, end: int) -> bool:
    """No backslash (an escape to decode) and no control character (invalid JSON) between."""
    if raw.find(b"\\", start, end) >= 0:
        return False
    for at in range(start + 1, end, _STEP):
        chunk = raw[at : min(end, at + _STEP)]
        if len(chunk.translate(None, _CONTROLS)) != len(chunk):
            return False
    return True
