"""Everything one running proxy owns, as plain fields (and three views of the registry).
Created and closed by the app's lifespan (``server.lifespan``). The engines' backends are
``lifecycle.backends``; the one HTTP client is ``egress.session``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from imageworks.chat_proxy.arbiter.arbiter import VramArbiter
from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.engines.lifecycle import Lifecycle
from imageworks.chat_proxy.observe.metrics import Metrics
from imageworks.chat_proxy.observe.records import Records
from imageworks.chat_proxy.observe.requestlog import RequestLog
from imageworks.chat_proxy.request.admission import Admission
from imageworks.chat_proxy.server.staging import StagingLock
from imageworks.chat_proxy.upstream.egress import Egress
from imageworks.chat_proxy.upstream.peers import Peers
from imageworks.chat_proxy.upstream.responses import ResponseBook
from imageworks.chat_proxy.vision.pool import WorkerPool
from imageworks.chat_proxy.vision.prepare import ImagePrep
from imageworks.model_loader.profiles import DeploymentProfile, ProfileManager
from imageworks.model_loader.registry import Registry
from imageworks.model_loader.schema import ModelEntry
from imageworks.model_loader.watch import RegistryWatcher


@dataclass
class ProxyState:
    config: ProxyConfig
    watcher: RegistryWatcher
    profiles: ProfileManager
    egress: Egress  # the one HTTP client to backends
    log: RequestLog
    metrics: Metrics
    records: Records  # each finished request's JSONL line and metrics
    lifecycle: Lifecycle
    arbiter: VramArbiter
    autostart: bool
    admission: Admission
    staging_lock: StagingLock
    peers: Peers
    pool: WorkerPool  # the CPU worker pool: big bodies and images
    images: ImagePrep  # fits images to their model, in the pool
    responses: ResponseBook  # where each Responses id lives
    started_at: float = field(default_factory=time.time)
    _models_cache: tuple[tuple[str, str, int, int], bytes] | None = None

    @property
    def registry(self) -> Registry:
        return self.watcher.current

    @property
    def profile(self) -> DeploymentProfile:
        return self.profiles.active

    def visible(self, entry: ModelEntry) -> bool:
        return entry.servable and not entry.deprecated and self.profile.admits(entry)
