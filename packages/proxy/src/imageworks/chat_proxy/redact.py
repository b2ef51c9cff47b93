"""The one place that decides what of a URL, a config or a message may be shown.

- ``redact_url``: a URL with its user info and every query value replaced by ``<hidden>``
  (``http://<hidden>@host/v1?api-version=<hidden>``): what admins see.
- ``redact_text``: every URL inside a free text redacted so (error messages in the JSONL log,
  ``/admin/requests``, ``/admin/state``).
- ``public_text``: what an API client may read of a message: no URL and no ``host:port`` at all
  (``the backend``), so it learns the model and what failed, not where the backend lives.
- ``redact``: a config (a registry entry, a peer) with every credential hidden: values under
  secret names (``api_key``, ``accessToken``, ``clientSecret``, ``PGPASSWORD``, ``hf_token``),
  the values of engine flags such as ``--api-key``, every value of opaque maps (HTTP
  ``headers``, an engine's ``env``, Ray's ``runtime_env.env_vars``) and the URLs in strings.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

HIDDEN = "<hidden>"

# Words that make a field or an engine flag a credential (``api_key``, ``hf_token``,
# ``--api-key``); ``max_tokens`` or ``tokenizer`` are other words and stay visible.
SECRET_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "pwd", "credential", "credentials"}
    | {"authorization", "cookie", "auth", "passphrase", "privatekey", "accesskey", "signature"}
)
# Glued endings (``PGPASSWORD``, ``accesstoken``, ``clientsecret``): a word that ends so is one.
SECRET_ENDINGS = ("password", "passwd", "secret", "token", "apikey", "credentials", "passphrase")
# Mappings whose every value may be a credential: HTTP headers, an engine's environment.
OPAQUE_MAPS = frozenset({"headers", "env", "environment", "env_vars", "envvars"})

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()\[\]{},]+")
_HOST_PORT = re.compile(
    r"\b(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|[a-zA-Z0-9][a-zA-Z0-9.-]*)?:\d{2,5}\b"
)
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")


def name_words(name: str) -> list[str]:
    """``accessToken`` -> access, token; ``--api-key`` -> api, key; ``PGPASSWORD`` -> pgpassword."""
    return [w for w in re.split(r"[^a-z0-9]+", _CAMEL.sub("_", name.lstrip("-")).lower()) if w]


def secret_name(name: str) -> bool:
    words = name_words(name)
    if not words or words[-1] == "env":  # ``api_key_env`` names a variable: no secret
        return False
    return any(w in SECRET_WORDS or w.endswith(SECRET_ENDINGS) for w in words)


def redact_url(text: str) -> str:
    """User info and query values hidden; anything that is not a URL comes back as it was."""
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return HIDDEN
    if not parts.scheme or not parts.netloc:
        return text
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = [p.partition("=") for p in query.split("&")]
        query = "&".join(f"{k}={HIDDEN}" if eq or v else k for k, eq, v in pairs)
    fragment = HIDDEN if parts.fragment else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted (``redact_url``)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


_QUOTED = re.compile(r"('[^'\n]{0,512}')")


def public_text(text: str) -> str:
    """``text`` without any URL, ``host:port`` or IP address (for API clients). Quoted names
    (``'qwen2.5vl:72'``, a model's name) stay as they are."""
    if "://" not in text and ":" not in text and "." not in text:
        return text
    parts = _QUOTED.split(text)
    text = "".join(p if i % 2 else _public(p) for i, p in enumerate(parts))
    return _IPV4.sub("the backend", text)


def _public(text: str) -> str:
    if "://" in text:
        text = re.sub(r"\s*\(\s*" + _URL.pattern + r"\s*\)", "", text)
        text = _URL.sub("the backend", text)
    if ":" in text:
        text = _HOST_PORT.sub(_host_port, text)
    return text


def _host_port(match: re.Match[str]) -> str:
    found = match.group(0)
    host = found.rpartition(":")[0]
    # ``12:30`` or ``line 3:14`` are no addresses; a dotted name or an IP is.
    if host and ("." in host or host.startswith("[") or "-" in host or host == "localhost"):
        return "the backend"
    return found


def _redact_args(args: list[Any]) -> list[Any]:
    """``--api-key X`` and ``--api-key=X`` lose X."""
    shown: list[Any] = []
    hide_next = False
    for arg in args:
        if hide_next and isinstance(arg, str) and not arg.startswith("-"):
            shown.append(HIDDEN)
            hide_next = False
            continue
        hide_next = False
        if isinstance(arg, str) and arg.startswith("-"):
            flag, equals, _ = arg.partition("=")
            if secret_name(flag):
                if equals:
                    arg = f"{flag}={HIDDEN}"
                else:
                    hide_next = True
        shown.append(redact(arg))
    return shown


def redact(value: Any, key: str = "") -> Any:
    """``value`` with every credential in it replaced by ``<hidden>`` (keys stay visible)."""
    if isinstance(value, dict):
        if key.lower() in OPAQUE_MAPS or key.replace("-", "_").lower() in OPAQUE_MAPS:
            return dict.fromkeys(value, HIDDEN)
        return {
            k: HIDDEN if secret_name(str(k)) and value[k] not in (None, "") else redact(v, str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return _redact_args(value)
    if isinstance(value, str) and "://" in value:
        return redact_text(value)
    return value
