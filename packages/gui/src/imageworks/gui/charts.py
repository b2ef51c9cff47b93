"""The console's plotly figures, built from plain data (no Streamlit, no HTTP)."""

from __future__ import annotations

from datetime import datetime, timedelta

import plotly.graph_objects as go

from imageworks.gui.activity import Bucket
from imageworks.gui.client import GpuDevice

OURS = ["#2563eb", "#7c3aed", "#0891b2", "#4f46e5", "#0d9488", "#9333ea"]
FOREIGN = "#f59e0b"
FREE = "#e5e7eb"


def _compact(figure: go.Figure, height: int) -> go.Figure:
    figure.update_layout(
        height=height,
        margin={"t": 8, "b": 8, "l": 8, "r": 8},
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
    )
    return figure


def device_bar(device: GpuDevice) -> go.Figure:
    """One horizontal bar: each of our models, other processes, free; widths in MB."""
    figure = go.Figure()
    unattributed = max(0, device.ours_mb - sum(m.vram_mb for m in device.models))
    parts = [
        (f"{m.name} (ours)", m.vram_mb, OURS[i % len(OURS)]) for i, m in enumerate(device.models)
    ]
    if unattributed:
        parts.append(("ours, not attributed", unattributed, OURS[-1]))
    parts.append(("other processes", device.foreign_mb, FOREIGN))
    parts.append(("free", device.free_mb, FREE))
    for label, mb, colour in parts:
        if mb <= 0 and label != "free":
            continue
        figure.add_bar(
            x=[mb],
            y=[""],
            orientation="h",
            name=label,
            marker_color=colour,
            text=[f"{label}: {mb:,} MB"],
            textposition="inside",
            insidetextanchor="middle",
            hovertemplate=f"{label}: %{{x:,}} MB<extra></extra>",
        )
    figure.update_layout(
        barmode="stack",
        showlegend=True,
        legend={"orientation": "h", "y": -0.35, "traceorder": "normal"},
        # A label that does not fit its segment is left out, not shrunk to a smudge.
        uniformtext={"minsize": 11, "mode": "hide"},
        xaxis={"range": [0, max(device.total_mb, 1)], "ticksuffix": " MB", "showgrid": False},
        yaxis={"visible": False},
    )
    return _compact(figure, 150)


def sparkline(
    points: list[tuple[datetime, int]] | list[tuple[datetime, float]],
    top: float,
    *,
    suffix: str = " MB",
    color: str | None = None,
) -> go.Figure:
    """A reading over the last minutes (used memory by default), on a fixed scale to ``top``."""
    figure = go.Figure(
        go.Scatter(
            x=[t for t, _ in points],
            y=[value for _, value in points],
            mode="lines",
            line={"width": 2, "color": color or OURS[0]},
            fill="tozeroy",
            hovertemplate="%{x|%H:%M:%S}: %{y:,}" + suffix + "<extra></extra>",
        )
    )
    figure.update_layout(
        xaxis={"showgrid": False, "tickformat": "%H:%M:%S", "nticks": 6},
        yaxis={"range": [0, max(top, 1)], "ticksuffix": suffix, "showgrid": False, "nticks": 3},
        showlegend=False,
    )
    return _compact(figure, 110)


def _middles(series: list[Bucket]) -> list[datetime]:
    """Each window's middle: where its bar stands and its point is drawn."""
    return [b.start + timedelta(seconds=b.width_s / 2) for b in series]


def _time_axis(series: list[Bucket]) -> dict[str, object]:
    """At least eight windows wide: a burst inside one window still has a time scale around it
    (plotly would otherwise tick the same second several times)."""
    axis: dict[str, object] = {"tickformat": "%H:%M:%S"}
    if not series:
        return axis
    width = timedelta(seconds=series[0].width_s)
    first, last = series[0].start, series[-1].start + width
    if last - first < 8 * width:
        axis["range"] = [last - 8 * width, last]
    return axis


def rate_chart(series: list[Bucket]) -> go.Figure:
    # Each bar spans its window (a lone bar would otherwise be drawn a hairline wide).
    width = timedelta(seconds=series[0].width_s) if series else timedelta(seconds=10)
    figure = go.Figure(
        go.Bar(
            x=_middles(series),
            y=[b.rps for b in series],
            width=[width.total_seconds() * 1000 * 0.9] * len(series),
            name="requests/s",
            hovertemplate="%{x|%H:%M:%S}: %{y:.2f} req/s<extra></extra>",
        )
    )
    figure.update_layout(yaxis={"title": "req/s", "rangemode": "tozero"}, xaxis=_time_axis(series))
    return _compact(figure, 220)


def latency_chart(series: list[Bucket]) -> go.Figure:
    figure = go.Figure()
    x = _middles(series)
    for label, values, dash in (
        ("latency p50", [b.latency_p50_ms for b in series], "solid"),
        ("latency p95", [b.latency_p95_ms for b in series], "dot"),
        ("TTFT p50", [b.ttft_p50_ms for b in series], "solid"),
        ("TTFT p95", [b.ttft_p95_ms for b in series], "dot"),
    ):
        figure.add_scatter(
            x=x, y=values, name=label, mode="lines+markers", line={"dash": dash}, connectgaps=False
        )
    figure.update_layout(
        yaxis={"title": "ms", "rangemode": "tozero"},
        xaxis=_time_axis(series),
        legend={"orientation": "h"},
    )
    return _compact(figure, 260)


def tokens_chart(series: list[Bucket]) -> go.Figure:
    figure = go.Figure(
        go.Scatter(
            x=_middles(series),
            y=[b.tokens_per_s for b in series],
            mode="lines+markers",
            name="tokens/s",
            connectgaps=False,
        )
    )
    figure.update_layout(
        yaxis={"title": "tokens/s", "rangemode": "tozero"}, xaxis=_time_axis(series)
    )
    return _compact(figure, 220)
