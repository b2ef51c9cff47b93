"""Without scripts/real-engines.sh the tier says so (skip with the reason, or a failure when
IMAGEWORKS_REQUIRE_REAL_ENGINES=1); it never passes quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.real_engine.conftest import manifest_or_reason

from testkit.processes import REPO


def test_no_setup_gives_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEWORKS_REAL_ENGINES_DIR", str(tmp_path))
    found, reason = manifest_or_reason()
    assert found is None and "run scripts/real-engines.sh" in reason
    (tmp_path / "manifest.json").write_text(
        json.dumps({"python": "/gone/python", "chat_model": "/gone", "embedding_model": "/gone"})
    )
    found, reason = manifest_or_reason()
    assert found is None and "/gone" in reason and "which is gone" in reason


@pytest.mark.subprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("required", [False, True])
def test_the_tier_without_setup_skips_or_fails(tmp_path: Path, required: bool) -> None:
    """A tier test run (by a pytest of its own) where the setup is missing: a skip naming the
    setup script, or with IMAGEWORKS_REQUIRE_REAL_ENGINES=1 an error that fails the run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEWORKS_REQUIRE")}
    env["IMAGEWORKS_REAL_ENGINES_DIR"] = str(tmp_path / "nothing-here")
    if required:
        env["IMAGEWORKS_REQUIRE_REAL_ENGINES"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            "tests/real_engine/test_vllm_argv.py::test_the_checker_refuses_what_vllm_refuses",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if required:
        assert done.returncode == 1, done.stdout[-2000:]
        assert "IMAGEWORKS_REQUIRE_REAL_ENGINES=1 but real engines are not set up" in done.stdout
        assert "1 error" in done.stdout
    else:
        assert done.returncode == 0, done.stdout[-2000:]
        assert "1 skipped" in done.stdout and "run scripts/real-engines.sh" in done.stdout
