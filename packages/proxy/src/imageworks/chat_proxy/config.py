"""ProxyConfig: typed settings with a written precedence.

Precedence, highest first: the process environment, ``.env.local``, ``.env``, the defaults
below (each rule has its own test). Files are read from the working directory. A bad value
fails at start with the variable's name and the reason (``ConfigError``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imageworks.chat_proxy.auth import NamedKey, is_loopback
from imageworks.chat_proxy.redact import redact_text

PREFIX = "CHAT_PROXY_"
ENV_FILES = (".env", ".env.local")  # lowest precedence first
SECRET_FIELDS = frozenset({"api_keys", "named_keys", "admin_token"})
# Set from api_keys, never from a variable of its own.
DERIVED_FIELDS = frozenset({"named_keys"})


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable."""


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


# What a body costs while its request is in flight, in times its size: its bytes, its parsed
# copy (a 30 MB string stays a 30 MB string), and the decoding between the two, or the
# payload written back. Measured on a real proxy process: 8 bodies of 30 MB at once grew it
# by 575-655 MB, 2.4-2.7 times their size (tests/test_body_memory.py holds the process within
# its budget).
BODY_COST = 3


class ProxyConfig(BaseModel):
    """Every CHAT_PROXY_* variable is a field named like the variable without the prefix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535)
    server: Literal["uvicorn", "hypercorn"] = "uvicorn"
    vllm_remote_url: str = "http://127.0.0.1:8600"
    ollama_base_url: str = "http://127.0.0.1:11434"
    autostart_enabled: bool = True
    require_template: bool = True
    registry_dir: Path = Path("configs")
    staging_dir: Path = Path("_staging")
    log_path: Path = Path("logs/chat_proxy.jsonl")
    max_log_bytes: int = Field(default=25_000_000, ge=1024)
    log_backups: int = Field(default=5, ge=0, le=1000)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # Bodies of all requests in flight together (over it: 503 with Retry-After), the longest
    # a whole body may take to arrive, the largest request head (431 past it), and the largest
    # non-stream answer taken from a backend (a 502 past it).
    body_budget_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    body_deadline_s: float = Field(default=300.0, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_answer_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Slow clients: the longest a request's body may pause, a request head may take to arrive,
    # and an idle kept-alive connection may stay open (uvicorn's own default is 5 s).
    body_timeout_s: float = Field(default=30.0, gt=0)
    header_timeout_s: float = Field(default=10.0, gt=0)
    keep_alive_s: float = Field(default=75.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Longest silence allowed while reading from a backend (first byte included): a non-streaming
    # generation sends nothing until it is done, so this is generous. No total cap on streams.
    read_timeout_s: float = Field(default=600.0, gt=0)
    # Lifecycle: how long a model may take to load, how long a request may wait for its turn
    # while another model drains, and how often waiting streams get an SSE comment.
    start_timeout_s: float = Field(default=600.0, gt=0)
    queue_timeout_s: float = Field(default=120.0, gt=0)
    # Collation (ABAB -> AABB): when another model has claimed a shared slot, up to this many
    # more requests for the running model go first (0: off), as long as no request for the
    # claiming model has waited collate_wait_s.
    collate_max: int = Field(default=8, ge=0)
    collate_wait_s: float = Field(default=5.0, ge=0)
    keepalive_s: float = Field(default=5.0, gt=0)
    # GPU arbitration.
    gpu_probe: Literal["auto", "nvml", "none", "sim"] = "auto"
    # One total per device (a comma list in the environment); one number: one device.
    gpu_total_mb: tuple[int, ...] | None = None
    gpu_sim: Path | None = None
    gpu_headroom_mb: int = Field(default=1024, ge=0)
    # Host RAM that sleeping vLLM models (sleep mode: weights parked in RAM) may hold in all;
    # unset: half of the machine's RAM; 0: never sleep, always stop.
    sleep_ram_mb: int | None = Field(default=None, ge=0)
    # Supervision: a failed start is retried no sooner than the backoff (doubling from the
    # first value to the cap, reset on success); so many crashes within the window is a crash
    # loop, and the model stays failed until activated by hand.
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    crash_loop_limit: int = Field(default=5, ge=1)
    crash_loop_window_s: float = Field(default=600.0, gt=0)
    reconcile_s: float = Field(default=5.0, gt=0)
    # Idle unload: a managed model with no request for this long is stopped (0: never; an
    # entry's ttl_s wins); models named here (comma-separated) start with the proxy.
    idle_ttl_s: float = Field(default=0.0, ge=0)
    preload: tuple[str, ...] = ()
    # llama.cpp engines: a JSON array like the executor's template (placeholders: python,
    # model_path, host, port, served_model_id, logical_name, {chat_template_args},
    # {extra_args}); empty = the bundled xllamacpp server.
    llamacpp_launch_template: str | None = None
    vram_timeout_s: float = Field(default=60.0, gt=0)
    lease_ttl_s: float = Field(default=900.0, gt=0)
    shutdown_step_timeout_s: float = Field(default=30.0, gt=0)
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # A comma list of keys, or "@/path/keys.json": a JSON array of {name, key, models,
    # profiles} (named_keys: what each key may use; a plain list's keys are key1, key2...).
    api_keys: tuple[str, ...] = ()
    named_keys: tuple[NamedKey, ...] = ()
    admin_token: str | None = None
    recent_requests: int = Field(default=500, ge=1, le=100_000)
    # Back-pressure: requests forwarded at once per model (0: no limit; an entry's
    # max_concurrency wins) and how many more may wait for a turn before 429.
    max_concurrency: int = Field(default=0, ge=0)
    max_queue: int = Field(default=64, ge=0)
    # Images for vision models (an entry's ``vision`` settings win): inline images whose long
    # edge exceeds the target are resized to it (0: forward every image as it came), resized
    # JPEGs are written at this quality; most images per request (0: no limit) and the
    # largest one image may be; threads preparing images (at most this many decode at once).
    vision_target_long_edge: int = Field(default=1536, ge=0)
    vision_jpeg_quality: int = Field(default=90, ge=1, le=95)
    vision_max_images: int = Field(default=0, ge=0)
    vision_max_image_bytes: int = Field(default=20_000_000, ge=1)
    vision_workers: int = Field(default=2, ge=1, le=64)
    # Decoded pixels the vision threads may hold at once, counted before decoding (an image
    # that needs more: 413; one that does not fit now waits up to queue_timeout_s, then 503).
    # 512 MB holds the largest image Pillow opens (89 MP at 4 bytes a pixel).
    vision_decode_budget_mb: int = Field(default=512, ge=16, le=1024 * 1024)
    # Browser origins allowed to call the API (comma-separated; "*" for any, never with
    # credentials). Empty: no CORS headers at all.
    cors_origins: tuple[str, ...] = ()
    # Names the Host header may carry besides loopback names, IP addresses, CHAT_PROXY_HOST
    # and this machine's name (comma-separated; "*": any). Refused otherwise: DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    # Ray Serve (``backend: "ray"`` entries): the dashboard that takes the Serve REST API, the
    # Serve HTTP proxy requests go to, and the *name* of a variable holding the dashboard's
    # token (sent as ``Authorization: Bearer``; the token itself stays out of the config).
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    ray_serve_url: str = "http://127.0.0.1:8000"
    ray_token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Other ImageWorks boxes: a JSON array of {name, url, api_key_env} (empty: read
    # ``<registry_dir>/peers.json`` if present), how often their model lists are read, and how
    # long one may stay silent before its models leave the list.
    peers: str = ""
    peer_poll_s: float = Field(default=5.0, gt=0)
    peer_grace_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _name_the_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "named_keys" in data:
            return data
        value = data.get("api_keys", ())
        if isinstance(value, str) and value.strip().startswith("@"):
            named = read_keys_file(Path(value.strip()[1:]).expanduser())
        else:
            keys = cls._split_keys(value)
            if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys):
                return data  # the field's own validation says what is wrong
            named = tuple(NamedKey(name=f"key{i}", key=k) for i, k in enumerate(keys, 1))
        return {**data, "api_keys": tuple(k.key for k in named), "named_keys": named}

    @field_validator("api_keys", "preload", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @field_validator("vllm_remote_url", "ollama_base_url", "ray_dashboard_url", "ray_serve_url")
    @classmethod
    def _is_http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("gpu_total_mb", mode="before")
    @classmethod
    def _totals_per_device(cls, value: Any) -> Any:
        if value == "" or value is None:
            return None
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(","))
        return (value,) if isinstance(value, int) else value

    @field_validator("gpu_total_mb")
    @classmethod
    def _totals_are_positive(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError("each device's total must be at least 1 MB")
        return value

    @field_validator("admin_token", "ray_token_env", mode="before")
    @classmethod
    def _blank_token_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> ProxyConfig:
        least = BODY_COST * self.max_body_bytes
        if self.body_budget_bytes < least:
            raise ValueError(
                f"{env_name('body_budget_bytes')} is {self.body_budget_bytes}, and must be at "
                f"least {BODY_COST} times {env_name('max_body_bytes')} ({self.max_body_bytes}): "
                f"{least} or more (a body costs about {BODY_COST} times its size while it is "
                "forwarded), or the largest body allowed could never be taken"
            )
        return self

    @model_validator(mode="after")
    def _exposed_needs_a_token(self) -> ProxyConfig:
        if not is_loopback(self.host) and not self.admin_token:
            raise ValueError(
                f"binding to {self.host} (not loopback) requires {env_name('admin_token')}"
            )
        return self

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, cwd: Path | None = None, **overrides: Any
    ) -> ProxyConfig:
        """Build the config from env files and the environment; ``overrides`` win over both."""
        base = cwd or Path.cwd()
        merged: dict[str, str] = {}
        for filename in ENV_FILES:
            path = base / filename
            if path.is_file():
                merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
        merged.update(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if env_name(name) in merged and name not in DERIVED_FIELDS:
                values[name] = merged[env_name(name)]
        # The registry and staging dirs are shared with the CLI and the console.
        if "registry_dir" not in values and merged.get("IMAGEWORKS_REGISTRY_DIR"):
            values["registry_dir"] = merged["IMAGEWORKS_REGISTRY_DIR"]
        if "staging_dir" not in values and merged.get("IMAGEWORKS_STAGING_DIR"):
            values["staging_dir"] = merged["IMAGEWORKS_STAGING_DIR"]
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    def public(self) -> dict[str, Any]:
        """The settings safe to show (GUI, /admin/state): secrets become a flag."""
        shown = self.model_dump(mode="json", exclude=set(SECRET_FIELDS))
        shown = {k: redact_text(v) if isinstance(v, str) else v for k, v in shown.items()}
        shown["api_keys_set"] = bool(self.api_keys)
        shown["api_key_names"] = [key.name for key in self.named_keys]
        shown["admin_token_set"] = bool(self.admin_token)
        return shown

    def __str__(self) -> str:
        lines = [f"{env_name(k)}={v}" for k, v in self.public().items() if not k.endswith("_set")]
        lines.append(f"{env_name('api_keys')}={'<set>' if self.api_keys else '<unset>'}")
        lines.append(f"{env_name('admin_token')}={'<set>' if self.admin_token else '<unset>'}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ProxyConfig(host={self.host!r}, port={self.port}, ...)"


def read_keys_file(path: Path) -> tuple[NamedKey, ...]:
    """The named keys of a ``CHAT_PROXY_API_KEYS=@file``: a JSON array of objects with
    ``name``, ``key`` and optionally ``models`` and ``profiles``. Names and keys unique. The
    message of a bad file names the variable and the entry, never a key."""
    where = f"{env_name('api_keys')} file {path}"
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{where} cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ValueError(f"{where} is not JSON ({exc})") from None
    if not isinstance(listed, list) or not listed:
        raise ValueError(f"{where} must hold a non-empty JSON array of keys")
    named: list[NamedKey] = []
    for i, item in enumerate(listed):
        try:
            named.append(NamedKey.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"{where}, entry {i}: {problems}") from None
    for field in ("name", "key"):
        values = [getattr(k, field) for k in named]
        if len(set(values)) != len(values):
            raise ValueError(f"{where}: two keys have the same {field}")
    return tuple(named)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        where = env_name(field) if field else "configuration"
        # A rule across fields (a model validator) names its variables itself.
        problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)
