"""Checking and preparing an OpenAI request body before it is forwarded.

Validation covers what the proxy relies on and what the OpenAI API rejects with a clear 400;
every other field passes through untouched for the backend to judge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from imageworks.chat_proxy.errors import CapabilityMismatch, InvalidRequest, TemplateRequired
from imageworks.chat_proxy.request.toolcalls import declares_functions, declares_tools
from imageworks.chat_proxy.vision.prepare import IMAGE_PARTS
from imageworks.model_loader.schema import ModelEntry

CHAT, COMPLETIONS, EMBEDDINGS = "chat", "completions", "embeddings"
PATHS = {CHAT: "/chat/completions", COMPLETIONS: "/completions", EMBEDDINGS: "/embeddings"}

_NUMBERS = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
)
_INTEGERS = ("max_tokens", "max_completion_tokens", "n", "top_k", "seed", "min_tokens")
# Where the generation defaults go: all of them (the OpenAI surfaces they were written for), or
# those the surface has, under its own names (Responses, Anthropic Messages); other surfaces
# (embeddings, rerank, audio) take none.
_ALL_DEFAULTS = frozenset({CHAT, COMPLETIONS})
_SAMPLING = {"temperature": "temperature", "top_p": "top_p"}
_MAPPED_DEFAULTS = {
    "responses": {**_SAMPLING, "max_tokens": "max_output_tokens"},
    "messages": {**_SAMPLING, "top_k": "top_k", "stop": "stop_sequences"},
}
# generation_defaults keys that describe the model rather than a request.
_NOT_REQUEST_FIELDS = frozenset({"context_window", "stop_sequences"})


def _not_json(constant: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON does not have: engines would get them.
    raise InvalidRequest(f"request body is not valid JSON: {constant} is not a JSON number")


# One decoder for every body: ``json.loads`` with an argument builds a new one per call (a
# few microseconds of every request). Bytes are decoded as ``json.loads`` decodes them.
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        data = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def parse_valid(endpoint: str, raw: bytes) -> tuple[dict[str, Any], str]:
    """``parse_body`` then ``validate``: the body and its model name (one call for the pool)."""
    body = parse_body(raw)
    return body, validate(endpoint, body)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_common(body: dict[str, Any]) -> str:
    """The model name and ``stream``, which every surface's body has; return the model."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest(
            "you must provide a model parameter (a non-empty string)", param="model"
        )
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in model):
        # Resolution ignores case and punctuation; a control character must not vanish in it.
        raise InvalidRequest("the model name contains control characters", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    return model


def validate(endpoint: str, body: dict[str, Any]) -> str:
    """Check the fields the proxy depends on; return the requested model name."""
    model = validate_common(body)
    validate_sampling(body)
    _validate_endpoint(endpoint, body)
    return model


def validate_sampling(body: dict[str, Any]) -> None:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    for name in _NUMBERS:
        if name in body and body[name] is not None and not _is_number(body[name]):
            raise InvalidRequest(f"'{name}' must be a number", param=name)
    for name in _INTEGERS:
        if (
            name in body
            and body[name] is not None
            and not (_is_int(body[name]) and body[name] >= 0)
        ):
            raise InvalidRequest(f"'{name}' must be a non-negative integer", param=name)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")


def _validate_endpoint(endpoint: str, body: dict[str, Any]) -> None:
    if endpoint == CHAT:
        _validate_messages(body.get("messages"))
        for name in ("tools", "functions"):
            # Not a list: neither the capability check (it looks for a list) nor an engine
            # would read it as tools; OpenAI refuses it too.
            value = body.get(name)
            if value is not None and not (
                isinstance(value, list) and all(isinstance(t, dict) for t in value)
            ):
                raise InvalidRequest(f"'{name}' must be a list of objects", param=name)
    elif endpoint == COMPLETIONS:
        if not isinstance(body.get("prompt"), str | list):
            raise InvalidRequest("'prompt' is required (a string or a list)", param="prompt")
    elif endpoint == EMBEDDINGS and not isinstance(body.get("input"), str | list):
        raise InvalidRequest("'input' is required (a string or a list)", param="input")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object", param=where)
        if not isinstance(message.get("role"), str):
            raise InvalidRequest(f"'{where}.role' must be a string", param=f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"'{where}.content' must be a string, a list of parts or null",
                param=f"{where}.content",
            )
        if isinstance(content, list):
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    param = f"{where}.content[{part_index}]"
                    raise InvalidRequest(f"'{param}' must be an object with a 'type'", param=param)


# Request fields that reach the engine's own machinery rather than the generation: a chat
# template (Jinja run by the engine; vLLM advisories GHSA-6fvq-23cw-5628 and
# GHSA-4hw3-g54f-xfrj), its kwargs, processor kwargs, logits processors loaded by name, and
# vLLM's pass-through extras. Refused unless the entry lists the field in
# ``allow_request_fields``.
ENGINE_CONTROL_FIELDS = (
    "chat_template",
    "chat_template_kwargs",
    "mm_processor_kwargs",
    "logits_processors",
    "vllm_xargs",
    "kv_transfer_params",
)


def check_engine_fields(entry: ModelEntry, body: dict[str, Any]) -> None:
    for name in ENGINE_CONTROL_FIELDS:
        if name in body and name not in entry.allow_request_fields:
            raise InvalidRequest(
                f"'{name}' is not accepted from requests for model {entry.name!r}: it controls "
                "the engine itself; list it in the entry's allow_request_fields to allow it",
                param=name,
            )


def count_images(body: dict[str, Any]) -> int:
    count = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content if part.get("type") in IMAGE_PARTS)
    return count


