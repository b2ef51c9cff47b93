"""Activity: request rate, latency and TTFT percentiles and tokens/s over time, errors by code,
and the recent requests (no prompt text: the records carry none, and error messages are left
out)."""

from __future__ import annotations

import streamlit as st

from imageworks.gui import activity
from imageworks.gui.charts import latency_chart, rate_chart, tokens_chart
from imageworks.gui.state import client
from imageworks.gui.widgets import chart, fetched

WINDOW = 500  # the proxy keeps this many recent request records

st.title("Activity")


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f} ms" if value < 1000 else f"{value / 1000:,.1f} s"


@st.fragment(run_every=5)
def live() -> None:
    records = fetched(lambda: client().recent_requests(WINDOW))
    if records is None:
        return
    if not records:
        st.info("No requests since the proxy started.", icon=":material/hourglass_empty:")
        return
    stats = activity.summary(records)
    errors = activity.errors_by_code(records)
    rate = stats["tokens_per_s_p50"]
    counts = st.columns(4)
    counts[0].metric("Requests", len(records), help=f"The last {WINDOW} the proxy keeps")
    counts[1].metric("Errors", sum(n for _, _, n in errors))
    counts[2].metric(
        "Tokens/s per request",
        "—" if rate is None else f"{rate:,.1f}",
        help="The median of the requests' own generation speed",
    )
    timings = st.columns(4)
    served = "Of the requests that were served (errors left out)"
    timings[0].metric("Latency p50", ms(stats["latency_p50_ms"]), help=served)
    timings[1].metric("Latency p95", ms(stats["latency_p95_ms"]), help=served)
    timings[2].metric("TTFT p50", ms(stats["ttft_p50_ms"]), help=served)
    timings[3].metric("TTFT p95", ms(stats["ttft_p95_ms"]), help=served)

    width = st.session_state.get("bucket_s") or 10
    series = activity.buckets(records, width)
    left, right = st.columns(2)
    with left, st.container(border=True):
        st.markdown(f"**Requests per second** ({width} s windows)")
        chart(rate_chart(series), key="rate")
    with right, st.container(border=True):
        st.markdown("**Tokens per second** (generated in each window)")
        chart(tokens_chart(series), key="tokens")
    with st.container(border=True):
        st.markdown("**Latency and time to first token** (percentiles per window, served requests)")
        chart(latency_chart(series), key="latency")

    st.subheader("Errors by code")
    if errors:
        st.dataframe(
            [{"error code": c, "HTTP status": s, "requests": n} for c, s, n in errors],
            hide_index=True,
        )
    else:
        st.caption("No errors among these requests.")

    st.subheader("Recent requests")
    models = sorted({str(r["logical_name"]) for r in records if r.get("logical_name")})
    pick, kind, errors_only = st.columns([3, 2, 1], vertical_alignment="bottom")
    chosen = pick.multiselect("Model", models, key="activity_models")
    streamed = kind.selectbox("Kind", ["all", "streamed", "not streamed"], key="activity_kind")
    only_errors = errors_only.checkbox("Errors only", key="activity_errors")
    rows = activity.table(
        records,
        models=chosen,
        errors_only=only_errors,
        stream={"all": None, "streamed": True, "not streamed": False}[streamed],
    )
    st.dataframe(rows, hide_index=True, width="stretch")


st.segmented_control(
    "Window", [5, 10, 30, 60], default=10, key="bucket_s", format_func=lambda s: f"{s} s"
)
live()
