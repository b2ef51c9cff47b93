"""Setting one variable in ``.env.local`` without disturbing the rest of the file."""

from __future__ import annotations

import re
from pathlib import Path

from imageworks.model_loader.layers import write_atomic


def set_variable(path: Path, name: str, value: str) -> None:
    """Replace ``NAME=...`` (or append it); comments, order and other lines stay as they are."""
    pattern = re.compile(rf"^\s*(export\s+)?{re.escape(name)}\s*=")
    lines = path.read_text().splitlines() if path.exists() else []
    replaced = False
    for index, line in enumerate(lines):
        if pattern.match(line):
            lines[index] = f"{name}={value}"
            replaced = True
    if not replaced:
        lines.append(f"{name}={value}")
    write_atomic(path, ("\n".join(lines) + "\n").encode())


def read_variable(path: Path, name: str) -> str | None:
    pattern = re.compile(rf"^\s*(export\s+)?{re.escape(name)}\s*=\s*(.*)$")
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        match = pattern.match(line)
        if match:
            return match.group(2).strip().strip("'\"")
    return None
