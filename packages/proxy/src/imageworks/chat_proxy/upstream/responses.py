"""Where each Responses id lives: the entry that made it, and, for engines that keep no
responses themselves (llama.cpp, Ollama, vLLM without its store), the conversation, so that
``previous_response_id`` and the requests by id still work.

``places`` (id -> entry name) is bounded (``MAX_IDS``, oldest forgotten first) and survives a
restart: each new id is one appended line of a small file next to the JSONL log, read back (and
cut to the bound) when the proxy starts. The conversations (input items, the response) stay in
memory, bounded in number and bytes: after a restart, or once evicted, a follow-up on such an
id is a clear 404, never another engine's answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

MAX_IDS = 10_000
MAX_KEPT = 1_000
MAX_KEPT_BYTES = 64 * 1024 * 1024
# An id is the engine's: one longer than this, or with a control character (a newline or a tab
# would write a line of the file of its own, placing another id), is not placed.
MAX_ID_CHARS = 512


def placeable(response_id: str) -> bool:
    return 0 < len(response_id) <= MAX_ID_CHARS and response_id.isprintable()


@dataclass
class Kept:
    """A response of an engine without a store: what it was asked, and its answer."""

    input: list[Any]
    response: dict[str, Any]
    size: int


class ResponseBook:
    def __init__(self, path: Path | None, max_ids: int = MAX_IDS) -> None:
        self.path = path
        self.max_ids = max_ids
        self.places: OrderedDict[str, str] = OrderedDict()
        self.kept: OrderedDict[str, Kept] = OrderedDict()
        self.kept_bytes = 0
        self._file: BinaryIO | None = None
        self._lines = 0

    # --- the id map ------------------------------------------------------------------------

    def load(self) -> ResponseBook:
        """Read the ids an earlier proxy placed (the newest ``max_ids``) and rewrite the file
        with those alone, so that it never grows beyond twice the bound."""
        if self.path is None:
            return self
        with contextlib.suppress(FileNotFoundError):
            for line in self.path.read_text(errors="replace").splitlines():
                rid, _, name = line.partition("\t")
                if placeable(rid) and name:
                    self._place(rid, name)
        self._rewrite()
        return self

    def place(self, response_id: str, entry: str) -> bool:
        """Remember that ``entry`` made ``response_id``; False: an id that cannot be placed."""
        if not placeable(response_id):
            log.warning("a response id from %r is not placed (too long or not printable)", entry)
            return False
        if self.places.get(response_id) == entry:
            return True
        self._place(response_id, entry)
        if self.path is None:
            return True
        if self._lines >= 2 * self.max_ids:
            self._rewrite()
            return True
        self._append(f"{response_id}\t{entry}\n".encode())
        return True

    def where(self, response_id: str) -> str | None:
        return self.places.get(response_id)

    def forget(self, response_id: str) -> None:
        self.places.pop(response_id, None)
        kept = self.kept.pop(response_id, None)
        if kept is not None:
            self.kept_bytes -= kept.size

    def _place(self, response_id: str, entry: str) -> None:
        self.places[response_id] = entry
        self.places.move_to_end(response_id)
        while len(self.places) > self.max_ids:
            self.places.popitem(last=False)

    def _append(self, line: bytes) -> None:
        try:
            if self._file is None:
                assert self.path is not None
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("ab", buffering=0)
            self._file.write(line)
            self._lines += 1
        except OSError as exc:  # a full disk loses the id's persistence, not the request
            log.warning("cannot record a response id in %s: %s", self.path, exc)

    def _rewrite(self) -> None:
        assert self.path is not None
        self.close()
        data = "".join(f"{rid}\t{name}\n" for rid, name in self.places.items()).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_bytes(data)
            partial.replace(self.path)
        except OSError as exc:
            log.warning("cannot rewrite %s: %s", self.path, exc)
        self._lines = len(self.places)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # --- conversations of engines without a store ------------------------------------------

    def keep(self, response: dict[str, Any], asked: list[Any]) -> None:
        rid = response.get("id")
        if not isinstance(rid, str):
            return
        size = len(json.dumps(asked)) + len(json.dumps(response))
        if size > MAX_KEPT_BYTES // 4:
            return
        self.forget_kept(rid)
        self.kept[rid] = Kept(asked, response, size)
        self.kept_bytes += size
        while len(self.kept) > MAX_KEPT or self.kept_bytes > MAX_KEPT_BYTES:
            _, old = self.kept.popitem(last=False)
            self.kept_bytes -= old.size

    def forget_kept(self, response_id: str) -> None:
        old = self.kept.pop(response_id, None)
        if old is not None:
            self.kept_bytes -= old.size

    def conversation(self, response_id: str) -> list[Any] | None:
        """The input items that continue ``response_id``: what it was asked, then its output."""
        kept = self.kept.get(response_id)
        if kept is None:
            return None
        output = kept.response.get("output")
        return [*kept.input, *(_as_input(item) for item in output or () if isinstance(item, dict))]


def as_items(value: Any) -> list[Any]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def _as_input(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as an input item: an assistant message keeps its role and its parts."""
    if item.get("type") == "message":
        return {
            "type": "message",
            "role": item.get("role", "assistant"),
            "content": item.get("content") or [],
        }
    return item
