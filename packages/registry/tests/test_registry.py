from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from imageworks.model_loader import UnknownModelError
from imageworks.model_loader.errors import RegistryValidationError
from imageworks.model_loader.registry import build_registry, load_registry

LayerWriter = Callable[..., Path]


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


SNAPSHOT = "model_registry.json"


def entry(name: str, backend: str = "ollama", **fields: object) -> dict[str, object]:
    return {"name": name, "backend": backend, **fields}


def test_unknown_fields_and_key_order_survive_a_round_trip(layers: LayerWriter) -> None:
    original = {
        "zeta": 1,
        "name": "m",
        "custom": {"deep": [1, {"x": None}]},
        "backend": "vllm",
        "artifacts": {"files": []},
        "display_name": "M",
    }
    root = layers(curated=[original])
    registry = build_registry(root)
    assert registry.raw("m") == original
    assert list(registry.raw("m")) == list(original)
    snapshot = json.loads((root / SNAPSHOT).read_text())
    assert snapshot == [original]
    assert list(snapshot[0]) == list(original)


def test_snapshot_is_byte_identical_for_the_same_inputs(layers: LayerWriter) -> None:
    root = layers(curated=[entry("b"), entry("a", family="x")], discovered=[entry("c")])
    first = build_registry(root).snapshot
    (root / SNAPSHOT).unlink()
    second = build_registry(root).snapshot
    assert first == second == (root / SNAPSHOT).read_bytes()
    names = [e["name"] for e in json.loads(first)]
    assert names == ["a", "b", "c"]


def test_snapshot_is_written_only_when_its_content_changes(layers: LayerWriter) -> None:
    root = layers(curated=[entry("a")])
    build_registry(root)
    path = root / SNAPSHOT
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    build_registry(root)
    assert path.stat().st_mtime_ns == 1_000_000_000
    layers(curated=[entry("a", family="changed")])
    build_registry(root)
    assert path.stat().st_mtime_ns != 1_000_000_000


