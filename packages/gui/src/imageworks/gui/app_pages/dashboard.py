"""Dashboard: is the proxy up, what is loaded, how fast it answers, how full the GPU is."""

from __future__ import annotations

from datetime import datetime

import plotly.graph_objects as go
import streamlit as st

from imageworks.gui.charts import device_bar
from imageworks.gui.client import ProxyDown, ProxyRequestFailed
from imageworks.gui.state import client
from imageworks.gui.widgets import chart, pill, proxy_down_banner, state_label

st.title("Dashboard")


@st.fragment(run_every=3)
def live() -> None:
    proxy = client()
    try:
        health = proxy.health()
        rows = proxy.models()
        recent = proxy.recent_requests(100)
        gpu = proxy.gpu_view()
    except (ProxyDown, ProxyRequestFailed) as exc:
        pill("Proxy down", False)
        proxy_down_banner(str(exc))
        return
    pill(f"Proxy up · profile {health.profile} · {health.models} models", True)
    broken = [r for r in rows if r.visible and r.state in ("failed", "crashed", "unreachable")]
    failing = [
        r
        for r in recent[:20]
        if r.get("error_code")
        in ("err_backend_unavailable", "err_model_start_failed", "err_backend_timeout")
    ]
    if broken or failing:
        names = ", ".join(
            sorted(
                {r.name for r in broken}
                | {str(r.get("logical_name") or r.get("model")) for r in failing}
            )
        )
        st.warning(
            f"**Backend unavailable** for: {names}. See Models for the error.",
            icon=":material/warning:",
        )
    if health.registry_error:
        st.warning(f"Registry edit rejected, last good registry in use: {health.registry_error}")

    left, right = st.columns([3, 2])
    with left, st.container(border=True):
        st.subheader("Active model")
        active = [r for r in rows if r.state in ("ready", "starting", "stopping") and r.managed]
        if not active:
            st.markdown("**None**: models start on their first request.")
        for row in active:
            since = datetime.fromtimestamp(row.since).strftime("%H:%M:%S") if row.since else "?"
            load = f" · loaded in {row.load_ms / 1000:.1f} s" if row.load_ms else ""
            st.markdown(
                f"**{row.name}** · {row.backend} · {state_label(row.state)} · since "
                f"{since}{load} · {row.in_flight} in flight"
            )
    with right, st.container(border=True):
        st.subheader("GPU memory")
        if not gpu.devices:
            st.caption("No GPU measured and no budget declared: see the GPU page.")
        for device in gpu.devices:
            st.markdown(
                f"**GPU {device.index} · {device.name}** · {device.used_mb:,} of "
                f"{device.total_mb:,} MB used · ours {device.ours_mb:,} MB"
            )
            chart(device_bar(device), key=f"dash-gpu-{device.index}")
        for lease in gpu.leases:
            st.info(
                f"GPU leased to **{lease.owner}** ({lease.reason or 'no reason'}), "
                f"{lease.age_s:.0f} s old"
            )

    requests = [r for r in reversed(recent) if r.get("ttft_ms") is not None]
    with st.container(border=True):
        st.subheader("Latency (recent requests)")
        if requests:
            figure = go.Figure()
            x = [r.get("ts") for r in requests]
            figure.add_scatter(
                x=x, y=[r.get("ttft_ms") for r in requests], name="TTFT ms", mode="lines+markers"
            )
            figure.add_scatter(
                x=x, y=[r.get("total_ms") for r in requests], name="total ms", mode="lines+markers"
            )
            figure.update_layout(height=220, margin={"t": 10, "b": 10, "l": 10, "r": 10})
            chart(figure)
        else:
            st.caption("No requests yet.")
    st.subheader("Recent requests")
    if recent:
        st.dataframe(
            [
                {
                    k: r.get(k)
                    for k in (
                        "ts",
                        "model",
                        "backend",
                        "stream",
                        "status",
                        "error_code",
                        "ttft_ms",
                        "total_ms",
                        "completion_tokens",
                    )
                }
                for r in recent[:50]
            ],
            hide_index=True,
            width="stretch",
        )
    else:
        st.caption("No requests yet.")


live()
