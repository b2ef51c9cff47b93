from __future__ import annotations

import json

import pytest

from imageworks.chat_proxy.errors import BackendUnavailable, UpstreamError, upstream_error


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        # vLLM < 0.10.1: a flat body with Python-ish type and an integer code.
        (
            {"object": "error", "message": "too long", "type": "BadRequestError", "code": 400},
            "too long",
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
