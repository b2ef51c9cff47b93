"""CI's entry point (``.ci/run``) runs the README's command with the browser test required."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.subprocess  # bash -n


def test_ci_requires_the_browser_test_it_installed_the_browser_for() -> None:
    script = (REPO / ".ci" / "run").read_text()
    subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")], check=True)
    lines = [line.strip() for line in script.splitlines()]
    assert "export IMAGEWORKS_REQUIRE_BROWSER=1" in lines
    assert lines.index("export IMAGEWORKS_REQUIRE_BROWSER=1") < lines.index("bash scripts/check.sh")
    assert "chromium:chromium chromedriver:chromium-driver" in script


def test_ci_requires_the_compose_test_it_installed_the_engine_for() -> None:
    script = (REPO / ".ci" / "run").read_text()
    lines = [line.strip() for line in script.splitlines()]
    check = lines.index("bash scripts/check.sh")
    assert lines.index("export IMAGEWORKS_REQUIRE_DOCKER=1") < check
    assert lines.index("bash scripts/install-compose-v2.sh") < check
    assert "dockerd:docker.io debootstrap:debootstrap" in script


def test_ci_sets_up_and_requires_the_real_engines_tier() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    setup = lines.index("bash scripts/real-engines.sh")
    required = lines.index("export IMAGEWORKS_REQUIRE_REAL_ENGINES=1")
    assert setup < required < lines.index("bash scripts/check.sh")
