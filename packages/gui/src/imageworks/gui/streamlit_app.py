"""The console's entry point: it only routes. Pages live in ``app_pages/`` and are addressed
relative to this file, so the installed package runs from anywhere."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

PAGES = Path(__file__).resolve().parent / "app_pages"

st.set_page_config(page_title="ImageWorks console", page_icon=":material/hub:", layout="wide")


def page(name: str, title: str, icon: str, default: bool = False) -> st.Page:
    return st.Page(
        PAGES / f"{name}.py", title=title, icon=f":material/{icon}:", url_path=name, default=default
    )


navigation = st.navigation(
    {
        "Overview": [
            page("dashboard", "Dashboard", "monitoring", default=True),
            page("gpu", "GPU", "memory"),
            page("activity", "Activity", "query_stats"),
        ],
        "Models": [
            page("models", "Models", "view_list"),
            page("logs", "Logs", "article"),
            page("playground", "Playground", "chat"),
            page("registry", "Registry", "inventory_2"),
        ],
        "Operations": [
            page("leases", "Leases", "lock_clock"),
            page("settings", "Settings", "settings"),
        ],
    }
)
navigation.run()
