"""The compose stack and Dockerfiles, checked statically (no Docker engine runs here): the
services, ports, healthchecks and environment the runbook relies on; every file they refer to
exists; every COPY source exists; every container command is a console script of ours."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "docker-compose.chat-proxy.yml").read_text())
SERVICES = COMPOSE["services"]


def our_console_scripts() -> set[str]:
    scripts: set[str] = set()
    for package in ("registry", "proxy", "gui"):
        data = tomllib.loads((REPO / "packages" / package / "pyproject.toml").read_text())
        scripts |= set(data["project"].get("scripts", {}))
    return scripts


def test_the_services_the_runbook_names() -> None:
    assert set(SERVICES) == {"chat-proxy", "chat-proxy-cpu", "vllm-executor", "ollama", "console"}
    names = {s: SERVICES[s]["container_name"] for s in SERVICES}
    assert names == {
        "chat-proxy": "imageworks-chat-proxy",
        "chat-proxy-cpu": "imageworks-chat-proxy",  # one proxy container, whichever profile
        "vllm-executor": "imageworks-vllm",
        "ollama": "imageworks-ollama",
        "console": "imageworks-console",
    }
    assert "tf-iqa" not in " ".join(SERVICES)  # an external service, only mentioned


def test_profiles() -> None:
    profiles = {s: SERVICES[s]["profiles"] for s in SERVICES}
    assert profiles == {
        "chat-proxy": ["gpu"],
        "chat-proxy-cpu": ["cpu"],
        "vllm-executor": ["gpu"],
        "ollama": ["gpu"],
        "console": ["gpu", "cpu"],
    }
    # the console waits for whichever proxy its profile runs
    depends = SERVICES["console"]["depends_on"]
    assert {s: (d["condition"], d["required"]) for s, d in depends.items()} == {
        "chat-proxy": ("service_healthy", False),
        "chat-proxy-cpu": ("service_healthy", False),
    }


def test_ports_are_loopback_unless_opened() -> None:
    lan = "${IMAGEWORKS_PUBLISH_HOST:-127.0.0.1}"
    assert SERVICES["chat-proxy"]["ports"] == [f"{lan}:8100:8100"]
    assert SERVICES["chat-proxy-cpu"]["ports"] == [f"{lan}:8100:8100"]
    assert SERVICES["vllm-executor"]["ports"] == ["127.0.0.1:8600:8600"]
    assert SERVICES["vllm-executor"]["expose"] == ["24001"]  # not published on the host
    assert SERVICES["ollama"]["ports"] == [f"{lan}:11434:11434"]
    assert SERVICES["console"]["ports"] == ["127.0.0.1:8501:8501"]


def test_the_proxy_talks_to_the_other_containers_by_name() -> None:
    assert SERVICES["chat-proxy-cpu"]["environment"] == SERVICES["chat-proxy"]["environment"]
    env = SERVICES["chat-proxy"]["environment"]
    assert env["CHAT_PROXY_VLLM_REMOTE_URL"] == "http://imageworks-vllm:8600"
    assert env["CHAT_PROXY_OLLAMA_BASE_URL"] == "http://imageworks-ollama:11434"
    assert env["CHAT_PROXY_HOST"] == "0.0.0.0" and "CHAT_PROXY_ADMIN_TOKEN" in env
    executor = SERVICES["vllm-executor"]["environment"]
    assert executor["IMAGEWORKS_VLLM_SERVED_PORT"] == "24001"
    assert executor["IMAGEWORKS_VLLM_PUBLIC_HOST"] == "imageworks-vllm"
    assert (
        SERVICES["console"]["environment"]["IMAGEWORKS_CHAT_PROXY_URL"]
        == "http://imageworks-chat-proxy:8100"
    )


def test_healthchecks_probe_the_documented_endpoints() -> None:
    assert "/v1/healthz" in " ".join(SERVICES["chat-proxy"]["healthcheck"]["test"])
    assert "8600/health" in " ".join(SERVICES["vllm-executor"]["healthcheck"]["test"])
    depends = SERVICES["chat-proxy"]["depends_on"]
    assert depends["vllm-executor"]["condition"] == "service_healthy"
    assert SERVICES["chat-proxy-cpu"]["healthcheck"] == SERVICES["chat-proxy"]["healthcheck"]


def test_gpu_reservations() -> None:
    def capabilities(service: str) -> list[str]:
        devices = SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]
        return devices[0]["capabilities"]

    assert capabilities("vllm-executor") == ["gpu"] and capabilities("ollama") == ["gpu"]
    assert capabilities("chat-proxy") == ["utility"]  # NVML only: no CUDA in the proxy
    assert "deploy" not in SERVICES["console"] and "deploy" not in SERVICES["chat-proxy-cpu"]
    assert "depends_on" not in SERVICES["chat-proxy-cpu"]  # needs neither vLLM nor Ollama


def test_shared_mounts_exist_or_are_created_by_the_proxy() -> None:
    for service in ("chat-proxy", "chat-proxy-cpu", "vllm-executor"):
        mounts = [v.split(":")[0] for v in SERVICES[service]["volumes"] if v.startswith("..")]
        assert "../configs" in mounts and "../_staging" in mounts
        assert (COMPOSE_DIR / "../configs").resolve().is_dir()
    assert "../logs:/app/logs" in SERVICES["chat-proxy"]["volumes"]
    assert SERVICES["chat-proxy-cpu"]["volumes"] == SERVICES["chat-proxy"]["volumes"]


@pytest.mark.parametrize("service", ["chat-proxy", "chat-proxy-cpu", "vllm-executor", "console"])
def test_each_dockerfile_copies_what_exists_and_runs_our_command(service: str) -> None:
    build = SERVICES[service]["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    dockerfile = context / build["dockerfile"]
    assert dockerfile.is_file()
    text = dockerfile.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            *sources, _ = shlex.split(line)[1:]
            for source in sources:
                assert (context / source).exists(), f"{dockerfile.name}: COPY {source} missing"
    command = re.search(r'^CMD \["([^"]+)"', text, re.MULTILINE)
    assert command and command.group(1) in our_console_scripts()


def base_image(dockerfile: str, arg: str) -> str:
    """The default of the ARG the Dockerfile's one FROM names (a test or an air-gapped site
    passes its own base)."""
    text = (COMPOSE_DIR / dockerfile).read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("FROM ")]
    assert line == f"FROM ${{{arg}}}"
    (default,) = [x.split("=", 1)[1] for x in text.splitlines() if x.startswith(f"ARG {arg}=")]
    return default


def test_the_proxy_image_has_no_cuda_base() -> None:
    assert base_image("Dockerfile.proxy", "PYTHON_IMAGE") == "python:3.11-slim"
    assert base_image("Dockerfile.gui", "PYTHON_IMAGE") == "python:3.11-slim"
    # vLLM of the release the executor's command lines are checked against
    assert base_image("Dockerfile.vllm", "VLLM_IMAGE") == "vllm/vllm-openai:v0.32.0"
    for service in ("chat-proxy", "chat-proxy-cpu", "console"):
        args = SERVICES[service]["build"]["args"]
        assert args == {"PYTHON_IMAGE": "${IMAGEWORKS_PYTHON_IMAGE:-python:3.11-slim}"}


def test_the_proxy_image_has_the_openmp_runtime() -> None:
    # xllamacpp links libgomp.so.1; without it the embedded model's first chat is a 502.
    assert "libgomp1" in (COMPOSE_DIR / "Dockerfile.proxy").read_text()
