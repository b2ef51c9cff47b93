"""History trimming for vision models (opt-in per entry: ``vision.keep_last_turns``).

Every image in a conversation costs its image tokens again on every turn; a long image chat
soon passes the model's context. Trimming keeps the system messages and the last N turns (a
turn starts at a user message and runs to the next one), and carries the images of the user
turns it drops onto the last user message, so the model still sees every picture the user
sent. The number of images never grows: carried images are ones the request already held.
Pure functions over the parsed messages.
"""

from __future__ import annotations

from typing import Any

SYSTEM_ROLES = frozenset({"system", "developer"})


def trim_turns(
    messages: list[Any], keep_last_turns: int, image_types: frozenset[str]
) -> tuple[list[Any], int]:
    """(the trimmed messages, how many were dropped); the input is not modified."""
    starts = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if len(starts) <= keep_last_turns:
        return messages, 0
    cut = starts[-keep_last_turns]
    kept_before = [m for m in messages[:cut] if m.get("role") in SYSTEM_ROLES]
    dropped = messages[:cut]
    carried = [
        part
        for m in dropped
        if m.get("role") == "user" and isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") in image_types
    ]
    tail = list(messages[cut:])
    if carried:
        last_user = max(i for i, m in enumerate(tail) if m.get("role") == "user")
        message = tail[last_user]
        content = message.get("content")
        if isinstance(content, str):
            own: list[Any] = [{"type": "text", "text": content}]
        else:
            own = list(content or [])
        tail[last_user] = {**message, "content": carried + own}
    return kept_before + tail, len(dropped) - len(kept_before)
