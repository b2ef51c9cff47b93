"""What a ``backend: "ray"`` entry asks Ray Serve to run, and how our change is folded into the
cluster's Serve config. Pure functions over plain data: the backend (``ray.py``) does the HTTP.

An entry describes its application under ``ray``::

    "ray": {"import_path": "pkg.module:builder", "args": {...},
            "runtime_env": {...}, "deployments": [...], "route_prefix": "/optional"}

or, for Ray Serve LLM's OpenAI app, ``"ray": {"llm": {...}}`` with ``model_source``,
``accelerator_type``, ``autoscaling_config``, ``engine_kwargs`` (and any other ``LLMConfig``
field, passed as is). The application is named ``imageworks-<model>``: the name prefix is how the
proxy tells the applications it owns from everyone else's on a shared cluster.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imageworks.chat_proxy.errors import ModelStartFailed
from imageworks.model_loader.schema import ModelEntry

OWNED_PREFIX = "imageworks-"
LLM_IMPORT_PATH = "ray.serve.llm:build_openai_app"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# Fields of an LLM description that are ours to map; the rest go to LLMConfig unchanged.
_LLM_MAPPED = ("model_source", "autoscaling_config", "deployment_config")


class LlmApp(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    model_source: str = Field(min_length=1)
    accelerator_type: str | None = None
    autoscaling_config: dict[str, Any] | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    deployment_config: dict[str, Any] = Field(default_factory=dict)


class RayApp(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    import_path: str | None = Field(default=None, pattern=r"^[\w.]+:[\w.]+$")
    args: dict[str, Any] = Field(default_factory=dict)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    deployments: list[dict[str, Any]] = Field(default_factory=list)
    route_prefix: str | None = Field(default=None, pattern=r"^/")
    llm: LlmApp | None = None


def app_name(model: str) -> str:
    """The Serve application of ``model``: our prefix and the name made safe, with a short hash
    where making it safe changed it (so 'org/m' and 'org_m' stay two applications)."""
    safe = _UNSAFE.sub("_", model)
    if safe != model:
        safe += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return OWNED_PREFIX + safe


def route_prefix(entry: ModelEntry) -> str:
    described = describe(entry)
    return (described.route_prefix or "/" + app_name(entry.name)).rstrip("/") or "/"


def describe(entry: ModelEntry) -> RayApp:
    raw = getattr(entry, "ray", None) or {}
    try:
        app = RayApp.model_validate(raw)
    except ValidationError as exc:
        raise ModelStartFailed(f"model {entry.name!r}: invalid 'ray' description: {exc}") from None
    if (app.import_path is None) == (app.llm is None):
        raise ModelStartFailed(
            f"model {entry.name!r}: its 'ray' description needs exactly one of "
            "'import_path' (any Serve application) or 'llm' (Ray Serve LLM's OpenAI app)"
        )
    return app


def application(entry: ModelEntry) -> dict[str, Any]:
    """The Serve application config for ``entry`` (one item of ``applications``)."""
    app = describe(entry)
    config: dict[str, Any] = {"name": app_name(entry.name), "route_prefix": route_prefix(entry)}
    if app.llm is not None:
        config["import_path"] = LLM_IMPORT_PATH
        config["args"] = {"llm_configs": [llm_config(entry, app.llm)]}
    else:
        config["import_path"] = app.import_path
        if app.args:
            config["args"] = app.args
    if app.runtime_env:
        config["runtime_env"] = app.runtime_env
    if app.deployments:
        config["deployments"] = app.deployments
    return config


def llm_config(entry: ModelEntry, llm: LlmApp) -> dict[str, Any]:
    """One ``LLMConfig`` for ``build_openai_app``: served under the entry's upstream id."""
    deployment = dict(llm.deployment_config)
    if llm.autoscaling_config is not None:
        deployment["autoscaling_config"] = llm.autoscaling_config
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": entry.upstream_id, "model_source": llm.model_source},
        "engine_kwargs": llm.engine_kwargs,
    }
    if llm.accelerator_type:
        config["accelerator_type"] = llm.accelerator_type
    if deployment:
        config["deployment_config"] = deployment
    extra = {k: v for k, v in (llm.model_extra or {}).items() if k not in _LLM_MAPPED}
    config.update(extra)
    return config


def status_error(status: dict[str, Any]) -> str | None:
    """What makes a ``GET /api/serve/applications/`` answer unusable (None: nothing). Every
    write carries the other applications over from it, so an answer in another shape (a
    dashboard of another version, or one that lies) must stop us, not half-work."""
    apps = status.get("applications")
    if apps is not None and not isinstance(apps, dict):
        return "'applications' is not an object"
    for name, details in (apps or {}).items():
        if not isinstance(details, dict):
            return f"application {name!r} is not an object"
        config = details.get("deployed_app_config")
        if config is not None and not (
            isinstance(config, dict) and config.get("name", name) == name
        ):
            return f"application {name!r} has a deployed config that is not its own"
    http = status.get("http_options")
    if http is not None and not isinstance(http, dict):
        return "'http_options' is not an object"
    return None


def deployed(status: dict[str, Any]) -> dict[str, Any]:
    """Every application's config as deployed ({name: config}), from a
    ``GET /api/serve/applications/`` answer: what a write must carry over, and what a
    concurrent writer could have changed."""
    apps = status.get("applications") or {}
    return {name: details.get("deployed_app_config") for name, details in apps.items()}


def deploy_config(
    status: dict[str, Any], name: str, app: dict[str, Any] | None, serve_host_port: tuple[str, int]
) -> dict[str, Any]:
    """The whole declarative config to PUT: the cluster's as read in ``status``, with our
    application ``name`` replaced by ``app`` (None: removed). Applications without a deployed
    config (deployed from Python with ``serve.run``) cannot be carried over: Ray refuses a
    declarative write while they exist, and its error is passed on."""
    if not name.startswith(OWNED_PREFIX):
        raise ValueError(f"{name!r} is not an application this proxy owns")
    applications = [
        config for other, config in deployed(status).items() if other != name and config is not None
    ]
    if app is not None:
        applications.append(app)
    applications.sort(key=lambda config: str(config.get("name")))
    body: dict[str, Any] = {"applications": applications}
    http = status.get("http_options")
    if http:
        body["http_options"] = {k: v for k, v in http.items() if v is not None}
    else:  # Serve is not running: this write starts it, listening where we will send requests
        host, port = serve_host_port
        body["http_options"] = {"host": host, "port": port}
    if status.get("proxy_location"):
        body["proxy_location"] = status["proxy_location"]
    if status.get("target_capacity") is not None:
        body["target_capacity"] = status["target_capacity"]
    return body


def ray_message(details: dict[str, Any]) -> str:
    """Ray's message for an application, reduced to what a person reads first: the last line of
    a traceback (the exception), else the whole message."""
    message = str(details.get("message") or "").strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else str(details.get("status") or "no message")
