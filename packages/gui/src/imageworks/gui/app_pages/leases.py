"""Leases: who holds each GPU device (owner, reason, time left, what it evicted), and a force
release that asks first."""

from __future__ import annotations

import os
from datetime import datetime

import streamlit as st

from imageworks.gui.client import Lease, ProxyClient, ProxyDown, ProxyRequestFailed
from imageworks.gui.state import client
from imageworks.gui.widgets import duration, fetched

CONFIRM = "confirm_release"  # the owner whose lease the operator asked to end

st.title("Leases")
st.caption(
    "A lease lends one device to a client (e.g. Judge Vision): the proxy unloads its idle "
    "models from that device and places none there until the lease ends, expires or is "
    "force-released; the other devices go on serving."
)


def ask(owner: str) -> None:
    st.session_state[CONFIRM] = owner


def cancel() -> None:
    st.session_state.pop(CONFIRM, None)


def release(owner: str) -> None:
    token = st.session_state.get("release_token") or None
    proxy = ProxyClient(client().base_url, admin_token=token) if token else client()
    try:
        answer = proxy.force_release(owner)
    except (ProxyDown, ProxyRequestFailed) as exc:
        outcome = ("error", f"The lease was not released: {exc}")
    else:
        if answer.get("status") == "released":
            restoring = ", ".join(answer.get("restoring") or []) or "nothing"
            outcome = ("success", f"{owner}'s lease released; restoring {restoring}")
        else:
            outcome = ("info", "There was no lease to release (it ended meanwhile).")
    stamp = datetime.now().strftime("%H:%M:%S")
    st.session_state["release_result"] = (outcome[0], f"{stamp} · {outcome[1]}")
    st.session_state.pop(CONFIRM, None)


def token_needed() -> bool:
    """Does a release need a token the console does not have? (Asked only while confirming.)"""
    if os.environ.get("CHAT_PROXY_ADMIN_TOKEN"):
        return False
    try:
        return bool(client().state()["config"].get("admin_token_set"))
    except ProxyRequestFailed as exc:
        return exc.status in (401, 403)
    except ProxyDown:
        return False


def lease_card(title: str, lease: Lease | None) -> None:
    with st.container(border=True):
        st.subheader(title)
        if lease is None:
            st.markdown(":green-badge[free] No lease: the proxy places models here as needed.")
            return
        owner, reason, left = st.columns(3)
        owner.metric("Owner", lease.owner)
        reason.metric("Reason", lease.reason or "—")
        left.metric("Time left", duration(lease.time_left_s))
        st.caption(
            f"Held for {duration(lease.age_s)} · evicted: {', '.join(lease.evicted) or 'nothing'}"
            f" · on release the proxy {'restores' if lease.restart_model else 'does not restore'}"
            " the evicted models"
        )
        if st.session_state.get(CONFIRM) == lease.owner:
            st.warning(
                f"End **{lease.owner}**'s lease now? Its client may still be using the GPU.",
                icon=":material/warning:",
            )
            if token_needed():
                st.text_input(
                    "Admin token",
                    type="password",
                    key="release_token",
                    help="The proxy has CHAT_PROXY_ADMIN_TOKEN and the console was started "
                    "without it: enter it to release.",
                )
            with st.container(horizontal=True):
                st.button(
                    "Yes, release it",
                    key=f"yes-{title}",
                    type="primary",
                    on_click=release,
                    args=(lease.owner,),
                )
                st.button("Cancel", key=f"no-{title}", on_click=cancel)
        else:
            st.button(
                "Force release…",
                key=f"release-{title}",
                on_click=ask,
                args=(lease.owner,),
                icon=":material/lock_open:",
            )


@st.fragment(run_every=2)
def live() -> None:
    view = fetched(client().gpu_view)
    if view is None:
        return
    result = st.session_state.get("release_result")
    if result:
        {"success": st.success, "error": st.error}.get(result[0], st.info)(result[1])
    if view.pending:
        st.info(f"{view.pending} lease request(s) waiting for the GPU.")
    if view.devices:
        for device in view.devices:
            lease = device.lease
            if lease is None and len(view.devices) == 1 and view.leases:
                lease = view.leases[0]  # a proxy that does not say which device a lease is on
            lease_card(f"GPU {device.index} · {device.name}", lease)
    else:
        lease_card("GPU", view.leases[0] if view.leases else None)


live()
