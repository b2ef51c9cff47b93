"""The examples of a doc, by name: a fenced block right after ``<!-- example: NAME -->``, so a
test runs what the doc shows instead of a copy of it."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
_EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\s*```\w*\n(.*?)```", re.DOTALL)


def examples(doc: str) -> dict[str, str]:
    return dict(_EXAMPLE.findall((DOCS / doc).read_text()))


def example(doc: str, name: str) -> str:
    found = examples(doc)
    if name not in found:
        raise KeyError(f"docs/{doc} has no example {name!r} (has: {sorted(found)})")
    return found[name]
