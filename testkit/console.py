"""Helpers for the console's AppTest tests: open a page, read what it shows."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

PAGES = Path(__file__).resolve().parents[1] / "packages/gui/src/imageworks/gui/app_pages"


def page(name: str) -> AppTest:
    return AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=60)


def texts(app: AppTest) -> str:
    """The page's markdown, captions and alerts."""
    parts = [m.value for m in app.markdown] + [e.value for e in app.error]
    parts += [w.value for w in app.warning] + [s.value for s in app.success]
    parts += [c.value for c in app.caption] + [i.value for i in app.info]
    return "\n".join(map(str, parts))


def everything(app: AppTest) -> str:
    """Every text the page shows: also metrics, code blocks, expander titles and tables."""
    parts = [texts(app)] + [h.value for h in app.subheader]
    parts += [f"{m.label} {m.value}" for m in app.metric]
    parts += [str(c.value) for c in app.code]
    parts += [str(e.label) for e in app.expander]
    parts += [str(frame.value.to_json()) for frame in app.dataframe]
    return "\n".join(parts)
