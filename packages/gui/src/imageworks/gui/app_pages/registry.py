"""Registry: the merged entries with the layer each field came from, the error of a bad edit
that is being held off, and reload."""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from imageworks.gui.client import ProxyDown, ProxyRequestFailed
from imageworks.gui.state import client
from imageworks.gui.widgets import fetched

st.title("Registry")


def reload() -> None:
    try:
        answer = client().reload_registry()
    except (ProxyDown, ProxyRequestFailed) as exc:
        st.session_state["registry_result"] = ("error", str(exc))
    else:
        st.session_state["registry_result"] = (
            "success",
            f"Registry {answer['version']} loaded ({answer['entries']} entries)",
        )


def value_at(entry: dict[str, Any], dotted: str) -> Any:
    value: Any = entry
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def fields(item: dict[str, Any]) -> list[dict[str, str]]:
    origins: dict[str, str] = item["origins"]
    return [
        {
            "field": dotted,
            "value": json.dumps(value_at(item["entry"], dotted), ensure_ascii=False),
            "layer": origins[dotted],
        }
        for dotted in origins
    ]


@st.fragment(run_every=5)
def live() -> None:
    view = fetched(client().registry)
    if view is None:
        return
    top = st.columns([4, 1], vertical_alignment="bottom")
    top[0].caption(
        f"Version **{view['version']}** · {len(view['entries'])} entries · "
        f"profile **{view['profile']}** · layers in `{view['directory']}`"
    )
    top[1].button("Reload registry", icon=":material/refresh:", on_click=reload, key="reload")
    result = st.session_state.pop("registry_result", None)
    if result:
        (st.success if result[0] == "success" else st.error)(result[1])
    if view["last_error"]:
        st.error(
            f"**A registry edit is held off**; version {view['version']} stays in service "
            f"until the layers are fixed:\n\n{view['last_error']}",
            icon=":material/block:",
        )
    search = st.text_input("Filter by name", key="registry_filter", placeholder="e.g. gemma")
    for item in view["entries"]:
        if search and search.lower() not in item["name"].lower():
            continue
        backend = item["entry"].get("backend", "?")
        offered = "" if item["visible"] else " · not offered in this profile"
        with st.expander(f"**{item['name']}** · {backend}{offered}"):
            st.dataframe(fields(item), hide_index=True, width="stretch")
            st.caption(
                "Defined in: "
                + "; ".join(f"{s['layer']} (`{s['file']}` #{s['index']})" for s in item["sources"])
            )


live()
