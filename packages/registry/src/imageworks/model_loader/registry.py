"""The merged registry: build it from the layer files, look models up, cache it per directory."""

from __future__ import annotations

import gc
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from imageworks.model_loader.errors import Problem, RegistryValidationError, UnknownModelError
from imageworks.model_loader.layers import (
    LAYER_FILES,
    SNAPSHOT_FILE,
    Json,
    MergedEntry,
    Origins,
    merge_layers,
    read_layer,
    render_snapshot,
    write_if_changed,
)
from imageworks.model_loader.naming import normalize, suggest
from imageworks.model_loader.schema import ModelEntry

REGISTRY_DIR_ENV = "IMAGEWORKS_REGISTRY_DIR"
DEFAULT_REGISTRY_DIR = "configs"

# (path, mtime_ns, size) of each layer file; None for a missing file.
Signature = tuple[tuple[str, int, int] | None, ...]


def registry_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """The layer directory: the argument, else $IMAGEWORKS_REGISTRY_DIR, else configs/."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get(REGISTRY_DIR_ENV) or DEFAULT_REGISTRY_DIR)


def layer_signature(directory: Path) -> Signature:
    parts: list[tuple[str, int, int] | None] = []
    for _, filename in LAYER_FILES:
        path = directory / filename
        try:
            st = path.stat()
        except FileNotFoundError:
            parts.append(None)
        else:
            parts.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(parts)


@dataclass(frozen=True)
class _Record:
    entry: ModelEntry
    merged: MergedEntry

    @property
    def raw(self) -> Json:
        return self.merged.raw

    @property
    def sources(self) -> list[tuple[str, str, int]]:
        return self.merged.sources


class Registry:
    """An immutable, validated view of the merged layers. Build a new one to change it."""

    def __init__(self, directory: Path, records: list[_Record], snapshot: bytes) -> None:
        self.directory = directory
        self._records = {r.entry.name: r for r in sorted(records, key=lambda r: r.entry.name)}
        self.snapshot = snapshot
        self.version = hashlib.sha256(snapshot).hexdigest()[:12]
        self._exact, self._loose = _build_indexes(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[ModelEntry]:
        return (r.entry for r in self._records.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    @property
    def names(self) -> list[str]:
        return list(self._records)

    def get(self, name: str) -> ModelEntry:
        """Exact logical name only."""
        try:
            return self._records[name].entry
        except KeyError:
            raise UnknownModelError(name, suggest(name, self._records)) from None

    def find(self, name: str) -> ModelEntry | None:
        """Resolve a name without raising: logical, display, served id or alias; then loosely."""
        logical = self._exact.get(name) or self._loose.get(normalize(name))
        return self._records[logical].entry if logical else None

    def resolve(self, name: str) -> ModelEntry:
        """Like ``find``, but a miss raises ``UnknownModelError`` with close names."""
        entry = self.find(name)
        if entry is None:
            # Match against every known name, but suggest the logical names they belong to.
            logical = dict.fromkeys(self._exact[key] for key in suggest(name, self._exact, 6))
            raise UnknownModelError(name, list(logical)[:3])
        return entry

    def raw(self, name: str) -> Json:
        """The merged JSON object for an entry, unknown fields and key order included."""
        return dict(self._records[self.get(name).name].raw)

    def origins(self, name: str) -> Origins:
        return self._records[self.get(name).name].merged.origins()

    def sources(self, name: str) -> list[tuple[str, str, int]]:
        return list(self._records[self.get(name).name].sources)


def _build_indexes(records: dict[str, _Record]) -> tuple[dict[str, str], dict[str, str]]:
    """Exact and normalized lookup tables; ambiguous loose keys are left out rather than guessed."""
    exact: dict[str, str] = {name: name for name in records}
    for name, record in records.items():
        entry = record.entry
        for key in (entry.display_name, *entry.model_aliases, entry.served_model_id):
            if key:
                exact.setdefault(key, name)
    loose: dict[str, str] = {}
    ambiguous: set[str] = set()
    for key, name in exact.items():
        norm = normalize(key)
        if not norm:
            continue
        if loose.get(norm, name) != name:
            ambiguous.add(norm)
        loose.setdefault(norm, name)
    for norm in ambiguous:
        loose.pop(norm)
    return exact, loose


def build_registry(
    directory: str | os.PathLike[str] | None = None, *, write_snapshot: bool = True
) -> Registry:
    """Read, merge and validate the layers; raise ``RegistryValidationError`` listing every problem.

    The snapshot is written (atomically, only when its bytes change) after validation succeeds.
    """
    with _gc_paused():
        return _build(registry_dir(directory), write_snapshot)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """A build allocates ~50 container objects per entry, all acyclic: letting the cyclic GC run
    meanwhile rescans the growing heap and costs ~40% of a 2,000-entry load."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _build(root: Path, write_snapshot: bool) -> Registry:
    problems: list[Problem] = []
    layers = []
    for layer_name, filename in LAYER_FILES:
        layer, found = read_layer(layer_name, root / filename)
        layers.append(layer)
        problems += found
    if not any((root / f).exists() for _, f in LAYER_FILES):
        files = " or ".join(f for _, f in LAYER_FILES)
        problems.append(Problem(str(root), f"no registry layer found (expected {files})"))
    merged = merge_layers(layers)
    records = []
    for name, item in merged.items():
        record = _validate(name, item, problems)
        if record is not None:
            records.append(record)
    problems += _name_collisions(records)
    if problems:
        raise RegistryValidationError(problems)
    snapshot = render_snapshot(r.raw for r in records)
    if write_snapshot:
        write_if_changed(root / SNAPSHOT_FILE, snapshot)
    return Registry(root, records, snapshot)


