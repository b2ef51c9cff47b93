"""The things measured, each a process on 127.0.0.1: the mock itself (direct), our proxy
(hypercorn or uvicorn), and LiteLLM's proxy (pinned version, in its own venv)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from testkit.servers import free_port

REPO = Path(__file__).resolve().parents[1]
LITELLM_VERSION = "1.93.0"  # the version the published independent comparisons used
MODELS = ("m0", "m60", "s20", "s20-first")


def pinned(core: int | None, argv: list[str]) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(core), *argv]


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (LiteLLM forks workers)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found += [int(entry.name), *_children(int(entry.name))]
    return found


class Arm:
    name = ""
    process: subprocess.Popen[bytes] | None = None
    url = ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def rss(self) -> float | None:
        return rss_mb(self.process.pid) if self.process is not None else None


class Mock(Arm):
    name = "direct"

    def __init__(self, core: int | None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            pinned(core, [sys.executable, "-m", "bench.mock_backend", "--port", str(port)]),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(self.url + "/v1/models")

    def rss(self) -> float | None:
        return None  # the mock is not under test


class OurProxy(Arm):
    """The proxy's own command line; ``loop="asyncio"`` runs it with uvloop hidden, so that
    hypercorn's plain asyncio worker can be measured next to its uvloop one."""

    def __init__(
        self,
        mock: Mock,
        workdir: Path,
        core: int | None,
        server: str,
        loop: str = "uvloop",
        *,
        name: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.name = name or f"proxy-{server}" + ("" if loop == "uvloop" else f"-{loop}")
        root = workdir / self.name
        (root / "configs").mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "configs" / "deployment_profiles.json", root / "configs")
        entries = [
            {"name": m, "backend": "openai", "backend_config": {"base_url": mock.url + "/v1"}}
            for m in MODELS
        ]
        (root / "configs" / "model_registry.curated.json").write_text(json.dumps(entries))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")}
        env.update(CHAT_PROXY_GPU_PROBE="none", **(settings or {}))
        self.process = subprocess.Popen(
            pinned(
                core,
                [
                    sys.executable,
                    *(
                        ["-m", "imageworks.chat_proxy.cli"]
                        if loop == "uvloop"
                        else [str(REPO / "bench" / "without_uvloop.py")]
                    ),
                    "--port",
                    str(port),
                    "--server",
                    server,
                    "--log-level",
                    "warning",
                ],
            ),
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(self.url + "/v1/healthz")


class BarePassThrough(Arm):
    """Starlette + aiohttp with no features (``bench.bare_passthrough``)."""

    name = "starlette-aiohttp"

    def __init__(self, mock: Mock, core: int | None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            pinned(
                core,
                [
                    sys.executable,
                    "-m",
                    "bench.bare_passthrough",
                    "--port",
                    str(port),
                    "--backend",
                    mock.url,
                ],
            ),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(self.url + "/v1/healthz")


class LiteLLM(Arm):
    name = "litellm"

    def __init__(self, mock: Mock, workdir: Path, core: int | None, venv: Path) -> None:
        binary = ensure_litellm(venv)
        config = workdir / "litellm.yaml"
        lines = ["model_list:"]
        for model in MODELS:
            lines += [
                f"  - model_name: {model}",
                "    litellm_params:",
                f"      model: openai/{model}",
                f"      api_base: {mock.url}/v1",
                "      api_key: unused",
            ]
        lines += ["litellm_settings:", "  drop_params: true", "  telemetry: false"]
        config.write_text("\n".join(lines) + "\n")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
        }
        self.process = subprocess.Popen(
            pinned(
                core,
                [
                    str(binary),
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--num_workers",
                    "1",
                ],
            ),
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(self.url + "/health/liveliness", timeout=180)


def ensure_litellm(venv: Path) -> Path:
    """LiteLLM's proxy in a venv of its own, at the pinned version (installed on first use)."""
    binary = venv / "bin" / "litellm"
    marker = venv / f".installed-{LITELLM_VERSION}"
    if binary.exists() and marker.exists():
        return binary
    uv = shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is needed to install LiteLLM for the comparison arm")
    subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True)
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "-q",
            "-p",
            str(venv / "bin" / "python"),
            f"litellm[proxy]=={LITELLM_VERSION}",
        ],
        check=True,
    )
    marker.touch()
    return binary
