"""Property-based: whatever a client sends, the answer is never a 500 and never an empty body."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/admin/profile",
    "/admin/autostart",
]


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
        yield client
    proxy.stop()
    engine.stop()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(PATHS), body=bodies)
def test_no_500_and_no_empty_body(target: httpx.Client, path: str, body: bytes) -> None:
    method = "PUT" if path.startswith("/admin") else "POST"
    response = target.request(
        method, path, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code < 500 or response.status_code in (502, 504), response.text
    assert response.content, "empty body"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["code"]
