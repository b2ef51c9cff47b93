"""Settings: start and stop the proxy, autostart, backend addresses, deployment profiles."""

from __future__ import annotations

import contextlib
import time

import streamlit as st

from imageworks.gui.client import ProxyDown, ProxyRequestFailed
from imageworks.gui.envfile import read_variable, set_variable
from imageworks.gui.state import client, env_local, supervisor
from imageworks.gui.widgets import flash, pill, show_flash

AUTOSTART = "CHAT_PROXY_AUTOSTART_ENABLED"

st.title("Settings")
show_flash()
backends, profiles = st.tabs(["Backends", "Profiles"])
proxy = client()


def proxy_up() -> bool:
    try:
        proxy.health()
    except (ProxyDown, ProxyRequestFailed):
        return False
    return True


with backends:

    @st.fragment(run_every=2)
    def status() -> None:
        up = proxy_up()
        pill(f"Chat proxy {'running' if up else 'stopped'} · {proxy.base_url}", up)

    status()
    running = proxy_up()
    start, stop = st.columns(2)
    if start.button("Start Chat Proxy", icon=":material/play_arrow:", disabled=running):
        launched = supervisor().start()
        with st.spinner("Starting the chat proxy…"):
            deadline = time.monotonic() + 60
            while not proxy_up() and time.monotonic() < deadline:
                time.sleep(0.25)
        if proxy_up():
            flash("success", f"Chat proxy running (pid {launched.pid})")
        else:
            flash("error", f"The proxy did not come up; see {launched.log_path}")
    if stop.button("Stop Chat Proxy", icon=":material/stop:", disabled=not running):
        with st.spinner("Stopping the chat proxy (Ctrl+C)…"):
            outcome = supervisor().stop()
        flash("info", outcome)

    saved = read_variable(env_local(), AUTOSTART)
    try:
        live = proxy.autostart() if running else None
    except ProxyRequestFailed:
        live = None

    def autostart_changed() -> None:
        # A callback, run before the page, with a keyed widget: passing the live state as
        # the toggle's ``value`` changed the widget's identity and swallowed the next flip.
        wanted = bool(st.session_state["autostart"])
        set_variable(env_local(), AUTOSTART, "1" if wanted else "0")
        with contextlib.suppress(ProxyDown, ProxyRequestFailed):
            proxy.set_autostart(wanted)  # not running: .env.local applies when it starts
        st.toast(f"Autostart {'on' if wanted else 'off'} (saved to .env.local)")

    # The switch shows the truth each run: the running proxy's state, else the saved one.
    st.session_state["autostart"] = (
        live if live is not None else saved not in ("0", "false", "False")
    )
    st.toggle(
        "Autostart models on their first request",
        key="autostart",
        on_change=autostart_changed,
        help=f"Writes {AUTOSTART} to .env.local and applies it to the running proxy at once.",
    )

    st.subheader("Backend addresses")
    try:
        config = proxy.state()["config"]
        st.table(
            {
                "vLLM executor": [config.get("vllm_remote_url", "?")],
                "Ollama": [config.get("ollama_base_url", "?")],
                "Request log": [config.get("log_path", "?")],
            }
        )
    except (ProxyDown, ProxyRequestFailed):
        st.caption("Start the proxy to see the addresses it uses.")

with profiles:
    try:
        active, names = proxy.profile()
    except (ProxyDown, ProxyRequestFailed) as exc:
        st.caption(f"Profiles are switched through the running proxy: {exc}")
    else:
        choice = st.radio("Deployment profile", names, index=names.index(active), horizontal=True)
        if st.button("Apply profile", disabled=choice == active):
            proxy.set_profile(choice)
            flash("success", f"Profile {choice} is active; the Models page shows its models.")
