"""ExecutorConfig: the executor's settings, from IMAGEWORKS_VLLM_* variables (and a few shared)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from imageworks.chat_proxy.auth import is_loopback
from imageworks.vllm_executor.launcher import parse_template

ENV = {
    "host": "IMAGEWORKS_VLLM_HOST",
    "port": "IMAGEWORKS_VLLM_PORT",
    "served_host": "IMAGEWORKS_VLLM_SERVED_HOST",
    "served_port": "IMAGEWORKS_VLLM_SERVED_PORT",
    "public_host": "IMAGEWORKS_VLLM_PUBLIC_HOST",
    "launch_template": "IMAGEWORKS_VLLM_LAUNCH_TEMPLATE",
    "python": "IMAGEWORKS_VLLM_PYTHON",
    "start_timeout_s": "IMAGEWORKS_VLLM_START_TIMEOUT_S",
    "gpu_memory_utilization": "CHAT_PROXY_VLLM_GPU_MEMORY_UTILIZATION",
    "registry_dir": "IMAGEWORKS_REGISTRY_DIR",
    "staging_dir": "IMAGEWORKS_STAGING_DIR",
    "admin_token": "CHAT_PROXY_ADMIN_TOKEN",
    "allowed_hosts": "IMAGEWORKS_VLLM_ALLOWED_HOSTS",
}


class ExecutorConfigError(ValueError):
    pass


class ExecutorConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8600, ge=1, le=65535)
    served_host: str = "127.0.0.1"  # where vLLM binds (0.0.0.0 inside compose)
    served_port: int = Field(default=24001, ge=1, le=65535)
    public_host: str = "127.0.0.1"  # how the proxy reaches vLLM (imageworks-vllm in compose)
    launch_template: tuple[str, ...]
    # The interpreter the template's {python} names: vLLM in an environment of its own (never
    # a dependency of the proxy), e.g. the one scripts/real-engines.sh builds. Default: ours.
    python: str | None = None
    start_timeout_s: float = Field(default=600.0, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    registry_dir: Path = Path("configs")
    staging_dir: Path = Path("_staging")
    admin_token: str | None = None
    # Host names clients may use besides loopback names, IPs, the bind and public hosts.
    allowed_hosts: tuple[str, ...] = ()

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip() for h in value.split(",") if h.strip())
        return value

    @model_validator(mode="after")
    def _exposed_needs_a_token(self) -> ExecutorConfig:
        if not is_loopback(self.host) and not self.admin_token:
            raise ValueError(
                f"binding to {self.host} (not loopback) requires CHAT_PROXY_ADMIN_TOKEN"
            )
        return self

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> ExecutorConfig:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {k: env[v] for k, v in ENV.items() if env.get(v)}
        values.update(overrides)
        try:
            template = values.get("launch_template")
            if not isinstance(template, tuple | list):
                values["launch_template"] = parse_template(
                    template if isinstance(template, str) else None
                )
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = ENV.get(str(error["loc"][0]), str(error["loc"][0])) if error["loc"] else "config"
            raise ExecutorConfigError(f"{name}: {error['msg']}") from None
        except ValueError as exc:
            raise ExecutorConfigError(str(exc)) from None
