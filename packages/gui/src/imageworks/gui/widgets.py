"""Small pieces shared by the pages."""

from __future__ import annotations

import streamlit as st

STATE_COLOURS = {
    "ready": "green",
    "starting": "orange",
    "stopping": "orange",
    "failed": "red",
    "crashed": "red",
    "unreachable": "red",
    "stopped": "gray",
    "unknown": "gray",
}


def pill(label: str, ok: bool | None) -> None:
    colour = "gray" if ok is None else ("green" if ok else "red")
    st.markdown(f":{colour}-badge[{label}]")


def state_label(state: str) -> str:
    return f":{STATE_COLOURS.get(state, 'gray')}-badge[{state}]"


def proxy_down_banner(reason: str) -> None:
    st.error(
        f"**Chat proxy unavailable.** {reason}\n\nStart it from **Settings → Backends**, "
        "or run `uv run imageworks-chat-proxy`. This page recovers by itself once it is up.",
        icon=":material/cloud_off:",
    )


def flash(kind: str, message: str) -> None:
    """Show ``message`` after a rerun, so the page redraws with the state the action made."""
    st.session_state["flash"] = (kind, message)
    st.rerun()


def show_flash() -> None:
    kind, message = st.session_state.pop("flash", (None, None))
    if kind == "success":
        st.success(message)
    elif kind == "error":
        st.error(message)
    elif kind == "info":
        st.info(message)
