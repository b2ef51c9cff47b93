"""Playground: send a prompt to a model through the proxy, as any client would, and watch the
reply stream in with its time to first token and tokens per second."""

from __future__ import annotations

import streamlit as st

from imageworks.gui.client import ProxyDown, ProxyRequestFailed
from imageworks.gui.state import client
from imageworks.gui.widgets import request_failed, state_label, wait_for_proxy

LAST = "playground_last"

st.title("Playground")
st.caption(
    "Goes through the proxy's `/v1/chat/completions` like any client: the model starts on the "
    "first request if autostart is on. Handy to check a model after a swap."
)


def models() -> dict[str, str] | None:
    try:
        return {r.name: r.state for r in client().models() if r.visible}
    except ProxyDown as exc:
        wait_for_proxy(str(exc), client().is_up)
    except ProxyRequestFailed as exc:
        request_failed(exc)
    return None


def figures(ttft_ms: float | None, tokens: int, tokens_per_s: float | None) -> str:
    ttft = "—" if ttft_ms is None else f"{ttft_ms:,.0f} ms"
    rate = "—" if tokens_per_s is None else f"{tokens_per_s:,.1f}"
    return f"TTFT **{ttft}** · **{tokens}** tokens · **{rate}** tokens/s"


def send(model: str, prompt: str, max_tokens: int) -> None:
    reply = st.empty()
    text = ""
    try:
        stream = client().chat_stream(model, prompt, max_tokens)
        with st.spinner("Waiting for the first token (a model may be loading)…"):
            pieces = iter(stream)
            first = next(pieces, "")
        text = first
        reply.markdown(text + "▌")
        for piece in pieces:
            text += piece
            reply.markdown(text + "▌")
    except (ProxyDown, ProxyRequestFailed) as exc:
        st.session_state[LAST] = {"model": model, "text": text, "error": str(exc)}
        return
    reply.empty()
    st.session_state[LAST] = {
        "model": model,
        "text": text,
        "error": None,
        "figures": figures(stream.ttft_ms, stream.tokens, stream.tokens_per_s),
    }


@st.fragment(run_every=3)
def model_state(name: str) -> None:
    try:
        state = next((r.state for r in client().models() if r.name == name), "unknown")
    except (ProxyDown, ProxyRequestFailed):
        state = "unreachable"
    st.markdown(f"`{name}` is {state_label(state)}")


known = models()
if known is not None and not known:
    st.info("No model is offered in this deployment profile.")
elif known:
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    model = left.selectbox("Model", list(known), key="playground_model")
    max_tokens = right.number_input("Max tokens", 1, 4096, 64, key="playground_max")
    if model:
        model_state(model)
    with st.form("prompt", border=False):
        prompt = st.text_area("Prompt", "Say hello in one short sentence.", key="playground_prompt")
        submitted = st.form_submit_button("Send", icon=":material/send:", type="primary")
    if submitted and model and prompt.strip():
        send(model, prompt, int(max_tokens))
    last = st.session_state.get(LAST)
    if last:
        with st.container(border=True):
            st.caption(f"Reply from {last['model']}")
            st.markdown(last["text"] or "*(no text)*")
            if last["error"]:
                st.error(f"The request failed: {last['error']}")
            else:
                st.markdown(last["figures"])
