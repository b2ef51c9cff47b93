"""Real child processes for tests: the executor, and finding anything left running."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imageworks.chat_proxy.engines.backends.llamacpp import DEFAULT_TEMPLATE
from testkit.servers import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
# Set by the test session in its own environment, so every process it starts carries it (child
# environments are built from os.environ): whatever a process is called (a console script,
# uvicorn, streamlit, a llama.cpp server), the session can find it, and only its own.
SESSION_VAR = "PYTEST_IMAGEWORKS_SESSION"
# Command-line fragments of every program the project starts, for a process not tagged (a
# session that did not tag itself, or a child started with an environment of its own).
OUR_PROCESSES = (
    "imageworks.chat_proxy.llamacpp.server",
    "imageworks.vllm_executor",
    "testkit.fake_engine",
    "imageworks.chat_proxy.cli",
    "imageworks.gui.cli",
    # console scripts and servers started by name (the runbook's commands, the console)
    "imageworks-chat-proxy",
    "imageworks-vllm",
    "imageworks-gui",
    "imageworks.chat_proxy.app:app",
    "imageworks/gui/streamlit_app.py",
)
# The executor's launch template in tests: vLLM cannot run here, so it launches llama.cpp
# with the embedded model through exactly the same code path: the proxy's own llama.cpp
# template, with a small context and four slots, and without ``{tool_args}`` (the tests that
# use it declare no tools).
_ARGS = [a for a in DEFAULT_TEMPLATE if a != "{tool_args}"]
_AT = _ARGS.index("{chat_template_args}")
LLAMACPP_TEMPLATE = json.dumps(
    [*_ARGS[:_AT], "--ctx-size", "2048", "--parallel", "4", *_ARGS[_AT:]]
)
FAKE_ENGINE_TEMPLATE = json.dumps(
    [
        "{python}",
        "-m",
        "testkit.fake_engine",
        "--port",
        "{port}",
        "--host",
        "{host}",
        "{extra_args}",
    ]
)

# A fake vLLM that honours --gpu-memory-utilization on a simulated GPU, exactly as vLLM does,
# and its sleep mode (--enable-sleep-mode with VLLM_SERVER_DEV_MODE=1).
FAKE_VLLM_TEMPLATE = json.dumps(
    [
        "{python}",
        "-m",
        "testkit.fake_engine",
        "--port",
        "{port}",
        "--host",
        "{host}",
        "--gpu-memory-utilization",
        "{gpu_memory_utilization}",
        "{sleep_args}",
        "{extra_args}",
    ]
)


def tag_session() -> str:
    """Mark this process's environment (and so its future children's) as one test session."""
    os.environ[SESSION_VAR] = f"{os.getpid()}-{secrets.token_hex(4)}"
    return os.environ[SESSION_VAR]


def is_ours(cmdline: str, environ: bytes, session: str | None) -> bool:
    """In a tagged session, a process carrying its tag (not another session's, nor one of
    another checkout's, on a shared machine); untagged, any process of one of our programs."""
    if session is not None:
        return f"{SESSION_VAR}={session}".encode() in environ.split(b"\0")
    return any(marker in cmdline for marker in OUR_PROCESSES)


def our_processes() -> list[tuple[int, str]]:
    """Live (not zombie) processes of this test session, as (pid, command line)."""
    session = os.environ.get(SESSION_VAR)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if state != "Z" and cmd and is_ours(cmd, environ, session):
            found.append((int(entry.name), cmd.strip()))
    return found


class Executor:
    """``imageworks-vllm`` as a real process."""

    def __init__(
        self,
        root: Path,
        template: str = LLAMACPP_TEMPLATE,
        served_port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.port = free_port()
        self.served_port = served_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "IMAGEWORKS_REGISTRY_DIR": str(root / "configs"),
            "IMAGEWORKS_STAGING_DIR": str(root / "_staging"),
            "IMAGEWORKS_VLLM_PORT": str(self.port),
            "IMAGEWORKS_VLLM_SERVED_PORT": str(self.served_port),
            "IMAGEWORKS_VLLM_LAUNCH_TEMPLATE": template,
            "IMAGEWORKS_VLLM_START_TIMEOUT_S": "60",
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with (self.root / "executor.out").open("ab") as out:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imageworks.vllm_executor.cli"],
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, timeout=30)

    def kill(self) -> None:
        """A crash: the executor dies at once and its child is left running."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(30)
        return self.process.returncode


def write_registry(root: Path, entries: Sequence[Mapping[str, Any]]) -> Path:
    """``root/configs`` as a proxy or executor started in ``root`` reads it: the shipped
    deployment profiles and a curated registry of ``entries``; returns the directory."""
    configs = root / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "deployment_profiles.json", configs)
    (configs / "model_registry.curated.json").write_text(json.dumps(list(entries)))
    return configs


def proxy_env(**env: str) -> dict[str, str]:
    """The environment of a proxy process: none of this shell's ``CHAT_PROXY_*`` settings, no
    GPU probe unless ``env`` asks for one, this checkout's packages."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHAT_PROXY_")},
        "CHAT_PROXY_GPU_PROBE": "none",
        "PYTHONPATH": str(REPO),
        **env,
    }


def start_proxy(
    root: Path, entries: list[dict[str, object]], *, uvicorn: bool = False, **env: str
) -> tuple[subprocess.Popen[bytes], str]:
    """``imageworks-chat-proxy`` as a real process over a registry of the test's own, in
    ``root`` (its staging dir and log are there); returns the process and its URL.
    ``uvicorn``: started as the runbook's ``uvicorn imageworks.chat_proxy.app:app``."""
    write_registry(root, entries)
    port = free_port()
    command = (
        ["uvicorn", "imageworks.chat_proxy.app:app"] if uvicorn else ["imageworks.chat_proxy.cli"]
    )
    process = subprocess.Popen(
        [sys.executable, "-m", *command, "--port", str(port)],
        cwd=root,
        env=proxy_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # A test that binds elsewhere (its own veth address) is answered there, not on loopback.
    host = env.get("CHAT_PROXY_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    wait_for_port(port, timeout=30, host=host)
    return process, f"http://{host}:{port}"


def start_engine(root: Path, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """A fake engine as a process of its own (``testkit.fake_engine`` flags), e.g. an Ollama
    on the simulated GPU; returns the process and its root URL."""
    port = free_port()
    with (root / f"engine-{port}.out").open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "testkit.fake_engine", "--port", str(port), *args],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port, timeout=30)
    return process, f"http://127.0.0.1:{port}"
