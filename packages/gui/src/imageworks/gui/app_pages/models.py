"""Models: every entry of the active profile with its live state, where it runs, idle unload,
pinned and last use; activate, deactivate and restart with the result shown on its row; the
last error and the engine log's tail of a model that failed or crashed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from imageworks.gui.client import ModelRow, ProxyClient, ProxyDown, ProxyRequestFailed
from imageworks.gui.state import client
from imageworks.gui.widgets import (
    fetched,
    state_label,
    timing,
    where,
)

RESULTS = "model_results"
WIDTHS = [3, 1.5, 1.5, 1.5, 2.5, 5]

st.title("Models")


def act(action: str, name: str) -> None:
    """A button's callback: runs before the page redraws, so the row shows the new state."""
    proxy = client()
    calls: dict[str, Callable[[ProxyClient], Any]] = {
        "activate": lambda p: f"{name} is {p.activate(name)['state']}",
        "restart": lambda p: f"{name} restarted: {p.restart(name)['state']}",
        "deactivate": lambda p: (
            f"stopped {', '.join(stopped)}"
            if (stopped := p.deactivate(name))
            else f"{name} was not running"
        ),
    }
    try:
        outcome = ("success", calls[action](proxy))
    except (ProxyDown, ProxyRequestFailed) as exc:
        verb = {"activate": "did not start", "restart": "did not restart"}.get(action, "failed")
        outcome = ("error", f"{name} {verb}: {exc}")
    st.session_state.setdefault(RESULTS, {})[name] = outcome


def reload_registry() -> None:
    try:
        reloaded = client().reload_registry()
    except (ProxyDown, ProxyRequestFailed) as exc:
        st.session_state["reload_result"] = ("error", str(exc))
    else:
        st.session_state["reload_result"] = (
            "success",
            f"Registry {reloaded['version']} loaded ({reloaded['entries']} entries)",
        )


def failure(row: ModelRow, proxy: ProxyClient) -> None:
    policy = f"restart: {row.restart}"
    if row.halted:
        policy += " · halted by a crash loop: Activate restarts it"
    elif row.retry_in_s:
        policy += f" · next automatic start in {row.retry_in_s:.0f} s"
    st.error(f"{row.name} ({row.state}; {policy}): {row.last_error}")
    with st.expander(f"Engine log of {row.name} (last 40 lines)"):
        try:
            log = proxy.engine_log(row.name, lines=40)
        except (ProxyDown, ProxyRequestFailed) as exc:
            st.caption(f"The log could not be read: {exc}")
        else:
            st.code("\n".join(log.lines) if log.lines else "(the log is empty)", language=None)


def model_row(row: ModelRow, proxy: ProxyClient) -> None:
    cols = st.columns(WIDTHS, vertical_alignment="center")
    cols[0].markdown(f"`{row.name}`")
    if row.capabilities:
        cols[0].caption(", ".join(row.capabilities))
    cols[1].write(row.backend + ("" if row.managed else " (external)"))
    cols[2].markdown(state_label(row.state) + (f" · {row.in_flight} busy" if row.in_flight else ""))
    cols[3].write(where(row))
    cols[4].caption(timing(row) if row.managed else "started elsewhere")
    if row.managed:
        running = row.state in ("ready", "starting")
        with cols[5].container(horizontal=True, gap="small"):
            st.button(
                "Activate",
                key=f"activate-{row.name}",
                on_click=act,
                args=("activate", row.name),
                disabled=row.state == "ready",
                help="Start the model (swapping out one that shares its slot); waits until it "
                "answers. Also restarts a model halted by a crash loop.",
            )
            st.button(
                "Restart",
                key=f"restart-{row.name}",
                on_click=act,
                args=("restart", row.name),
                disabled=not running,
                help="Stop the engine and start it again",
            )
            st.button(
                "Deactivate",
                key=f"deactivate-{row.name}",
                on_click=act,
                args=("deactivate", row.name),
                disabled=row.state == "stopped",
                help="Stop the engine once its requests finish",
            )
    result = st.session_state.get(RESULTS, {}).get(row.name)
    if result:
        (st.success if result[0] == "success" else st.error)(result[1])
    if row.last_error and row.state in ("failed", "crashed"):
        failure(row, proxy)


@st.fragment(run_every=3)
def live() -> None:
    proxy = client()
    got = fetched(lambda: ([r for r in proxy.models() if r.visible], proxy.profile()[0]))
    if got is None:
        return
    rows, profile = got
    top = st.columns([2, 2, 1], vertical_alignment="bottom")
    backends = top[0].multiselect("Backend", sorted({r.backend for r in rows}), key="backends")
    capabilities = top[1].multiselect(
        "Capability", sorted({c for r in rows for c in r.capabilities}), key="capabilities"
    )
    shown = [
        r
        for r in rows
        if (not backends or r.backend in backends)
        and all(c in r.capabilities for c in capabilities)
    ]
    top[2].button(
        "Reload registry", icon=":material/refresh:", on_click=reload_registry, width="stretch"
    )
    st.caption(f"Deployment profile **{profile}** · {len(shown)} of {len(rows)} models")
    reloaded = st.session_state.pop("reload_result", None)
    if reloaded:
        (st.success if reloaded[0] == "success" else st.error)(reloaded[1])
    header = st.columns(WIDTHS)
    for column, title in zip(
        header,
        ["Model", "Backend", "State", "Where", "Idle unload · last use", "Actions"],
        strict=True,
    ):
        column.markdown(f"**{title}**")
    for row in shown:
        model_row(row, proxy)


live()
