"""How long does building a 2,000-entry registry take? (issue 2; a benchmark, not a test)

    uv run python bench/registry_load.py [--entries 2000] [--repeat 20]

Writes synthetic discovered + curated layers (every curated entry overlays a discovered one) to a
temp dir, then times ``build_registry`` (read, merge, validate, index, snapshot compare) and the
cached ``load_registry`` path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from imageworks.model_loader.registry import build_registry, load_registry


def synthetic(count: int) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    discovered, curated = [], []
    for i in range(count):
        backend = ("vllm", "ollama", "llamacpp", "openai")[i % 4]
        discovered.append(
            {
                "name": f"model-{i:05d}",
                "backend": backend,
                "served_model_id": f"served/{i}",
                "backend_config": {
                    "port": 24001,
                    "model_path": f"/models/{i}",
                    "extra_args": ["--x"],
                },
                "capabilities": {"text": True, "vision": i % 3 == 0},
                "download_path": f"/weights/{i}",
                "download_size_bytes": i * 1000,
                "metadata": {"created_from_download": True, "registry_layer": "discovered"},
            }
        )
        if i % 2 == 0:
            curated.append(
                {
                    "name": f"model-{i:05d}",
                    "display_name": f"Model {i}",
                    "generation_defaults": {"temperature": 0.7, "max_tokens": 512},
                    "chat_template": {"source": "external", "path": f"/t/{i}.jinja"},
                    "profiles": ["production"],
                    "vram_estimate_mb": 8000,
                }
            )
    return discovered, curated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        discovered, curated = synthetic(args.entries)
        (root / "model_registry.discovered.json").write_text(json.dumps(discovered))
        (root / "model_registry.curated.json").write_text(json.dumps(curated))
        build_registry(root)  # first run writes the snapshot; later runs only compare it
        cold = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            registry = build_registry(root)
            cold.append((time.perf_counter() - start) * 1000)
        load_registry(root)
        start = time.perf_counter()
        for _ in range(1000):
            load_registry(root)
        cached_us = (time.perf_counter() - start) * 1000
        print(f"entries: {len(registry)}")
        print(
            f"build_registry: median {statistics.median(cold):.1f} ms, "
            f"min {min(cold):.1f} ms, max {max(cold):.1f} ms over {args.repeat} runs"
        )
        print(f"load_registry (unchanged files, cached): {cached_us:.1f} us per call")


if __name__ == "__main__":
    main()