def _validate(name: str, item: MergedEntry, problems: list[Problem]) -> _Record | None:
    try:
        entry = ModelEntry.model_validate(item.raw)
    except ValidationError as exc:
        for error in exc.errors():
            dotted = ".".join(str(p) for p in error["loc"])
            _, file, index = _blame(item, dotted)
            problems.append(Problem(file, error["msg"], index=index, name=name, field=dotted))
        return None
    return _Record(entry, item)


def _blame(item: MergedEntry, dotted: str) -> tuple[str, str, int]:
    """The source of the failing value: its origin layer, else the highest layer with the entry."""
    origins = item.origins()
    layer = origins.get(dotted) or next(
        (v for k, v in origins.items() if dotted.startswith(k + ".")), None
    )
    for source in reversed(item.sources):
        if layer is None or source[0] == layer:
            return source
    return item.sources[-1]


def _name_collisions(records: list[_Record]) -> list[Problem]:
    """Display names and aliases must not name two entries (served ids may be shared)."""
    owners: dict[str, tuple[_Record, str]] = {r.entry.name: (r, "name") for r in records}
    problems = []
    for record in records:
        entry = record.entry
        keys = [("display_name", entry.display_name)] + [
            ("model_aliases", a) for a in entry.model_aliases
        ]
        for field_name, key in keys:
            if not key:
                continue
            other = owners.get(key)
            if other is not None and other[0].entry.name != entry.name:
                _, file, index = record.sources[-1]
                problems.append(
                    Problem(
                        file,
                        f"{key!r} already names {other[0].entry.name!r} (its {other[1]}, "
                        f"{_where(other[0])})",
                        index=index,
                        name=entry.name,
                        field=field_name,
                    )
                )
            else:
                owners.setdefault(key, (record, field_name))
    return problems


def _where(record: _Record) -> str:
    return ", ".join(f"{file} entry #{index}" for _, file, index in record.sources)


# --- the process-wide cache behind load_registry() -----------------------------------------

_cache: dict[Path, tuple[Signature, Registry]] = {}
_cache_lock = threading.Lock()


def load_registry(
    directory: str | os.PathLike[str] | None = None, *, force: bool = False
) -> Registry:
    """The registry for ``directory``, rebuilt when a layer file changed or when ``force`` is set.

    Cheap when nothing changed: two ``stat`` calls. Raises ``RegistryValidationError`` on a bad
    layer; long-running users that must keep the last good registry use ``RegistryWatcher``.
    """
    root = registry_dir(directory).resolve()
    signature = layer_signature(root)
    with _cache_lock:
        cached = _cache.get(root)
        if cached is not None and not force and cached[0] == signature:
            return cached[1]
        registry = build_registry(root)
        _cache[root] = (signature, registry)
        return registry
