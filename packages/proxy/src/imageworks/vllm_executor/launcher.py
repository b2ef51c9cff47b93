"""The vLLM launch command, built on the server side from a registry entry and a template.

The executor never runs an argv it receives: the template comes from its own configuration
(``IMAGEWORKS_VLLM_LAUNCH_TEMPLATE``, a JSON array) and the values from the registry it reads
itself. A token that is exactly ``{extra_args}`` or ``{chat_template_args}`` expands to a list;
other ``{placeholders}`` are filled inside their token.
"""

from __future__ import annotations

import json
import string
import sys
from collections.abc import Sequence

from imageworks.model_loader.schema import ModelEntry

DEFAULT_TEMPLATE: tuple[str, ...] = (
    "{python}",
    "-m",
    "vllm.entrypoints.openai.api_server",
    "--model",
    "{model_path}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--served-model-name",
    "{served_model_id}",
    "--gpu-memory-utilization",
    "{gpu_memory_utilization}",
    "{chat_template_args}",
    "{extra_args}",
)
LIST_TOKENS = frozenset({"{extra_args}", "{chat_template_args}"})
FIELDS = frozenset(
    {
        "python",
        "model_path",
        "host",
        "port",
        "served_model_id",
        "gpu_memory_utilization",
        "logical_name",
    }
)


class LaunchError(ValueError):
    pass


def parse_template(raw: str | None) -> tuple[str, ...]:
    """A template from configuration; unknown placeholders are an error at start-up."""
    if not raw:
        return DEFAULT_TEMPLATE
    try:
        template = json.loads(raw)
    except ValueError as exc:
        raise LaunchError(f"IMAGEWORKS_VLLM_LAUNCH_TEMPLATE is not JSON: {exc}") from None
    if not isinstance(template, list) or not all(isinstance(t, str) for t in template):
        raise LaunchError("IMAGEWORKS_VLLM_LAUNCH_TEMPLATE must be a JSON array of strings")
    for token in template:
        if token in LIST_TOKENS:
            continue
        for _, field_name, _, _ in string.Formatter().parse(token):
            if field_name is not None and field_name not in FIELDS:
                raise LaunchError(
                    f"IMAGEWORKS_VLLM_LAUNCH_TEMPLATE: unknown placeholder "
                    f"{{{field_name}}} (known: {', '.join(sorted(FIELDS))})"
                )
    return tuple(template)


def _flag(token: str) -> str | None:
    return token.split("=", 1)[0] if token.startswith("--") else None


def dedupe_extra_args(command: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Drop from ``extra`` every flag the command already sets (with its value), so a registry
    entry cannot pass ``--chat-template`` twice or override the port the executor owns."""
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
    gpu_memory_utilization: float,
) -> list[str]:
    model_path = entry.backend_config.model_path
    if not model_path:
        raise LaunchError(f"model {entry.name!r} has no backend_config.model_path")
    values = {
        "python": sys.executable,
        "model_path": model_path,
        "host": host,
        "port": port,
        "served_model_id": entry.upstream_id,
        "logical_name": entry.name,
        "gpu_memory_utilization": gpu_memory_utilization,
    }
    command: list[str] = []
    for token in template:
        if token == "{chat_template_args}":
            command += _chat_template_args(entry)
        elif token != "{extra_args}":
            command.append(token.format_map(values))
    if "{extra_args}" in template:
        command += dedupe_extra_args(command, entry.backend_config.extra_args)
    return command


def _chat_template_args(entry: ModelEntry) -> list[str]:
    template = entry.chat_template
    if template is None:
        return []
    if template.path:
        return ["--chat-template", template.path]
    if template.source == "builtin" and template.name:
        return ["--chat-template", template.name]
    return []
