from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


LayerWriter = Callable[..., Path]


@pytest.fixture
def layers(tmp_path: Path) -> LayerWriter:
    """Write discovered/curated layers (None leaves a file absent) plus the shipped profiles."""
    root = tmp_path / "configs"
    root.mkdir()
    shutil.copy(REPO / "configs" / "deployment_profiles.json", root)

    def write(curated: list[Any] | None = None, discovered: list[Any] | None = None) -> Path:
        for name, data in (("curated", curated), ("discovered", discovered)):
            path = root / f"model_registry.{name}.json"
            if data is None:
                path.unlink(missing_ok=True)
            else:
                write_json(path, data)
        return root

    return write
