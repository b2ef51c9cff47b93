from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from imageworks.model_loader import UnknownProfileError
from imageworks.model_loader.errors import RegistryValidationError
from imageworks.model_loader.profiles import ProfileManager
from imageworks.model_loader.registry import build_registry

LayerWriter = Callable[..., Path]


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def manager(root: Path, staging: Path) -> ProfileManager:
    return ProfileManager(root / "deployment_profiles.json", staging)


def test_the_files_default_is_active_at_first(layers: LayerWriter, tmp_path: Path) -> None:
    assert manager(layers(), tmp_path / "s").active.name == "production"


def test_switching_persists_across_managers(layers: LayerWriter, tmp_path: Path) -> None:
    root = layers()
    manager(root, tmp_path / "s").use("testing")
    assert json.loads((tmp_path / "s" / "active_profile.json").read_text()) == {"name": "testing"}
    assert manager(root, tmp_path / "s").active.name == "testing"


def test_subscribers_hear_changes_only(layers: LayerWriter, tmp_path: Path) -> None:
    profiles = manager(layers(), tmp_path / "s")
    heard: list[str] = []
    unsubscribe = profiles.subscribe(lambda p: heard.append(p.name))
    profiles.use("staging")
    profiles.use("staging")
    profiles.use("testing")
    unsubscribe()
    profiles.use("production")
    assert heard == ["staging", "testing"]


def test_unknown_profile_is_a_key_error_listing_the_known_ones(
    layers: LayerWriter, tmp_path: Path
) -> None:
    with pytest.raises(KeyError) as caught:
        manager(layers(), tmp_path / "s").use("prod")
    assert isinstance(caught.value, UnknownProfileError)
    assert "known: production, staging, testing" in str(caught.value)


def test_environment_override_wins_over_the_persisted_choice(
    layers: LayerWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = layers()
    manager(root, tmp_path / "s").use("testing")
    monkeypatch.setenv("IMAGEWORKS_DEPLOYMENT_PROFILE", "staging")
    assert manager(root, tmp_path / "s").active.name == "staging"


def test_a_stale_persisted_name_falls_back_to_the_default(
    layers: LayerWriter, tmp_path: Path
) -> None:
    (tmp_path / "s").mkdir()
    write_json(tmp_path / "s" / "active_profile.json", {"name": "removed"})
    assert manager(layers(), tmp_path / "s").active.name == "production"


def test_a_default_that_is_not_defined_is_an_error(layers: LayerWriter, tmp_path: Path) -> None:
    root = layers()
    write_json(root / "deployment_profiles.json", {"default": "x", "profiles": [{"name": "y"}]})
    with pytest.raises(RegistryValidationError, match="default 'x' is not a defined profile"):
        manager(root, tmp_path)


def test_profiles_filter_entries_by_opt_in_and_vram(layers: LayerWriter, tmp_path: Path) -> None:
    root = layers(
        curated=[
            {"name": "everywhere", "backend": "ollama"},
            {"name": "staging-only", "backend": "ollama", "profiles": ["staging"]},
            {"name": "huge", "backend": "vllm", "vram_estimate_mb": 80000},
        ]
    )
    registry = build_registry(root)
    profiles = manager(root, tmp_path)
    visible = {p.name: sorted(e.name for e in registry if p.admits(e)) for p in profiles.profiles}
    assert visible == {
        "production": ["everywhere"],  # production caps VRAM at 40000 MB
        "staging": ["everywhere", "huge", "staging-only"],
        "testing": ["everywhere", "huge"],
    }
