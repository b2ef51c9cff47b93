"""One merge rule, one test (DESIGN.md §3)."""

from __future__ import annotations

from imageworks.model_loader.layers import Layer, deep_merge, merge_layers


def test_nested_objects_merge_key_by_key() -> None:
    base = {"backend_config": {"host": "a", "port": 1}}
    assert deep_merge(base, {"backend_config": {"port": 2}}) == {
        "backend_config": {"host": "a", "port": 2}
    }


def test_lists_replace_rather_than_append() -> None:
    base = {"model_aliases": ["x", "y"]}
    assert deep_merge(base, {"model_aliases": ["z"]}) == {"model_aliases": ["z"]}


def test_scalars_from_the_higher_layer_win() -> None:
    assert deep_merge({"backend": "ollama"}, {"backend": "vllm"}) == {"backend": "vllm"}


def test_explicit_null_clears_a_field() -> None:
    assert deep_merge({"family": "qwen", "x": 1}, {"family": None}) == {"x": 1}


def test_explicit_null_clears_a_nested_field() -> None:
    base = {"backend_config": {"host": "a", "port": 1}}
    assert deep_merge(base, {"backend_config": {"host": None}}) == {"backend_config": {"port": 1}}


def test_null_in_an_entry_only_one_layer_defines_is_dropped() -> None:
    assert deep_merge({}, {"name": "m", "family": None, "o": {"k": None}}) == {"name": "m", "o": {}}


def test_object_replaces_scalar_and_scalar_replaces_object() -> None:
    assert deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert deep_merge({"a": {"b": 2}}, {"a": 3}) == {"a": 3}


def test_key_order_is_the_lower_layers_with_new_keys_appended() -> None:
    merged = deep_merge({"name": "m", "z": 1, "a": 2}, {"a": 3, "new": 4})
    assert list(merged) == ["name", "z", "a", "new"]


def test_curated_overlays_discovered_not_the_other_way_round(tmp_path) -> None:
    discovered = Layer("discovered", tmp_path / "d", [(0, {"name": "m", "family": "disc", "x": 1})])
    curated = Layer("curated", tmp_path / "c", [(0, {"name": "m", "family": "cur"})])
    merged = merge_layers([discovered, curated])["m"]
    assert merged.raw == {"name": "m", "family": "cur", "x": 1}
    assert merged.origins()["family"] == "curated"
    assert merged.origins()["x"] == "discovered"


def test_origins_track_nested_fields_and_clears(tmp_path) -> None:
    discovered = Layer(
        "discovered",
        tmp_path / "d",
        [(0, {"name": "m", "backend_config": {"host": "h", "port": 1}})],
    )
    curated = Layer(
        "curated", tmp_path / "c", [(0, {"name": "m", "backend_config": {"port": None}})]
    )
    origins = merge_layers([discovered, curated])["m"].origins()
    assert origins == {"name": "curated", "backend_config.host": "discovered"}


def test_entries_only_in_one_layer_are_kept(tmp_path) -> None:
    discovered = Layer("discovered", tmp_path / "d", [(0, {"name": "a", "backend": "ollama"})])
    curated = Layer("curated", tmp_path / "c", [(0, {"name": "b", "backend": "vllm"})])
    assert set(merge_layers([discovered, curated])) == {"a", "b"}
