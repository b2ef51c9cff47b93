"""Tool calls in answers: relayed as the engine sent them, with one exception.

An engine answering a request that declared ``tools`` with the legacy ``function_call`` (the
pre-2023 OpenAI shape, still produced by some templates and servers) has it converted to
``tool_calls`` (an id, ``type: function``, the arguments as a string), streamed or not, and a
``finish_reason`` of ``function_call`` becomes ``tool_calls``. A client that sent the legacy
``functions`` gets ``function_call`` back as it asked. Nothing else is touched: modern
``tool_calls`` pass byte for byte, and no JSON found in prose ever becomes a tool call (the
earlier proxy turned ``{"name": "Alice"}`` in a plain answer into a call to "Alice").
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

_MARK = b"function_call"
# Where an event ends: a blank line, in any of the line endings SSE allows (a server such as
# sse-starlette ends lines with CRLF; looking for "\n\n" alone held its whole stream back).
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# An "event" longer than this without an end is no event a converter could hold whole: it is
# passed on as it came, so a backend that never sends a blank line cannot grow memory.
MAX_PENDING = 4 * 1024 * 1024


def declares_tools(body: dict[str, Any]) -> bool:
    tools = body.get("tools")
    return isinstance(tools, list) and bool(tools)


def declares_functions(body: dict[str, Any]) -> bool:
    functions = body.get("functions")
    return isinstance(functions, list) and bool(functions)


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def convert_answer(raw: bytes) -> bytes:
    """A whole ``chat.completion`` with ``function_call`` messages converted (else ``raw``)."""
    if _MARK not in raw:
        return raw
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    changed = False
    for choice in _choices(data):
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {}
        call = message.get("function_call")
        if isinstance(call, dict) and not message.get("tool_calls"):
            message["tool_calls"] = [
                {
                    "id": _call_id(),
                    "type": "function",
                    "function": {
                        "name": call.get("name"),
                        "arguments": _arguments(call.get("arguments", "")),
                    },
                }
            ]
            del message["function_call"]
            changed = True
        if choice.get("finish_reason") == "function_call":
            choice["finish_reason"] = "tool_calls"
            changed = True
    return json.dumps(data).encode() if changed else raw


def _choices(data: Any) -> list[dict[str, Any]]:
    choices = data.get("choices") if isinstance(data, dict) else None
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


class StreamConverter:
    """Converts ``function_call`` deltas of an event stream as it passes.

    Chunks arrive as the network cut them; events are passed on whole (an event cut in two is
    held until its end arrives), unchanged unless they hold a ``function_call``. Each choice's
    first converted delta carries the call's id, type and name; later ones only arguments.
    """

    def __init__(self) -> None:
        self.pending = b""
        self.ids: dict[int, str] = {}  # choice index -> the id of its converted call

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk
        ends = list(_EVENT_END.finditer(data))
        if not ends:
            if len(data) > MAX_PENDING:
                self.pending = b""
                return data
            self.pending = data
            return b""
        ready, self.pending = data[: ends[-1].end()], data[ends[-1].end() :]
        if _MARK not in ready:
            return ready
        out, start = [], 0
        for end in ends:
            out.append(self._event(data[start : end.start()], end.group()))
            start = end.end()
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest

    def _event(self, event: bytes, end: bytes) -> bytes:
        if _MARK not in event or not event.startswith(b"data: {"):
            return event + end
        try:
            data = json.loads(event[6:])
        except ValueError:
            return event + end
        for choice in _choices(data):
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            call = delta.get("function_call")
            if isinstance(call, dict) and not delta.get("tool_calls"):
                index = choice.get("index", 0)
                index = index if isinstance(index, int) else 0  # a key, whatever was sent
                piece: dict[str, Any] = {"index": 0}
                function: dict[str, Any] = {}
                if index not in self.ids:
                    self.ids[index] = _call_id()
                    piece.update(id=self.ids[index], type="function")
                    function["name"] = call.get("name")
                elif call.get("name"):
                    function["name"] = call["name"]
                function["arguments"] = _arguments(call.get("arguments", ""))
                piece["function"] = function
                delta["tool_calls"] = [piece]
                del delta["function_call"]
            if choice.get("finish_reason") == "function_call":
                choice["finish_reason"] = "tool_calls"
        return b"data: " + json.dumps(data).encode() + end
