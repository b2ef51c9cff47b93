"""The suite's leftover-process check sees every process the tests start, whatever it is called
(console scripts included), and never another session's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.processes import SESSION_VAR, is_ours, our_processes
from testkit.servers import free_port, wait_for_port

pytestmark = pytest.mark.subprocess


@pytest.mark.parametrize(
    "cmdline",
    [
        "/repo/.venv/bin/python /repo/.venv/bin/imageworks-chat-proxy --port 8100",
        "/repo/.venv/bin/python /repo/.venv/bin/imageworks-vllm",
        "/repo/.venv/bin/python /repo/.venv/bin/uvicorn imageworks.chat_proxy.app:app --port 9000",
        "/repo/.venv/bin/python -m streamlit run /repo/src/imageworks/gui/streamlit_app.py",
        "/repo/.venv/bin/python /repo/.venv/bin/imageworks-gui --port 8501",
    ],
)
def test_without_a_session_tag_console_scripts_are_recognised_by_name(cmdline: str) -> None:
    assert is_ours(cmdline, b"PATH=/usr/bin\0HOME=/root\0", None)
    assert not is_ours("/usr/bin/sleep 100", b"PATH=/usr/bin\0", None)


def test_in_a_tagged_session_the_tag_decides() -> None:
    mine, theirs = f"{SESSION_VAR}=me".encode(), f"{SESSION_VAR}=other".encode()
    assert is_ours("/usr/bin/sleep 100", b"A=1\0" + mine + b"\0", "me")  # any name
    assert not is_ours("imageworks-chat-proxy", b"A=1\0" + theirs + b"\0", "me")
    assert not is_ours("imageworks-chat-proxy", b"A=1\0", "me")  # another checkout's


def test_a_console_script_left_running_is_seen(tmp_path: Path) -> None:
    port = free_port()
    script = Path(sys.executable).parent / "imageworks-vllm"
    env = {
        **os.environ,
        "IMAGEWORKS_REGISTRY_DIR": str(tmp_path),
        "IMAGEWORKS_STAGING_DIR": str(tmp_path / "_staging"),
        "IMAGEWORKS_VLLM_PORT": str(port),
    }
    process = subprocess.Popen(
        [str(script)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, timeout=30)
        assert process.pid in [pid for pid, _ in our_processes()]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.pid not in [pid for pid, _ in our_processes()]
