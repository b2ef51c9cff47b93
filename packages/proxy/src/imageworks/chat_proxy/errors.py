"""The proxy's error tree and its two renderings: the OpenAI error envelope and Anthropic's.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}`` with the status its
class carries; on the Anthropic Messages routes as ``{"type": "error", "error": {"type",
"message"}}`` (``anthropic``), where an overload (a full start queue, a backend's own 503) is
Anthropic's 529 ``overloaded_error``. Before the first streamed byte that is an HTTP response;
after it, an in-band event in the surface's stream format (see forwarding).
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from imageworks.chat_proxy.redact import public_text, redact_text


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for a status (SDKs choose the exception class by status)."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


# Anthropic's error ``type`` for a status (its SDK picks the exception class by status).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class ProxyError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if status is not None:
            self.status = status  # type: ignore[misc]

    @property
    def log_code(self) -> str:
        return f"err_{self.code}"

    def body(self, admin: bool = False) -> dict[str, Any]:
        """The envelope. API clients read no URL or address in it (``public_text``); admins
        (``admin``) read them with their credentials hidden (``redact_text``)."""
        return {
            "error": {
                "message": redact_text(self.message) if admin else self.public_message,
                "type": error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        }

    def to_bytes(self, admin: bool = False) -> bytes:
        return json.dumps(self.body(admin)).encode()

    @property
    def public_message(self) -> str:
        """The message as API clients read it, in any envelope: no URL or address."""
        return public_text(self.message)

    @property
    def log_message(self) -> str:
        """The message as the JSONL log and the admin views show it."""
        return redact_text(self.message)[:500]

    # An overload on the Anthropic routes is its 529 (the SDK retries it as an overload).
    overload: ClassVar[bool] = False

    def anthropic_status(self) -> int:
        return 529 if self.overload else self.status

    def anthropic_body(self) -> dict[str, Any]:
        status = self.anthropic_status()
        kind = _ANTHROPIC_TYPES.get(status)
        if kind is None:
            kind = "invalid_request_error" if status < 500 else "api_error"
        return {"type": "error", "error": {"type": kind, "message": self.public_message}}

    def anthropic_bytes(self) -> bytes:
        return json.dumps(self.anthropic_body()).encode()


def internal_error(exc: BaseException, request_id: str | None = None) -> ProxyError:
    """The 500 for an exception no step expected (a bug): its type, never its text (which
    may hold an address or a path), and the request id to find its traceback in the log."""
    text = f"internal error: {type(exc).__name__}"
    return ProxyError(f"{text}; request id {request_id}" if request_id else text)


class InvalidRequest(ProxyError):
    status = 400
    code = "invalid_request"


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"


class ModelNotFound(ProxyError):
    status = 404
    code = "model_not_found"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"


class TemplateRequired(ProxyError):
    status = 409
    code = "template_required"


class CapabilityMismatch(ProxyError):
    status = 409
    code = "capability_mismatch"


class RegistryInvalid(ProxyError):
    """A reload found a bad layer; the last good registry stays in service."""

    status = 409
    code = "registry_invalid"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    code = "unsupported_media_type"


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"


class GpuLeaseActive(ProxyError):
    status = 423
    code = "gpu_lease_active"


class ServerBusy(ProxyError):
    """The proxy's own budget (request bodies in flight) is spent for the moment."""

    status = 503
    code = "server_busy"


class QueueFull(ProxyError):
    status = 503
    code = "queue_full"
    overload = True


class InsufficientVram(ProxyError):
    """The GPU could not be freed for a model or a lease (busy models, or memory that never
    came back after an eviction)."""

    status = 503
    code = "insufficient_vram"


class RateLimited(ProxyError):
    """More requests for a model than its ``max_concurrency`` and wait queue hold."""

    status = 429
    code = "rate_limited"


class BackendBusy(ProxyError):
    """The backend answered 503 itself (overloaded, loading): it stays a 503, with the
    backend's ``Retry-After``, so that clients back off instead of treating it as a fault."""

    status = 503
    code = "backend_unavailable"
    overload = True


class BackendUnavailable(ProxyError):
    status = 502
    code = "backend_unavailable"
    # Set when the backend's address refused the connection (not a setting of ours that is
    # wrong): the lifecycle then checks whether the engine is still there.
    unreached = False


class ModelStartFailed(ProxyError):
    """The backend of a model exited or refused to start; the message has its log tail."""

    status = 502
    code = "model_start_failed"


class ModelBackoff(ProxyError):
    """The model's last start failed (or it crashes in a loop): no new start until the backoff
    has passed (``Retry-After``), or until an operator activates it by hand."""

    status = 503
    code = "model_start_backoff"


class ShuttingDown(ProxyError):
    """The proxy stopped (SIGINT/SIGTERM) before this request was answered."""

    status = 503
    code = "shutting_down"


class BackendTimeout(ProxyError):
    status = 504
    code = "backend_timeout"


class ModelStartTimeout(ProxyError):
    status = 504
    code = "model_start_timeout"


class UpstreamError(ProxyError):
    """A backend's own 4xx, passed through with its status and message."""

    code = "upstream_error"

    def __init__(
        self,
        status: int,
        message: str,
        *,
        upstream_code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, param=param, status=status)
        self.upstream_code = upstream_code

    def body(self, admin: bool = False) -> dict[str, Any]:
        body = super().body(admin)
        body["error"]["code"] = self.upstream_code or self.code
        return body


def upstream_error(status: int, raw: bytes, retry_after: str | None = None) -> ProxyError:
    """Turn a backend's error response (OpenAI and vLLM nested, vLLM < 0.10.1 flat, Ollama
    native) into ours. ``Retry-After`` is passed on with a 429 or a 503."""
    message, code, param = _parse_upstream_error(raw)
    text = message or raw[:500].decode("utf-8", "replace").strip() or f"HTTP {status}"
    error: ProxyError
    if 400 <= status < 500:
        error = UpstreamError(status, text, upstream_code=code, param=param)
    elif status == 503:
        error = BackendBusy(f"backend unavailable (HTTP 503): {text}")
    else:
        return BackendUnavailable(f"backend error (HTTP {status}): {text}")
    if retry_after and status in (429, 503) and _RETRY_AFTER.match(retry_after):
        error.headers["Retry-After"] = retry_after
    return error


# Seconds or an HTTP date, nothing that could split a header.
_RETRY_AFTER = re.compile(r"^[0-9A-Za-z ,:]{1,64}$")


def _parse_upstream_error(raw: bytes) -> tuple[str | None, str | None, str | None]:
    try:
        data = json.loads(raw)
    except ValueError:
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    inner = data.get("error", data)
    if isinstance(inner, str):  # Ollama native: {"error": "text"}
        return inner, None, None
    if not isinstance(inner, dict):
        return None, None, None
    message = inner.get("message") or data.get("detail")
    code = inner.get("code")
    param = inner.get("param")
    return (
        str(message) if message else None,
        str(code) if isinstance(code, str) else None,
        str(param) if param else None,
    )
