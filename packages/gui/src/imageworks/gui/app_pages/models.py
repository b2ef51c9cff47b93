"""Models: the registry for the active profile, with live state, and start/stop per row."""

from __future__ import annotations

import streamlit as st

from imageworks.gui.client import ProxyDown, ProxyRequestFailed
from imageworks.gui.state import client
from imageworks.gui.widgets import flash, proxy_down_banner, show_flash, state_label

st.title("Models")
show_flash()
proxy = client()
try:
    rows = [r for r in proxy.models() if r.visible]
    profile, _ = proxy.profile()
except (ProxyDown, ProxyRequestFailed) as exc:
    proxy_down_banner(str(exc))
    st.stop()

top = st.columns([4, 1])
top[0].caption(f"Deployment profile **{profile}** · {len(rows)} models")
if top[1].button("Reload registry", icon=":material/refresh:"):
    try:
        reloaded = proxy.reload_registry()
    except (ProxyDown, ProxyRequestFailed) as exc:
        flash("error", str(exc))
    else:
        flash("success", f"Registry {reloaded['version']} loaded ({reloaded['entries']} entries)")

WIDTHS = [3, 2, 2, 2, 3, 2]
header = st.columns(WIDTHS)
for column, title in zip(
    header, ["Model", "Backend", "State", "Capabilities", "", ""], strict=True
):
    column.markdown(f"**{title}**")
for row in rows:
    cols = st.columns(WIDTHS)
    cols[0].markdown(f"`{row.name}`")
    cols[1].write(row.backend + ("" if row.managed else " (external)"))
    cols[2].markdown(state_label(row.state) + (f" · {row.in_flight} busy" if row.in_flight else ""))
    cols[3].write(", ".join(row.capabilities) or "—")
    if row.managed and cols[4].button(
        "Activate via Proxy", key=f"activate-{row.name}", use_container_width=True
    ):
        with st.spinner(f"Loading {row.name}… (waits until it answers)"):
            try:
                state = proxy.activate(row.name)
            except (ProxyDown, ProxyRequestFailed) as exc:
                flash("error", f"{row.name} did not start: {exc}")
            else:
                flash("success", f"{row.name} is {state['state']}")
    if row.managed and cols[5].button(
        "Deactivate", key=f"deactivate-{row.name}", use_container_width=True
    ):
        try:
            stopped = proxy.deactivate(row.name)
        except (ProxyDown, ProxyRequestFailed) as exc:
            flash("error", str(exc))
        else:
            flash(
                "success",
                f"stopped {', '.join(stopped)}" if stopped else f"{row.name} was not running",
            )
    if row.last_error and row.state in ("failed", "crashed"):
        policy = f"restart: {row.restart}"
        if row.halted:
            policy += " · halted by a crash loop: Activate restarts it"
        elif row.retry_in_s:
            policy += f" · next automatic start in {row.retry_in_s:.0f} s"
        st.error(f"{row.name} ({row.state}; {policy}): {row.last_error}")
