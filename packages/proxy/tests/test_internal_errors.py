"""A bug in a forwarded request (an exception no step expects) is an enveloped 500 with the
request's id, the request has its JSONL record, and what it held is let go: a model limited to
one request at a time still takes the next one."""

from __future__ import annotations

import pytest

from imageworks.chat_proxy.routes import forward
from testkit.fake_engine import entry_for

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MESSAGES = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def _in_flight(proxy) -> float:
    return proxy.state.metrics.in_flight._value.get()


@pytest.mark.parametrize("step", ["check", "connect"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_bug_in_a_step_is_a_500_with_a_record_and_lets_the_model_go(
    proxy_factory, fake_vllm, monkeypatch, step: str, stream: bool
) -> None:
    proxy = proxy_factory([entry_for("m", fake_vllm.url, max_concurrency=1)])

    async def broken_connect(self: forward.Call, exchange: forward.Exchange) -> None:
        await exchange.acquire(self.entry)  # the model held, and its one turn
        raise RuntimeError("a bug")

    def broken_check(self: forward.Call, body: object) -> int:
        raise RuntimeError("a bug")

    broken = broken_connect if step == "connect" else broken_check
    monkeypatch.setattr(forward.Call, step, broken)
    ids = []
    for path, body, kind in (
        ("/v1/chat/completions", CHAT, "server_error"),
        ("/v1/messages", MESSAGES, "api_error"),
    ):
        rid = f"bug-{step}-{stream}-{len(ids)}"
        ids.append(rid)
        crash = proxy.client.post(
            path, json={**body, "stream": stream}, headers={"x-request-id": rid}, timeout=10
        )
        assert crash.status_code == 500, crash.text
        assert crash.headers["x-request-id"] == rid
        error = crash.json()["error"]
        assert error["type"] == kind and rid in error["message"], crash.text
        assert "a bug" not in crash.text  # the exception's type, not its text
    records = {r["request_id"]: r for r in proxy.records()}
    for rid in ids:
        assert records[rid]["status"] == 500, records
        assert records[rid]["error_code"] == "err_internal_error", records[rid]
    assert _in_flight(proxy) == 0
    monkeypatch.undo()
    after = proxy.client.post("/v1/chat/completions", json=CHAT, timeout=10)
    assert after.status_code == 200, after.text
