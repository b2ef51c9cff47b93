"""Without scripts/real-engines.sh the tier says so (skip with the reason, or a failure when
IMAGEWORKS_REQUIRE_REAL_ENGINES=1); it never passes quietly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.real_engine.conftest import manifest_or_reason


def test_no_setup_gives_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEWORKS_REAL_ENGINES_DIR", str(tmp_path))
    found, reason = manifest_or_reason()
    assert found is None and "run scripts/real-engines.sh" in reason
    (tmp_path / "manifest.json").write_text(
        json.dumps({"python": "/gone/python", "chat_model": "/gone", "embedding_model": "/gone"})
    )
    found, reason = manifest_or_reason()
    assert found is None and "/gone" in reason and "which is gone" in reason
