"""Small pieces shared by the pages."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import plotly.graph_objects as go
import streamlit as st

from imageworks.gui.client import ModelRow, ProxyDown, ProxyRequestFailed

T = TypeVar("T")

STATE_COLOURS = {
    "ready": "green",
    "starting": "orange",
    "stopping": "orange",
    "sleeping": "blue",
    "waking": "orange",
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


def duration(seconds: float | None) -> str:
    """``95`` -> ``1 min 35 s``; None -> ``—``."""
    if seconds is None:
        return "—"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def request_failed(exc: Exception) -> None:
    """The proxy answered, with an error: show its message (a 401 says which token is missing)."""
    status = getattr(exc, "status", None)
    if status in (401, 403):
        st.error(
            f"The proxy refused the console: {exc}. Start the console with the proxy's "
            "CHAT_PROXY_ADMIN_TOKEN (and an API key from CHAT_PROXY_API_KEYS when set).",
            icon=":material/lock:",
        )
    else:
        st.error(f"The proxy answered with an error: {exc}", icon=":material/error:")


def fetched(read: Callable[[], T]) -> T | None:
    """``read()`` from the proxy for a page's live part, or None once the page says why it
    could not be read (the proxy down: the banner; an error answer: its message)."""
    try:
        return read()
    except ProxyDown as exc:
        proxy_down_banner(str(exc))
    except ProxyRequestFailed as exc:
        request_failed(exc)
    return None


def wait_for_proxy(reason: str, is_up: Callable[[], bool]) -> None:
    """For a page that needs the proxy to draw at all: say it is down, and redraw the whole
    page by itself once it answers again."""

    @st.fragment(run_every=3)
    def watch() -> None:
        if is_up():
            st.rerun()
        proxy_down_banner(reason)

    watch()


RUNS_ON = {"vllm": "vLLM executor", "ollama": "Ollama server", "llamacpp": "this host"}


def where(row: ModelRow) -> str:
    """Peer, Ray application, or this proxy's own engines (on which GPU devices)."""
    location = row.location or {}
    kind = location.get("kind")
    if kind == "peer":
        return f"peer {location.get('peer') or location.get('name') or '?'}"
    if kind == "ray":
        return f"Ray {location.get('application') or location.get('node') or ''}".strip()
    running = row.managed and row.state in ("ready", "starting", "stopping")
    if not (running or row.devices):
        return "—"
    base = RUNS_ON.get(row.backend, "this host")
    return f"{base} · GPU {', '.join(map(str, row.devices))}" if row.devices else base


def timing(row: ModelRow) -> str:
    parts = []
    if row.pinned:
        parts.append("📌 pinned")
    elif row.idle_unload_in_s is not None:
        parts.append(f"unloads in {duration(row.idle_unload_in_s)}")
    parts.append(
        "never used" if row.last_used_s_ago is None else f"used {duration(row.last_used_s_ago)} ago"
    )
    if row.load_ms is not None:
        parts.append(f"loads in {row.load_ms / 1000:.1f} s")
    if row.wake_ms is not None:
        parts.append(f"wakes in {row.wake_ms / 1000:.2f} s")
    if row.state == "sleeping" and row.host_mb is not None:
        parts.append(f"asleep in {row.host_mb} MB of host RAM")
    return " · ".join(parts)


def chart(figure: go.Figure, key: str | None = None) -> None:
    """A plotly figure across the column, without plotly's toolbar over a small live chart."""
    st.plotly_chart(figure, width="stretch", config={"displayModeBar": False}, key=key)