def check_capabilities(endpoint: str, entry: ModelEntry, body: dict[str, Any]) -> int:
    """Refuse what the model cannot take; return the number of images (chat only)."""
    caps = entry.capabilities
    if endpoint == EMBEDDINGS:
        if not caps.embedding:
            raise CapabilityMismatch(
                f"model {entry.name!r} is not an embedding model", param="model"
            )
        return 0
    if not caps.text and caps.embedding:
        raise CapabilityMismatch(
            f"model {entry.name!r} is an embedding model; use /v1/embeddings", param="model"
        )
    if endpoint != CHAT:
        return 0
    images = count_images(body)
    if images and not caps.vision and not entry.vision.alt_text:
        raise CapabilityMismatch(
            f"model {entry.name!r} does not accept images ({images} sent); "
            "choose a model with the vision capability or send text only (or set "
            "vision.alt_text in its entry to send each image's alt_text instead)",
            param="messages",
        )
    if (
        (declares_tools(body) or declares_functions(body))
        and not caps.tools
        and "tools" not in entry.allow_request_fields
    ):
        field = "tools" if declares_tools(body) else "functions"
        raise CapabilityMismatch(
            f"model {entry.name!r} does not support tool calling (its entry has no "
            f"capabilities.tools), so '{field}' would be ignored or garbled; choose a model "
            'with the tools capability, or list "tools" in the entry\'s '
            "allow_request_fields to forward tools anyway",
            param=field,
        )
    return images


def check_template(entry: ModelEntry, required: bool, template_needed: bool) -> None:
    if not (required and template_needed):
        return
    template = entry.chat_template
    if template is None or not template.usable:
        raise TemplateRequired(
            f"model {entry.name!r} has no usable chat template; set chat_template in its "
            'registry entry (e.g. {"source": "external", "path": '
            '"configs/chat_templates/<model>.jinja"}) or start the proxy with '
            "CHAT_PROXY_REQUIRE_TEMPLATE=0",
            param="model",
        )


def prepare(
    endpoint: str,
    entry: ModelEntry,
    body: dict[str, Any],
    raw: bytes,
    changed: bool = False,
    dump: Callable[[dict[str, Any]], bytes] | None = None,
) -> bytes:
    """Fill generation defaults the request omits and send the served id; re-encode only if
    something changed (``changed``: the caller already changed ``body``), so that a request
    the proxy has nothing to add to travels byte for byte as it came. ``dump``: how to encode
    it (a lifted body puts its big strings back)."""
    if body["model"] != entry.upstream_id:
        body["model"] = entry.upstream_id
        changed = True
    if endpoint in _ALL_DEFAULTS:
        defaults = dict(entry.request_defaults)  # a copy: stop_sequences may be mapped
        if "stop_sequences" in defaults and "stop" not in defaults:
            defaults["stop"] = defaults["stop_sequences"]
        for key, value in defaults.items():
            if key in _NOT_REQUEST_FIELDS or key in body:
                continue
            if key == "max_tokens" and "max_completion_tokens" in body:
                continue
            body[key] = value
            changed = True
    elif endpoint in _MAPPED_DEFAULTS:
        for key, name in _MAPPED_DEFAULTS[endpoint].items():
            value = entry.request_defaults.get(key)
            if value is not None and name not in body:
                body[name] = (
                    [value] if name == "stop_sequences" and isinstance(value, str) else value
                )
                changed = True
    if not changed:
        return raw
    try:
        return dump(body) if dump is not None else json.dumps(body).encode()
    except RecursionError:  # parsed just under the limit, re-encoded from deeper in the stack
        raise InvalidRequest("request body is nested too deeply") from None
