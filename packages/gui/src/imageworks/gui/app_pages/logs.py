"""Logs: follow a model's engine log (what the proxy's start of it wrote, the engine's own
output for llama.cpp) or the vLLM executor's log of it, read through the proxy."""

from __future__ import annotations

import streamlit as st

from imageworks.gui.client import ProxyDown, ProxyRequestFailed
from imageworks.gui.state import client
from imageworks.gui.widgets import fetched, request_failed, state_label, wait_for_proxy

SOURCES = {
    "engine": "Engine (autostart)",
    "executor": "vLLM executor",
}

st.title("Logs")


def managed() -> list[tuple[str, str]] | None:
    try:
        rows = client().models()
    except ProxyDown as exc:
        wait_for_proxy(str(exc), client().is_up)
        return None
    except ProxyRequestFailed as exc:
        request_failed(exc)
        return None
    return [(r.name, r.state) for r in rows if r.managed]


def show(name: str, source: str, lines: int) -> None:
    proxy = client()
    got = fetched(
        lambda: (
            proxy.engine_log(name, source, lines),
            next((r.state for r in proxy.models() if r.name == name), "unknown"),
        )
    )
    if got is None:
        return
    log, state = got
    st.markdown(f"`{name}` is {state_label(state)}")
    if not log.exists:
        where = (
            "the executor keeps it on its own host unless it shares the proxy's staging dir"
            if source == "executor"
            else "the model has not been started by this proxy yet"
        )
        st.info(f"No {SOURCES[source]} log for {name}: {where}.", icon=":material/draft:")
        return
    st.caption(f"The last {len(log.lines)} lines of the {SOURCES[source]} log of {name}")
    st.code("\n".join(log.lines) or "(empty)", language=None, height=520, wrap_lines=True)


known = managed()
if known is not None and not known:
    st.info("No model here is started by the proxy, so there is no engine log to read.")
elif known:
    top = st.columns([5, 5, 3, 2], vertical_alignment="bottom")
    name = top[0].selectbox("Model", [n for n, _ in known], key="log_model")
    source = top[1].segmented_control(
        "Log", list(SOURCES), format_func=SOURCES.__getitem__, default="engine", key="log_source"
    )
    lines = top[2].select_slider("Lines", [50, 100, 200, 500, 1000], value=200, key="log_lines")
    follow = top[3].toggle("Follow", value=True, key="log_follow", help="Re-read every 2 s")
    # Following re-reads the tail every 2 s in a fragment of its own; paused, it stays put.
    st.fragment(run_every=2 if follow else None)(show)(name, source or "engine", lines)
