"""The GPU lease: one holder at a time, with a TTL, persisted so a proxy restart keeps it.

The token is the holder's secret: it is returned once, by ``grant``, and never shown by
``public()``. A lease expires ``ttl_s`` after its last renewal, whoever holds it.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageworks.model_loader.layers import write_atomic

LEASE_FILE = "gpu_lease.json"


@dataclass
class Lease:
    token: str
    owner: str
    reason: str
    restart_model: bool
    ttl_s: float
    need_mb: int | None  # None: the whole GPU
    granted_at: float = field(default_factory=time.time)
    renewed_at: float = field(default_factory=time.time)
    evicted: list[str] = field(default_factory=list)

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.ttl_s

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) >= self.expires_at

    def public(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "reason": self.reason,
            "restart_model": self.restart_model,
            "ttl_s": self.ttl_s,
            "need_mb": self.need_mb,
            "granted_at": self.granted_at,
            "renewed_at": self.renewed_at,
            "expires_at": self.expires_at,
            "age_s": round(time.time() - self.granted_at, 1),
            "evicted": list(self.evicted),
        }


def new_token() -> str:
    return secrets.token_urlsafe(24)


class LeaseStore:
    """Reads and writes the lease file (mode 0600: it holds the token)."""

    def __init__(self, staging_dir: Path) -> None:
        self.path = staging_dir / LEASE_FILE

    def load(self) -> Lease | None:
        try:
            data = json.loads(self.path.read_text())
            return Lease(**data)
        except (OSError, ValueError, TypeError):
            return None

    def save(self, lease: Lease | None) -> None:
        if lease is None:
            self.path.unlink(missing_ok=True)
            return
        write_atomic(self.path, json.dumps(asdict(lease), indent=2).encode())
        self.path.chmod(0o600)
