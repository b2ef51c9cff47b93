"""Reading the layer files and merging them field by field.

Layers, lowest first: ``discovered`` (written by tools) then ``curated`` (hand-maintained).
Merge rules (DESIGN.md §3), each with its own test:
- an entry is matched across layers by ``name``;
- nested objects merge key by key; lists and scalars from the higher layer replace;
- an explicit ``null`` in a higher layer deletes the field;
- key order is the lower layer's, with keys new in the higher layer appended.
The merged snapshot is an output only and never read here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageworks.model_loader.errors import Problem

DISCOVERED_FILE = "model_registry.discovered.json"
CURATED_FILE = "model_registry.curated.json"
SNAPSHOT_FILE = "model_registry.json"
# Lowest precedence first.
LAYER_FILES: tuple[tuple[str, str], ...] = (
    ("discovered", DISCOVERED_FILE),
    ("curated", CURATED_FILE),
)

Json = dict[str, Any]
# For each top-level field (dotted for nested ones), the layer that supplied its value.
Origins = dict[str, str]


@dataclass
class Layer:
    name: str
    path: Path
    # (index in the file, entry): the index is kept so errors point at the right line.
    entries: list[tuple[int, Json]] = field(default_factory=list)


def read_layer(name: str, path: Path) -> tuple[Layer, list[Problem]]:
    """Read one layer file. A missing file is an empty layer, not an error."""
    layer = Layer(name, path)
    if not path.exists():
        return layer, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return layer, [Problem(str(path), f"not valid JSON: {exc.msg} at line {exc.lineno}")]
    except (OSError, UnicodeDecodeError) as exc:
        return layer, [Problem(str(path), f"cannot be read: {exc}")]
    if not isinstance(data, list):
        return layer, [Problem(str(path), "must be a JSON array of model entries")]
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data):
        if not isinstance(raw, dict):
            problems.append(Problem(str(path), "entry must be a JSON object", index=index))
            continue
        entry_name = raw.get("name")
        if not isinstance(entry_name, str) or not entry_name.strip():
            problems.append(Problem(str(path), "missing or empty", index=index, field="name"))
            continue
        if entry_name in seen:
            problems.append(
                Problem(
                    str(path),
                    f"duplicate name; first defined at entry #{seen[entry_name]}",
                    index=index,
                    name=entry_name,
                    field="name",
                )
            )
            continue
        seen[entry_name] = index
        layer.entries.append((index, raw))
    return layer, problems


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> Json:
    """Overlay ``overlay`` on ``base``: objects merge, everything else replaces, null deletes."""
    merged: Json = dict(base)
    for key, value in overlay.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = _without_nulls(value)
    return merged


def _without_nulls(value: Any) -> Any:
    """``value`` with null members of objects removed; shared, not copied, when it has none."""
    if isinstance(value, dict) and any(v is None or isinstance(v, dict) for v in value.values()):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _record_origins(origins: Origins, overlay: Mapping[str, Any], layer: str, prefix: str) -> None:
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if value is None:
            for known in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
                del origins[known]
        elif isinstance(value, dict):
            origins.pop(dotted, None)
            _record_origins(origins, value, layer, dotted + ".")
        else:
            for known in [k for k in origins if k.startswith(dotted + ".")]:
                del origins[known]
            origins[dotted] = layer


@dataclass
class MergedEntry:
    raw: Json
    # (layer, file, index) of each place the entry was defined, lowest layer first.
    sources: list[tuple[str, str, int]] = field(default_factory=list)
    # The entry as each of those layers wrote it, in the same order.
    overlays: list[Json] = field(default_factory=list)

    def origins(self) -> Origins:
        """Which layer supplied each field. Computed on demand: only ``show`` and errors need it."""
        origins: Origins = {}
        for (layer, _, _), overlay in zip(self.sources, self.overlays, strict=True):
            _record_origins(origins, overlay, layer, "")
        return origins


def merge_layers(layers: Iterable[Layer]) -> dict[str, MergedEntry]:
    """Merge layers (lowest first) into one entry per name, keeping first-seen order."""
    merged: dict[str, MergedEntry] = {}
    for layer in layers:
        for index, raw in layer.entries:
            current = merged.setdefault(raw["name"], MergedEntry({}))
            current.raw = deep_merge(current.raw, raw)
            current.sources.append((layer.name, str(layer.path), index))
            current.overlays.append(raw)
    return merged


def render_snapshot(entries: Iterable[Json]) -> bytes:
    """The snapshot's bytes: entries sorted by name, keys in entry order, one entry per line.

    One compact line per entry keeps diffs readable and lets json use its C encoder
    (``indent`` would force the pure-Python one, 5x slower on a large registry).
    """
    ordered = sorted(entries, key=lambda raw: str(raw["name"]))
    lines = ",\n".join("  " + json.dumps(raw, ensure_ascii=False) for raw in ordered)
    return ("[\n" + lines + "\n]\n" if ordered else "[]\n").encode("utf-8")


def write_if_changed(path: Path, content: bytes) -> bool:
    """Atomically replace ``path`` with ``content`` unless it already holds exactly that."""
    try:
        if path.read_bytes() == content:
            return False
    except FileNotFoundError:
        pass
    write_atomic(path, content)
    return True


def write_atomic(path: Path, content: bytes) -> None:
    """Write through a temp file in the same directory (so rename never crosses filesystems)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
