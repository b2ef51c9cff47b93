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
    assert set(SERVICES) == {"chat-proxy", "vllm-executor", "ollama", "console"}
    names = {s: SERVICES[s]["container_name"] for s in SERVICES}
    assert names == {
        "chat-proxy": "imageworks-chat-proxy",
        "vllm-executor": "imageworks-vllm",
        "ollama": "imageworks-ollama",
        "console": "imageworks-console",
    }
    assert "tf-iqa" not in " ".join(SERVICES)  # an external service, only mentioned


def test_ports() -> None:
    assert SERVICES["chat-proxy"]["ports"] == ["8100:8100"]
    assert SERVICES["vllm-executor"]["ports"] == ["127.0.0.1:8600:8600"]
    assert SERVICES["vllm-executor"]["expose"] == ["24001"]  # not published on the host
    assert SERVICES["ollama"]["ports"] == ["11434:11434"]


def test_the_proxy_talks_to_the_other_containers_by_name() -> None:
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


def test_gpu_reservations() -> None:
    def capabilities(service: str) -> list[str]:
        devices = SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]
        return devices[0]["capabilities"]

    assert capabilities("vllm-executor") == ["gpu"] and capabilities("ollama") == ["gpu"]
    assert capabilities("chat-proxy") == ["utility"]  # NVML only: no CUDA in the proxy
    assert "deploy" not in SERVICES["console"]


def test_shared_mounts_exist_or_are_created_by_the_proxy() -> None:
    for service in ("chat-proxy", "vllm-executor"):
        mounts = [v.split(":")[0] for v in SERVICES[service]["volumes"] if v.startswith("..")]
        assert "../configs" in mounts and "../_staging" in mounts
        assert (COMPOSE_DIR / "../configs").resolve().is_dir()
    assert "../logs:/app/logs" in SERVICES["chat-proxy"]["volumes"]


@pytest.mark.parametrize("service", ["chat-proxy", "vllm-executor", "console"])
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


def test_the_proxy_image_has_no_cuda_base() -> None:
    first = (COMPOSE_DIR / "Dockerfile.proxy").read_text().split("FROM ", 1)[1].split()[0]
    assert first.startswith("python:") and "cuda" not in first
    assert (COMPOSE_DIR / "Dockerfile.vllm").read_text().count("FROM vllm/vllm-openai:") == 1