def test_a_crash_mid_write_leaves_the_old_snapshot_intact(
    layers: LayerWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = layers(curated=[entry("a")])
    build_registry(root)
    before = (root / SNAPSHOT).read_bytes()
    layers(curated=[entry("a"), entry("b")])

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        build_registry(root)
    assert (root / SNAPSHOT).read_bytes() == before
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp")] == []


def test_the_snapshot_is_never_read_back_so_deletions_stay_deleted(layers: LayerWriter) -> None:
    root = layers(curated=[entry("keep"), entry("drop")], discovered=[entry("gone")])
    assert set(build_registry(root).names) == {"keep", "drop", "gone"}
    layers(curated=[entry("keep")], discovered=[])
    registry = build_registry(root)
    assert registry.names == ["keep"]
    assert [e["name"] for e in json.loads((root / SNAPSHOT).read_text())] == ["keep"]


def test_a_snapshot_alone_is_not_a_registry(layers: LayerWriter) -> None:
    root = layers()
    write_json(root / SNAPSHOT, [entry("ghost")])
    with pytest.raises(RegistryValidationError, match="no registry layer found"):
        build_registry(root)


def test_validation_errors_name_file_entry_and_field(layers: LayerWriter) -> None:
    root = layers(curated=[entry("ok"), entry("bad", vram_estimate_mb="lots")])
    with pytest.raises(RegistryValidationError) as caught:
        build_registry(root)
    (problem,) = caught.value.problems
    assert problem.file.endswith("model_registry.curated.json")
    assert (problem.index, problem.name, problem.field) == (1, "bad", "vram_estimate_mb")
    assert "curated.json entry #1 ('bad') field 'vram_estimate_mb'" in str(caught.value)


def test_the_error_blames_the_layer_that_supplied_the_bad_value(layers: LayerWriter) -> None:
    root = layers(
        curated=[{"name": "m", "family": "ok"}], discovered=[entry("x"), entry("m", backend="nope")]
    )
    with pytest.raises(RegistryValidationError) as caught:
        build_registry(root)
    (problem,) = caught.value.problems
    assert problem.file.endswith("discovered.json") and problem.index == 1
    assert problem.field == "backend"


def test_every_problem_is_reported_not_just_the_first(layers: LayerWriter) -> None:
    root = layers(
        curated=[{"backend": "vllm"}, entry("a", backend="x"), entry("b", profiles="all")]
    )
    with pytest.raises(RegistryValidationError) as caught:
        build_registry(root)
    assert [(p.index, p.field) for p in caught.value.problems] == [
        (0, "name"),
        (1, "backend"),
        (2, "profiles"),
    ]


def test_duplicate_names_in_one_layer_name_both_places(layers: LayerWriter) -> None:
    root = layers(curated=[entry("a"), entry("b"), entry("a")])
    with pytest.raises(RegistryValidationError) as caught:
        build_registry(root)
    assert "entry #2 ('a') field 'name': duplicate name; first defined at entry #0" in str(
        caught.value
    )


def test_a_display_name_that_names_another_entry_is_an_error(layers: LayerWriter) -> None:
    root = layers(curated=[entry("a", display_name="Shared"), entry("b", model_aliases=["Shared"])])
    with pytest.raises(RegistryValidationError) as caught:
        build_registry(root)
    message = str(caught.value)
    assert "'b'" in message and "'Shared' already names 'a'" in message and "entry #0" in message


def test_malformed_json_and_wrong_shapes_are_located(layers: LayerWriter) -> None:
    root = layers(curated=[])
    (root / "model_registry.curated.json").write_text("[{]")
    with pytest.raises(RegistryValidationError, match=r"curated.json: not valid JSON"):
        build_registry(root)
    write_json(root / "model_registry.curated.json", {"models": []})
    with pytest.raises(RegistryValidationError, match="must be a JSON array"):
        build_registry(root)


def test_legacy_none_string_served_id_means_no_served_id(layers: LayerWriter) -> None:
    root = layers(curated=[entry("m", served_model_id="None")])
    model = build_registry(root).get("m")
    assert model.served_model_id is None and model.upstream_id == "m"


@pytest.mark.parametrize(
    "query", ["qwen-7b", "Qwen 7B (AWQ)", "qwen7b", "qwen:7b", "QWEN 7B (awq)", "Qwen-7B-AWQ"]
)
def test_names_resolve_by_logical_display_served_alias_and_loosely(
    layers: LayerWriter, query: str
) -> None:
    root = layers(
        curated=[
            entry(
                "qwen-7b",
                display_name="Qwen 7B (AWQ)",
                served_model_id="qwen:7b",
                model_aliases=["qwen7b"],
            ),
            entry("other"),
        ]
    )
    assert build_registry(root).resolve(query).name == "qwen-7b"


def test_a_miss_raises_a_key_error_with_close_names(layers: LayerWriter) -> None:
    root = layers(curated=[entry("qwen2-7b-instruct"), entry("llama3-8b")])
    registry = build_registry(root)
    with pytest.raises(KeyError) as caught:
        registry.resolve("qwen2-7b-instruc")
    assert isinstance(caught.value, UnknownModelError)
    assert caught.value.suggestions[0] == "qwen2-7b-instruct"
    assert "did you mean 'qwen2-7b-instruct'" in str(caught.value)


def test_ambiguous_loose_matches_are_not_guessed(layers: LayerWriter) -> None:
    root = layers(curated=[entry("a-b"), entry("a_b2", model_aliases=["A B"])])
    registry = build_registry(root)
    assert registry.resolve("a-b").name == "a-b"
    assert registry.find("ab") is None


def test_load_registry_caches_until_a_layer_changes_and_force_reloads(layers: LayerWriter) -> None:
    root = layers(curated=[entry("a")])
    first = load_registry(root)
    assert load_registry(root) is first
    assert load_registry(root, force=True) is not first
    layers(curated=[entry("a"), entry("b")])
    os.utime(
        root / "model_registry.curated.json", ns=(1, 1)
    )  # a changed signature, whatever the clock
    assert load_registry(root).names == ["a", "b"]


def test_load_registry_reads_the_directory_from_the_environment(
    layers: LayerWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = layers(curated=[entry("from-env")])
    monkeypatch.setenv("IMAGEWORKS_REGISTRY_DIR", str(root))
    assert load_registry(force=True).names == ["from-env"]


def test_shipped_registry_is_valid_and_has_the_embedded_model() -> None:
    root = Path(__file__).resolve().parents[3] / "configs"
    registry = build_registry(root, write_snapshot=False)
    gemma = registry.get("gemma3-270m")
    assert gemma.backend == "llamacpp" and gemma.profiles is None
    assert {e.backend for e in registry} >= {"vllm", "ollama", "llamacpp"}
    for model in registry:
        template = model.chat_template
        if template is not None and template.path:
            assert (root.parent / template.path).is_file(), template.path
