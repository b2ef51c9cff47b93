"""Property-based, over the request bodies of every endpoint that takes one: whatever a client
sends, the answer is never a 500 and never an empty body, every error is in the OpenAI
envelope, and every refused request has its record in the JSONL log."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit.entries import eventually
from testkit.fake_engine import entry_for

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "max_tokens",
    "stop",
    "prompt",
    "input",
    "tools",
    "n",
    "top_p",
]
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={f: json_values for f in FIELDS}).map(
        lambda d: json.dumps(d).encode()
    ),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["m", "M", "missing", ""])},
        optional={f: json_values for f in FIELDS[1:]},
    ).map(lambda d: json.dumps(d).encode()),
)
ENDPOINTS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("PUT", "/admin/profile"),
    ("PUT", "/admin/autostart"),
    ("POST", "/admin/activate"),
    ("POST", "/admin/deactivate"),
    ("POST", "/admin/registry/reload"),
    ("POST", "/v1/gpu/lease"),
    ("POST", "/v1/gpu/renew"),
    ("POST", "/v1/gpu/release"),
    ("POST", "/v1/gpu/force_release"),
]
LEASE_FIELDS = ["owner", "reason", "restart_model", "ttl_s", "need_mb", "token", "max_age_s"]
lease_bodies = st.fixed_dictionaries({}, optional={f: json_values for f in LEASE_FIELDS}).map(
    lambda d: json.dumps(d).encode()
)
nested = st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n + b"]" * n)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    # Module-scoped: one proxy and one fake engine for every generated example.
    import shutil
    from pathlib import Path

    from imageworks.chat_proxy.app import create_app
    from imageworks.chat_proxy.config import ProxyConfig
    from testkit.fake_engine import FakeEngine
    from testkit.servers import AiohttpServer, UvicornServer

    root = tmp_path_factory.mktemp("fuzz")
    (root / "configs").mkdir()
    shutil.copy(
        Path(__file__).resolve().parents[3] / "configs" / "deployment_profiles.json",
        root / "configs",
    )
    engine = AiohttpServer(FakeEngine("llamacpp").app())
    (root / "configs" / "model_registry.curated.json").write_text(
        json.dumps([entry_for("m", engine.url, "llamacpp", capabilities={"embedding": True})])
    )
    config = ProxyConfig.load(
        environ={},
        cwd=root,
        registry_dir=root / "configs",
        staging_dir=root / "s",
        log_path=root / "l.jsonl",
    )
    proxy = UvicornServer(create_app(config))
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        yield client, config.log_path
    proxy.stop()
    engine.stop()


_ids = itertools.count()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies | lease_bodies | nested)
def test_no_500_every_error_enveloped_and_logged(
    target: tuple[httpx.Client, Path], endpoint: tuple[str, str], body: bytes
) -> None:
    client, log_path = target
    method, path = endpoint
    request_id = f"fuzz-{next(_ids)}"
    response = client.request(
        method,
        path,
        content=body,
        headers={"content-type": "application/json", "x-request-id": request_id},
    )
    assert response.status_code < 500 or response.status_code in (502, 503, 504), response.text
    assert response.content, "empty body"
    assert response.headers["x-request-id"] == request_id
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]

        def logged() -> bool:
            return log_path.exists() and f'"request_id": "{request_id}"' in log_path.read_text()

        assert eventually(logged), f"{request_id} ({response.status_code}) not in the log"
