"""Real child processes for tests: the executor, and finding anything left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from testkit.servers import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
_PREFIX = sys.prefix  # the virtual environment every process the tests start runs from
# Command-line fragments of every process the project starts.
OUR_PROCESSES = (
    "imageworks.chat_proxy.llamacpp.server",
    "imageworks.vllm_executor",
    "testkit.fake_engine",
    "imageworks.chat_proxy.cli",
)

# The executor's launch template in tests: vLLM cannot run here, so it launches llama.cpp
# with the embedded model through exactly the same code path.
LLAMACPP_TEMPLATE = json.dumps(
    [
        "{python}",
        "-m",
        "imageworks.chat_proxy.llamacpp.server",
        "--model",
        "{model_path}",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--alias",
        "{served_model_id}",
        "--ctx-size",
        "2048",
        "--parallel",
        "4",
        "{chat_template_args}",
        "{extra_args}",
    ]
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


def our_processes() -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        # This checkout's interpreter only: other checkouts on the machine run their own tests.
        if state != "Z" and _PREFIX in cmd and any(marker in cmd for marker in OUR_PROCESSES):
            found.append((int(entry.name), cmd.strip()))
    return found


class Executor:
    """``imageworks-vllm`` as a real process."""

    def __init__(
        self, root: Path, template: str = LLAMACPP_TEMPLATE, served_port: int | None = None
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
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imageworks.vllm_executor.cli"],
            cwd=self.root,
            env=self.env,
            stdout=(self.root / "executor.out").open("ab"),
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
