"""Every command through click's runner, and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from imageworks.model_loader.cli import main

LayerWriter = Callable[..., Path]
REPO = Path(__file__).resolve().parents[3]


MODELS = [
    {"name": "gemma", "backend": "llamacpp", "display_name": "Gemma"},
    {
        "name": "qwen-vl",
        "backend": "ollama",
        "served_model_id": "qwen2.5vl:7b",
        "capabilities": {"vision": True},
        "profiles": ["staging"],
    },
    {"name": "old", "backend": "vllm", "deprecated": True},
]


@pytest.fixture
def cli(layers: LayerWriter, tmp_path: Path):
    root = layers(curated=MODELS)

    def run(*args: str):
        result = CliRunner().invoke(
            main, ["--registry-dir", str(root), "--staging-dir", str(tmp_path / "s"), *args]
        )
        return result

    return run


def test_list_shows_the_active_profiles_models(cli) -> None:
    result = cli("list")
    assert result.exit_code == 0, result.output
    assert (
        "gemma" in result.output and "qwen-vl" not in result.output and "old" not in result.output
    )
    assert "profile: production" in result.output


def test_list_json_profile_backend_and_all_filters(cli) -> None:
    names = lambda *a: [m["name"] for m in json.loads(cli("list", "--json", *a).output)]  # noqa: E731
    assert names() == ["gemma"]
    assert names("--profile", "staging") == ["gemma", "qwen-vl"]
    assert names("--all") == ["gemma", "old", "qwen-vl"]
    assert names("--all", "--backend", "ollama") == ["qwen-vl"]


def test_show_prints_the_merged_entry_and_field_origins(cli) -> None:
    result = cli("show", "qwen2.5vl:7b", "--json")
    assert result.exit_code == 0
    shown = json.loads(result.output)
    assert shown["entry"]["name"] == "qwen-vl"
    assert shown["origins"]["capabilities.vision"] == "curated"
    text = cli("show", "Gemma").output
    assert '"name": "gemma"' in text and "field origins:" in text


def test_show_unknown_model_is_one_line_with_suggestions(cli) -> None:
    result = cli("show", "gema")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: unknown model 'gema'; did you mean 'gemma'?"


def test_validate_ok_and_every_problem_listed(cli, layers: LayerWriter) -> None:
    assert cli("validate").output.startswith("ok: 3 entries")
    layers(curated=[{"name": "a", "backend": "x"}, {"backend": "vllm"}])
    result = cli("validate")
    assert result.exit_code == 1
    assert "unknown backend 'x'" in result.output and "entry #1 field 'name'" in result.output
    assert "2 problem(s)" in result.output


def test_profiles_list_and_use(cli) -> None:
    assert "* production" in cli("profiles").output
    assert cli("profiles", "use", "staging").output.strip() == "active profile: staging"
    assert json.loads(cli("profiles", "--json").output)["active"] == "staging"
    assert [m["name"] for m in json.loads(cli("list", "--json").output)] == ["gemma", "qwen-vl"]
    bad = cli("profiles", "use", "nope")
    assert bad.exit_code == 1 and "unknown deployment profile 'nope'" in bad.output


def test_a_broken_registry_is_one_line_and_no_traceback(cli, layers: LayerWriter) -> None:
    root = layers(curated=[])
    (root / "model_registry.curated.json").write_text("{oops")
    result = cli("list")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def run_cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "imageworks.model_loader.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.subprocess
def test_real_process_lists_the_shipped_registry_with_the_embedded_model(tmp_path: Path) -> None:
    result = run_cli("--staging-dir", str(tmp_path), "list", "--json")
    assert result.returncode == 0, result.stderr
    assert "gemma3-270m" in [m["name"] for m in json.loads(result.stdout)]


@pytest.mark.subprocess
def test_real_process_every_command(layers: LayerWriter, tmp_path: Path) -> None:
    root = layers(curated=MODELS)
    env = {"IMAGEWORKS_REGISTRY_DIR": str(root), "IMAGEWORKS_STAGING_DIR": str(tmp_path / "s")}
    assert run_cli("list", env=env).returncode == 0
    assert (
        json.loads(run_cli("show", "gemma", "--json", env=env).stdout)["entry"]["name"] == "gemma"
    )
    assert run_cli("validate", env=env).returncode == 0
    assert run_cli("profiles", "use", "testing", env=env).returncode == 0
    assert "* testing" in run_cli("profiles", env=env).stdout
    missing = run_cli("show", "nothing-like-it", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "Error: unknown model 'nothing-like-it'"
