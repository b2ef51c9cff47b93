"""Where the console finds the proxy and its working directory (both from the environment)."""

from __future__ import annotations

import os
from pathlib import Path

from imageworks.gui.client import ProxyClient
from imageworks.gui.supervisor import ProxySupervisor


def workdir() -> Path:
    """The project directory: where the proxy is started and ``.env.local`` lives."""
    return Path(os.environ.get("IMAGEWORKS_GUI_WORKDIR") or Path.cwd())


def client() -> ProxyClient:
    return ProxyClient()


def supervisor() -> ProxySupervisor:
    return ProxySupervisor(client().base_url, workdir())


def env_local() -> Path:
    return workdir() / ".env.local"
