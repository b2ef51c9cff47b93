"""The event-stream formats the proxy relays: how each one ends, how an error is said in it
after the first byte, and where its usage (and, for Responses, the final object) is.

``OPENAI`` (chat, completions): ``data:`` events ending with ``data: [DONE]``; an error is
``data: {"error": ...}`` then ``[DONE]``. ``RESPONSES``: typed events ending with
``response.completed`` (or ``.failed`` / ``.incomplete``), usage inside that event's response;
an error is an ``error`` event. ``ANTHROPIC``: typed events ending with ``message_stop``; usage
split between ``message_start`` (input) and ``message_delta`` (output); an error is ``event:
error`` in Anthropic's envelope. Only the chat format is on the hot path, and it keeps its
one ``endswith`` per chunk (``done``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from imageworks.chat_proxy.errors import ProxyError, upstream_error

DONE = b"data: [DONE]\n\n"
# The type of an event: its ``event:`` line, else the ``type`` that opens its data object.
_EVENT_TYPE = re.compile(rb'^(?:event: ?([\w.]+)|data: ?\{"type": ?"([\w.]+)")', re.M)


def event_type(event: bytes) -> bytes | None:
    match = _EVENT_TYPE.search(event)
    if match is None:
        return None
    return match.group(1) or match.group(2)


def last_event(chunk: bytes) -> bytes:
    """The last complete event of a chunk (a chunk ends on an event's blank line)."""
    body = chunk.rstrip(b"\n")
    cut = body.rfind(b"\n\n")
    return body[cut + 2 :] if cut >= 0 else body


def _data_objects(blob: bytes) -> list[dict[str, Any]]:
    found = []
    for line in blob.split(b"\n"):
        if line.startswith(b"data:") and b"{" in line:
            try:
                data = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(data, dict):
                found.append(data)
    return found


class StreamFormat:
    """OpenAI's chat/completions stream."""

    name = "openai"
    done: bytes | None = DONE  # a chunk ending so is the last one (the chat hot path)
    needs_head = False  # usage is also in the first chunk (Anthropic's message_start)

    def ends(self, chunk: bytes) -> bool:
        return chunk.endswith(DONE)

    def saw_end(self, tail: bytes) -> bool:
        return b"[DONE]" in tail

    def error_event(self, error: ProxyError) -> bytes:
        return b"data: " + error.to_bytes() + b"\n\n" + DONE

    def account(self, head: bytes, tail: bytes) -> tuple[dict[str, Any] | None, ProxyError | None]:
        """The usage object, and an in-band upstream error, from the last events."""
        usage: dict[str, Any] | None = None
        error: ProxyError | None = None
        for line in reversed(tail.split(b"\n")):
            if not line.startswith(b"data: {"):
                continue
            if b'"usage"' in line and usage is None:
                try:
                    found = json.loads(line[6:]).get("usage")
                except ValueError:
                    continue
                if isinstance(found, dict):
                    usage = found
            if line.startswith(b'data: {"error"') and error is None:
                try:
                    inner = json.loads(line[6:])["error"]
                    error = upstream_error(500, json.dumps({"error": inner}).encode())
                except (ValueError, KeyError, TypeError):
                    pass
        return usage, error

    def final(self, tail: bytes) -> dict[str, Any] | None:
        """The stream's final object, where it has one (Responses: the response)."""
        return None


class ResponsesFormat(StreamFormat):
    name = "responses"
    done = None
    _ENDS = (b"response.completed", b"response.failed", b"response.incomplete")

    def ends(self, chunk: bytes) -> bool:
        return chunk.endswith(b"\n\n") and event_type(last_event(chunk)) in self._ENDS

    def saw_end(self, tail: bytes) -> bool:
        return any(event_type(last_event(tail)) == end for end in self._ENDS)

    def error_event(self, error: ProxyError) -> bytes:
        data = {"type": "error", "code": error.code, "message": error.message, "param": None}
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"

    def account(self, head: bytes, tail: bytes) -> tuple[dict[str, Any] | None, ProxyError | None]:
        final = self.final(tail)
        usage = final.get("usage") if final else None
        error = None
        for data in _data_objects(tail):
            if data.get("type") == "error":
                message = data.get("message") or "the backend reported an error mid-stream"
                error = upstream_error(500, json.dumps({"error": {"message": message}}).encode())
        return (usage if isinstance(usage, dict) else None), error

    def final(self, tail: bytes) -> dict[str, Any] | None:
        for data in reversed(_data_objects(tail)):
            if data.get("type") in ("response.completed", "response.incomplete", "response.failed"):
                response = data.get("response")
                return response if isinstance(response, dict) else None
        return None


class AnthropicFormat(StreamFormat):
    name = "anthropic"
    done = None
    needs_head = True

    def ends(self, chunk: bytes) -> bool:
        return chunk.endswith(b"\n\n") and event_type(last_event(chunk)) == b"message_stop"

    def saw_end(self, tail: bytes) -> bool:
        return event_type(last_event(tail)) == b"message_stop"

    def error_event(self, error: ProxyError) -> bytes:
        return b"event: error\ndata: " + error.anthropic_bytes() + b"\n\n"

    def account(self, head: bytes, tail: bytes) -> tuple[dict[str, Any] | None, ProxyError | None]:
        usage: dict[str, Any] = {}
        for data in _data_objects(head):
            if data.get("type") == "message_start":
                message = data.get("message")
                start = message.get("usage") if isinstance(message, dict) else None
                if isinstance(start, dict):
                    usage.update(start)
                break
        error = None
        for data in _data_objects(tail):
            kind = data.get("type")
            if kind == "message_delta" and isinstance(data.get("usage"), dict):
                usage.update(data["usage"])  # cumulative output tokens
            elif kind == "error":
                inner = data.get("error")
                message = inner.get("message") if isinstance(inner, dict) else None
                error = upstream_error(
                    500, json.dumps({"error": {"message": message or "mid-stream error"}}).encode()
                )
        return (usage or None), error


OPENAI = StreamFormat()
RESPONSES = ResponsesFormat()
ANTHROPIC = AnthropicFormat()
