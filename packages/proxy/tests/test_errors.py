from __future__ import annotations

import json

import pytest

from imageworks.chat_proxy.errors import (
    BackendTimeout,
    BackendUnavailable,
    CapabilityMismatch,
    GpuLeaseActive,
    InsufficientVram,
    InvalidRequest,
    ModelNotFound,
    ModelStartFailed,
    ModelStartTimeout,
    PayloadTooLarge,
    ProxyError,
    QueueFull,
    TemplateRequired,
    Unauthorized,
    UpstreamError,
    error_type,
    upstream_error,
)


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        # vLLM < 0.10.1: a flat body with Python-ish type and an integer code.
        (
            {"object": "error", "message": "too long", "type": "BadRequestError", "code": 400},
            "too long",
            "upstream_error",
        ),
        # vLLM 0.32 (since 0.10.1): the same keys nested, the code still an integer; the
        # param of a field its request model refused ("body.max_tokens").
        (
            {
                "error": {
                    "message": "Input should be a valid integer",
                    "type": "Bad Request",
                    "param": "body.max_tokens",
                    "code": 400,
                }
            },
            "Input should be a valid integer",
            "upstream_error",
        ),
        # OpenAI / llama.cpp / Ollama's OpenAI layer: nested.
        (
            {
                "error": {
                    "message": "bad temp",
                    "type": "invalid_request_error",
                    "code": "invalid_value",
                    "param": "temperature",
                }
            },
            "bad temp",
            "invalid_value",
        ),
        # Ollama's native API: {"error": "text"}.
        ({"error": 'model "x" not found'}, 'model "x" not found', "upstream_error"),
    ],
)
def test_backend_4xx_bodies_of_every_shape_pass_through(
    body: dict[str, object], message: str, code: str
) -> None:
    error = upstream_error(400, json.dumps(body).encode())
    assert isinstance(error, UpstreamError) and error.status == 400
    envelope = error.body()["error"]
    assert envelope["message"] == message and envelope["code"] == code
    assert envelope["type"] == "invalid_request_error"


def test_a_non_json_4xx_keeps_its_text() -> None:
    error = upstream_error(422, b"unprocessable thing")
    assert error.status == 422 and error.message == "unprocessable thing"


def test_a_backend_5xx_becomes_502_backend_unavailable() -> None:
    error = upstream_error(500, b'{"error": {"message": "CUDA out of memory"}}')
    assert isinstance(error, BackendUnavailable) and error.status == 502
    assert "CUDA out of memory" in error.message and error.log_code == "err_backend_unavailable"
    assert error.body()["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "invalid_request_error"),
        (409, "invalid_request_error"),
        (413, "invalid_request_error"),
        (423, "invalid_request_error"),  # a lease is not a rate limit: SDKs must not retry it
        (429, "rate_limit_error"),
        (499, "invalid_request_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
        (504, "server_error"),
    ],
)
def test_the_error_type_follows_openai_for_every_status(status: int, kind: str) -> None:
    assert error_type(status) == kind


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidRequest, 400, "invalid_request"),
        (Unauthorized, 401, "unauthorized"),
        (ModelNotFound, 404, "model_not_found"),
        (TemplateRequired, 409, "template_required"),
        (CapabilityMismatch, 409, "capability_mismatch"),
        (PayloadTooLarge, 413, "payload_too_large"),
        (GpuLeaseActive, 423, "gpu_lease_active"),
        (QueueFull, 503, "queue_full"),
        (InsufficientVram, 503, "insufficient_vram"),
        (BackendUnavailable, 502, "backend_unavailable"),
        (ModelStartFailed, 502, "model_start_failed"),
        (BackendTimeout, 504, "backend_timeout"),
        (ModelStartTimeout, 504, "model_start_timeout"),
    ],
)
def test_each_error_renders_its_status_and_code_in_the_envelope(
    error: type[ProxyError], status: int, code: str
) -> None:
    raised = error("what happened", param="p", headers={"Retry-After": "3"})
    assert raised.status == status and raised.log_code == f"err_{code}"
    assert json.loads(raised.to_bytes()) == {
        "error": {
            "message": "what happened",
            "type": error_type(status),
            "param": "p",
            "code": code,
        }
    }
    assert raised.headers == {"Retry-After": "3"}


def test_an_upstream_error_without_a_message_keeps_its_status() -> None:
    assert upstream_error(418, b"").message == "HTTP 418"
    assert upstream_error(400, b'{"detail": "flat"}').message == "flat"
    assert upstream_error(400, b"[1]").message == "[1]"
    assert upstream_error(400, b'{"error": 5}').message == '{"error": 5}'
    param = upstream_error(400, b'{"error": {"message": "m", "param": "top_p", "code": 7}}')
    assert param.param == "top_p" and param.body()["error"]["code"] == "upstream_error"
    assert isinstance(upstream_error(499, b"x"), UpstreamError)
    assert isinstance(upstream_error(500, b"x"), BackendUnavailable)
    assert isinstance(upstream_error(399, b"x"), BackendUnavailable)


def test_an_error_is_its_message() -> None:
    assert str(InvalidRequest("bad temperature")) == "bad temperature"


def test_upstream_error_text_is_decoded_leniently_and_bounded() -> None:
    assert upstream_error(400, b"\xff\xfe broken").message == "\ufffd\ufffd broken"
    assert upstream_error(400, b"x" * 600).message == "x" * 500


def test_missing_message_and_param_are_absent_not_the_string_none() -> None:
    no_message = upstream_error(400, b'{"error": {"code": "c"}}')
    assert no_message.message == '{"error": {"code": "c"}}'
    assert no_message.body()["error"]["code"] == "c"
    no_param = upstream_error(400, b'{"error": {"message": "m"}}')
    assert no_param.param is None and no_param.message == "m"


@pytest.mark.parametrize(
    ("status", "retry_after", "expected_status", "kept"),
    [
        (503, "7", 503, "7"),  # a backend's 503 stays a 503, with its Retry-After
        (429, "Wed, 21 Oct 2026 07:28:00 GMT", 429, "Wed, 21 Oct 2026 07:28:00 GMT"),
        (400, "7", 400, None),  # only 429 and 503 carry it
        (504, "7", 502, None),
        (500, "7", 502, None),
        (503, None, 503, None),
        (503, "7\r\nSet-Cookie: x=1", 503, None),  # a header injection is dropped
        (503, "9" * 65, 503, None),
    ],
)
def test_upstream_errors_keep_their_status_and_only_a_sane_retry_after(
    status: int, retry_after: str | None, expected_status: int, kept: str | None
) -> None:
    from imageworks.chat_proxy.errors import upstream_error

    error = upstream_error(status, b'{"error": {"message": "busy now"}}', retry_after)
    assert error.status == expected_status
    assert error.headers == ({"Retry-After": kept} if kept else {})
    if status == 503:
        assert error.message == "backend unavailable (HTTP 503): busy now"
        assert error.code == "backend_unavailable"


def test_an_upstream_error_without_a_message_says_what_it_was() -> None:
    from imageworks.chat_proxy.errors import upstream_error

    assert upstream_error(503, b"").message == "backend unavailable (HTTP 503): HTTP 503"
    assert upstream_error(502, "überlastet".encode()).message == (
        "backend error (HTTP 502): überlastet"
    )
