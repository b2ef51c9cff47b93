"""The vLLM launch command: the default template and its one vLLM-specific value.

The executor never runs an argv it receives: the template comes from its own configuration
(``IMAGEWORKS_VLLM_LAUNCH_TEMPLATE``, a JSON array) and the values from the registry it reads
itself (``chat_proxy.launch`` does the filling, for llama.cpp engines too).
"""

from __future__ import annotations

from collections.abc import Sequence

from imageworks.chat_proxy.auth import is_loopback
from imageworks.chat_proxy.supervision import launch
from imageworks.chat_proxy.supervision.launch import LaunchError, dedupe_extra_args
from imageworks.model_loader.schema import ModelEntry

DEFAULT_TEMPLATE: tuple[str, ...] = (
    "{python}",
    "-m",
    "vllm.entrypoints.openai.api_server",
    "--model",
    "{model_path}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--served-model-name",
    "{served_model_id}",
    "--gpu-memory-utilization",
    "{gpu_memory_utilization}",
    "{chat_template_args}",
    "{tool_args}",
    "{sleep_args}",
    "{extra_args}",
)
FIELDS = launch.COMMON_FIELDS | {"gpu_memory_utilization"}
SLEEP_FLAG = "--enable-sleep-mode"
# vLLM serves /sleep, /wake_up and /is_sleeping only in its dev mode, which also opens other
# unauthenticated control routes: set for sleep-mode children only, bound to loopback only.
DEV_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}

__all__ = [
    "DEFAULT_TEMPLATE",
    "DEV_MODE_ENV",
    "SLEEP_FLAG",
    "LaunchError",
    "build_command",
    "command_for",
    "dedupe_extra_args",
    "sleep_mode_allowed",
]


def parse_template(raw: str | None) -> tuple[str, ...]:
    """A template from configuration; unknown placeholders are an error at start-up."""
    return launch.parse_template(
        raw, DEFAULT_TEMPLATE, variable="IMAGEWORKS_VLLM_LAUNCH_TEMPLATE", fields=FIELDS
    )


def build_command(
    entry: ModelEntry,
    template: Sequence[str],
    *,
    host: str,
    port: int,
    gpu_memory_utilization: float,
    python: str | None = None,
    sleep_mode: bool = False,
) -> list[str]:
    """``sleep_mode``: the executor lets this model sleep (``sleep_mode_allowed``)."""
    more = {"python": python} if python else {}
    return launch.build_command(
        entry,
        template,
        host=host,
        port=port,
        # Only a template that asks for them (a custom one may launch another engine).
        tool_args=tool_args(entry) if "{tool_args}" in template else [],
        sleep_args=[SLEEP_FLAG] if sleep_mode else [],
        gpu_memory_utilization=gpu_memory_utilization,
        **more,
    )


def sleep_mode_allowed(
    entry: ModelEntry, template: Sequence[str], served_host: str
) -> tuple[bool, str | None]:
    """May ``entry`` run with sleep mode here? (allowed, why not). It must ask for it
    (``backend_config.sleep_mode``), the template must carry ``{sleep_args}`` (a custom one
    may launch another engine), and vLLM must bind loopback: its dev-mode routes must never be
    reachable from another host."""
    if not entry.backend_config.sleep_mode:
        return False, None
    if "{sleep_args}" not in template:
        return False, "the launch template has no {sleep_args}"
    if not is_loopback(served_host):
        return False, (
            f"vLLM binds {served_host} (IMAGEWORKS_VLLM_SERVED_HOST), not loopback, and sleep "
            "mode's dev routes must never be reachable from another host"
        )
    return True, None


def command_for(
    entry: ModelEntry,
    template: Sequence[str],
    *,
    host: str,
    port: int,
    gpu_memory_utilization: float,
    python: str | None = None,
    span: int = 1,
    sleep_mode: bool = False,
) -> list[str]:
    """The whole argv the executor runs for ``entry``: the template filled, and the
    ``--tensor-parallel-size`` of a model that spans ``span`` devices (unless set already)."""
    argv = build_command(
        entry,
        template,
        host=host,
        port=port,
        gpu_memory_utilization=gpu_memory_utilization,
        python=python,
        sleep_mode=sleep_mode,
    )
    if span > 1 and not any(a.startswith("--tensor-parallel-size") for a in argv):
        argv += ["--tensor-parallel-size", str(span)]
    return argv


def tool_args(entry: ModelEntry) -> list[str]:
    """vLLM emits OpenAI ``tool_calls`` only with auto tool choice and a parser for the model's
    tool-call format; without a parser it refuses to start, so the entry must name one."""
    if not entry.capabilities.tools:
        return []
    parser = entry.backend_config.tool_parser
    if not parser:
        raise LaunchError(
            f"model {entry.name!r} has capabilities.tools but no backend_config.tool_parser "
            "(vLLM's --tool-call-parser: hermes, llama3_json, mistral, ...)"
        )
    return ["--enable-auto-tool-choice", "--tool-call-parser", parser]
