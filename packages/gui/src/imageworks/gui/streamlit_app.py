"""The console's entry point: it only routes. Pages live in ``app_pages/`` and are addressed
relative to this file, so the installed package runs from anywhere."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

PAGES = Path(__file__).resolve().parent / "app_pages"

st.set_page_config(page_title="ImageWorks console", page_icon=":material/hub:", layout="wide")
page = st.navigation(
    [
        st.Page(
            PAGES / "dashboard.py",
            title="Dashboard",
            icon=":material/monitoring:",
            url_path="dashboard",
            default=True,
        ),
        st.Page(
            PAGES / "models.py", title="Models", icon=":material/view_list:", url_path="models"
        ),
        st.Page(
            PAGES / "settings.py", title="Settings", icon=":material/settings:", url_path="settings"
        ),
    ]
)
page.run()
