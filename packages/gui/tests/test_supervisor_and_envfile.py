from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from imageworks.gui.envfile import read_variable, set_variable
from imageworks.gui.supervisor import ProxySupervisor
from testkit.servers import free_port, wait_for_port

DETACHED_CHILD = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in.*Popen.__del__:pytest.PytestUnraisableExceptionWarning"
)

REPO = Path(__file__).resolve().parents[3]


def test_set_variable_keeps_the_rest_of_the_file(tmp_path: Path) -> None:
    env = tmp_path / ".env.local"
    env.write_text("# my settings\nCHAT_PROXY_PORT=9000\nexport CHAT_PROXY_AUTOSTART_ENABLED=1\n")
    set_variable(env, "CHAT_PROXY_AUTOSTART_ENABLED", "0")
    assert (
        env.read_text() == "# my settings\nCHAT_PROXY_PORT=9000\nCHAT_PROXY_AUTOSTART_ENABLED=0\n"
    )
    set_variable(env, "CHAT_PROXY_LOG_BACKUPS", "3")
    assert env.read_text().endswith("CHAT_PROXY_LOG_BACKUPS=3\n")
    assert read_variable(env, "CHAT_PROXY_AUTOSTART_ENABLED") == "0"
    assert read_variable(tmp_path / "missing", "X") is None


# The supervisor detaches the proxy on purpose (it outlives the console), so its Popen is
# dropped while the child runs; that one warning is expected here and nowhere else.
@DETACHED_CHILD
@pytest.mark.subprocess
def test_start_status_and_stop_a_real_proxy(tmp_path: Path) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    port = free_port()
    supervisor = ProxySupervisor(f"http://127.0.0.1:{port}", tmp_path)
    assert supervisor.status().running is False
    started = supervisor.start()
    wait_for_port(port, timeout=30)
    assert httpx.get(f"http://127.0.0.1:{port}/v1/healthz").json()["status"] == "ok"
    assert supervisor.start().pid == started.pid  # already running: not started twice
    assert (tmp_path / "_staging" / "chat_proxy.pid").read_text() == str(started.pid)
    assert supervisor.stop() == f"stopped (pid {started.pid})"
    assert supervisor.status().running is False
    assert "listening on" in (tmp_path / "logs" / "chat_proxy.out").read_text()
    assert supervisor.stop() == "the proxy was not running (started from here)"


def test_a_stale_pidfile_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "_staging").mkdir()
    (tmp_path / "_staging" / "chat_proxy.pid").write_text("1")  # pid 1 is not our proxy
    assert ProxySupervisor("http://127.0.0.1:8100", tmp_path).status().running is False
    assert not (tmp_path / "_staging" / "chat_proxy.pid").exists()
