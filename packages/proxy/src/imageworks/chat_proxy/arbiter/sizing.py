"""What a model needs on the GPU, from what is known of it, in this order: its own share of
its device (``gpu_memory_utilization``: vLLM reserves exactly that), its learned footprint, the
estimate read from its files (``estimate.py``), its declared ``vram_estimate_mb``. Pure
helpers of the arbiter (``arbiter.py``), which holds what was learned and placed."""

from __future__ import annotations

import math

from imageworks.chat_proxy.arbiter.estimate import Estimate
from imageworks.chat_proxy.arbiter.placement import share_mb
from imageworks.model_loader.schema import ModelEntry


def need_mb(
    entry: ModelEntry,
    devices: tuple[int, ...],
    total: int,
    learned: int | None,
    found: Estimate | None,
) -> int:
    """What ``entry`` takes over all its ``devices`` (``total``: the first one's size)."""
    own = entry.backend_config.gpu_memory_utilization
    if own and total:
        return math.ceil(own * total) * max(len(devices), entry.gpu_span)
    return learned or (found.total_mb if found else None) or entry.vram_estimate_mb or 0


def source(entry: ModelEntry, learned: int | None, found: Estimate | None) -> str | None:
    """Which of the four ``need_mb`` uses now: share, learned, estimate, declared (None)."""
    if entry.backend_config.gpu_memory_utilization:
        return "share"
    if learned:
        return "learned"
    if found is not None:
        return "estimate"
    if entry.vram_estimate_mb:
        return "declared"
    return None


def share(need: int, devices: int, total: int) -> float | None:
    """The fraction of each of its ``devices`` a need of ``need`` MB is (vLLM's
    ``--gpu-memory-utilization``), rounded up to a hundredth; None without a total or need."""
    each = share_mb(need, devices)
    if not total or each <= 0:
        return None
    return min(1.0, math.ceil(each / total * 100) / 100)


def estimate_key(entry: ModelEntry) -> tuple[str, str | None, tuple[str, ...]]:
    """What an estimate is read from: the model, its path and its arguments."""
    config = entry.backend_config
    return (entry.name, config.model_path, tuple(config.extra_args))
