"""GPU: one card per device (our models, other processes, free), its lease, and sparklines of
used memory and, where the probe reads them, utilisation, temperature and power over the last
minutes (kept in this browser session)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import streamlit as st

from imageworks.gui.charts import device_bar, sparkline
from imageworks.gui.client import GpuDevice, GpuView, ProxyDown, ProxyRequestFailed
from imageworks.gui.state import client
from imageworks.gui.widgets import chart, duration, fetched

HISTORY = timedelta(minutes=10)

st.title("GPU")


def budget_note(view: GpuView, declared_mb: int | list[int] | None) -> None:
    if view.budget == "measured":
        st.caption(f"Memory measured by the `{view.probe}` probe, every few seconds.")
    elif view.budget == "declared" or declared_mb:
        st.info(
            "No GPU is measured here (no NVML). The **declared budget** is in force: "
            f"CHAT_PROXY_GPU_TOTAL_MB = {declared(declared_mb)}, and a model counts with its "
            "registry size (`vram_estimate_mb`).",
            icon=":material/info:",
        )
    else:
        st.info(
            "No GPU is measured here (no NVML) and no budget is declared "
            "(CHAT_PROXY_GPU_TOTAL_MB unset): models start without a memory check.",
            icon=":material/info:",
        )


def declared(value: int | list[int] | None) -> str:
    """The setting as written: one total, or one per device (comma-separated)."""
    if isinstance(value, list):
        return ",".join(map(str, value)) + " MB" + (" (one per device)" if len(value) > 1 else "")
    return f"{value} MB" if value else "?"


def remember(device: GpuDevice) -> list[tuple[datetime, int]]:
    history: dict[int, list[tuple[datetime, int]]] = st.session_state.setdefault("gpu_history", {})
    now = datetime.now(UTC)
    points = [p for p in history.get(device.index, []) if now - p[0] <= HISTORY]
    points.append((now, device.used_mb))
    history[device.index] = points
    return points


TELEMETRY = (  # (field, label, suffix, scale top)
    ("utilization_pct", "Utilisation", " %", 100.0),
    ("temperature_c", "Temperature", " °C", 100.0),
    ("power_w", "Power", " W", 0.0),  # 0: scaled to the highest reading seen
)


def remember_telemetry(device: GpuDevice) -> dict[str, list[tuple[datetime, float]]]:
    history: dict[int, dict[str, list[tuple[datetime, float]]]] = st.session_state.setdefault(
        "gpu_telemetry", {}
    )
    now = datetime.now(UTC)
    mine = history.setdefault(device.index, {})
    for field, _, _, _ in TELEMETRY:
        value = getattr(device, field)
        points = [p for p in mine.get(field, []) if now - p[0] <= HISTORY]
        if value is not None:
            points.append((now, value))
        mine[field] = points
    return mine


def telemetry(device: GpuDevice) -> None:
    """Utilisation, temperature and power now, each with its sparkline (nothing when the probe
    reads none of them: no NVML, a declared budget)."""
    readings = [
        (f, label, suffix, top)
        for f, label, suffix, top in TELEMETRY
        if getattr(device, f) is not None
    ]
    if not readings:
        st.caption("No utilisation, temperature or power readings from this probe.")
        return
    history = remember_telemetry(device)
    for column, (field, label, suffix, top) in zip(
        st.columns(len(readings)), readings, strict=True
    ):
        with column:
            column.metric(label, f"{getattr(device, field):,.0f}{suffix}")
            points = history[field]
            scale = top or max(value for _, value in points) * 1.2
            chart(sparkline(points, scale, suffix=suffix), key=f"{field}-{device.index}")


def card(device: GpuDevice) -> None:
    st.subheader(f"GPU {device.index} · {device.name}")
    # Two by two: four figures side by side do not fit half a page.
    total, ours = st.columns(2)
    others, free = st.columns(2)
    total.metric("Total", f"{device.total_mb:,} MB")
    ours.metric("Our engines", f"{device.ours_mb:,} MB")
    others.metric("Other processes", f"{device.foreign_mb:,} MB")
    free.metric("Free", f"{device.free_mb:,} MB")
    chart(device_bar(device), key=f"bar-{device.index}")
    if device.models:
        st.markdown(
            " · ".join(
                f"**{m.name}** {m.vram_mb:,} MB"
                + (f" ({m.in_flight} in flight)" if m.in_flight else "")
                for m in device.models
            )
        )
    else:
        st.caption("None of our engines holds memory on this device.")
    if device.foreign:
        st.caption("Others: " + ", ".join(f"{f.name} {f.vram_mb:,} MB" for f in device.foreign))
    else:
        st.caption("No other process holds memory on this device.")
    lease = device.lease
    if lease:
        st.warning(
            f"Leased to **{lease.owner}** ({lease.reason or 'no reason given'}), "
            f"{duration(lease.time_left_s)} left",
            icon=":material/lock_clock:",
        )
    st.caption("Used memory, last 10 minutes")
    chart(
        sparkline(remember(device), device.total_mb),
        key=f"spark-{device.index}",
    )
    telemetry(device)


@st.fragment(run_every=2)
def live() -> None:
    proxy = client()
    view = fetched(proxy.gpu_view)
    if view is None:
        return
    try:
        declared = proxy.state()["config"].get("gpu_total_mb")
    except (ProxyDown, ProxyRequestFailed):
        declared = None  # admin view refused: the budget line says less, the cards still show
    budget_note(view, declared)
    if not view.devices:
        st.caption("No device to show.")
        return
    columns = st.columns(min(2, len(view.devices)))
    for position, device in enumerate(view.devices):
        with columns[position % len(columns)], st.container(border=True):
            card(device)


live()
