"""How a name someone typed is matched against an entry's names."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize(label: str) -> str:
    """Case, spaces and punctuation do not matter: 'Qwen2 7B (AWQ)' == 'qwen2-7b-awq'."""
    return _NOT_ALNUM.sub("", label.lower())


def suggest(name: str, candidates: Iterable[str], limit: int = 3) -> list[str]:
    """Close matches for an error message, best first."""
    pool = sorted(set(candidates))
    by_norm: dict[str, str] = {}
    for candidate in pool:
        by_norm.setdefault(normalize(candidate), candidate)
    close = difflib.get_close_matches(normalize(name), list(by_norm), n=limit, cutoff=0.6)
    hits = [by_norm[c] for c in close]
    # Also offer names that contain what was typed ("qwen" -> every qwen model).
    needle = normalize(name)
    if needle and len(hits) < limit:
        hits += [c for c in pool if needle in normalize(c) and c not in hits][: limit - len(hits)]
    return hits
