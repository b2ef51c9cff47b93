"""Engine commands, built on the server side from a registry entry and a launch template.

Nothing here runs an argv received from a client: the template comes from the supervisor's own
configuration (a JSON array of strings in an environment variable) and the values from the
registry it reads itself. A token that is exactly ``{extra_args}``, ``{chat_template_args}``,
``{tool_args}`` (the engine's tool-calling flags for an entry with ``capabilities.tools``) or
``{sleep_args}`` (vLLM's sleep-mode flag, for an entry the executor lets sleep) expands to a
list; other ``{placeholders}`` are filled inside their token. Used by the proxy's llama.cpp
engines (``CHAT_PROXY_LLAMACPP_LAUNCH_TEMPLATE``) and the vLLM executor
(``IMAGEWORKS_VLLM_LAUNCH_TEMPLATE``).
"""

from __future__ import annotations

import json
import string
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from imageworks.model_loader.schema import ModelEntry

LIST_TOKENS = frozenset({"{extra_args}", "{chat_template_args}", "{tool_args}", "{sleep_args}"})
COMMON_FIELDS = frozenset(
    {"python", "model_path", "host", "port", "served_model_id", "logical_name"}
)


class LaunchError(ValueError):
    pass


def parse_template(
    raw: str | None, default: tuple[str, ...], *, variable: str, fields: frozenset[str]
) -> tuple[str, ...]:
    """A template from configuration; an unknown placeholder is an error at start-up."""
    if not raw:
        return default
    try:
        template = json.loads(raw)
    except ValueError as exc:
        raise LaunchError(f"{variable} is not JSON: {exc}") from None
    if not isinstance(template, list) or not all(isinstance(t, str) for t in template):
        raise LaunchError(f"{variable} must be a JSON array of strings")
    for token in template:
        if token in LIST_TOKENS:
            continue
        try:
            parsed = list(string.Formatter().parse(token))
        except ValueError as exc:
            raise LaunchError(f"{variable}: bad token {token!r}: {exc}") from None
        for _, field_name, _, _ in parsed:
            if field_name is not None and field_name not in fields:
                raise LaunchError(
                    f"{variable}: unknown placeholder {{{field_name}}} "
                    f"(known: {', '.join(sorted(fields))})"
                )
    return tuple(template)


def _flag(token: str) -> str | None:
    return token.split("=", 1)[0] if token.startswith("--") else None


def dedupe_extra_args(command: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Drop from ``extra`` every flag the command already sets (with its value), so a registry
    entry cannot pass ``--chat-template`` twice or override the port the supervisor owns."""
    taken = {f for f in map(_flag, command) if f}
    kept: list[str] = []
    skip_value = False
    for token in extra:
        flag = _flag(token)
        if skip_value and flag is None:
            skip_value = False
            continue
        skip_value = False
        if flag in taken:
            skip_value = "=" not in token
            continue
        kept.append(token)
    return kept


def build_command(
    entry: ModelEntry,
    template: Sequence[str],
    *,
    host: str,
    port: int,
    tool_args: Sequence[str] = (),
    sleep_args: Sequence[str] = (),
    **more: Any,
) -> list[str]:
    model_path = entry.backend_config.model_path
    if not model_path:
        raise LaunchError(f"model {entry.name!r} has no backend_config.model_path")
    values: Mapping[str, Any] = {
        "python": sys.executable,
        "model_path": model_path,
        "host": host,
        "port": port,
        "served_model_id": entry.upstream_id,
        "logical_name": entry.name,
        **more,
    }
    command: list[str] = []
    for token in template:
        if token == "{chat_template_args}":
            command += chat_template_args(entry)
        elif token == "{tool_args}":
            command += tool_args
        elif token == "{sleep_args}":
            command += sleep_args
        elif token != "{extra_args}":
            command.append(token.format_map(values))
    if "{extra_args}" in template:
        command += dedupe_extra_args(command, entry.backend_config.extra_args)
    return command


def chat_template_args(entry: ModelEntry) -> list[str]:
    template = entry.chat_template
    if template is None:
        return []
    if template.path:
        return ["--chat-template", template.path]
    if template.source == "builtin" and template.name:
        return ["--chat-template", template.name]
    return []
