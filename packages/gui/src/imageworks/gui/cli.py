"""`imageworks-gui`: start the operator console (Streamlit)."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import click

APP = Path(__file__).resolve().parent / "streamlit_app.py"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--port", default=8501, show_default=True, type=int)
@click.option(
    "--proxy-url",
    envvar="IMAGEWORKS_CHAT_PROXY_URL",
    default="http://127.0.0.1:8100",
    show_default=True,
)
@click.option("--address", default="127.0.0.1", show_default=True)
def main(port: int, proxy_url: str, address: str) -> None:
    """Run the ImageWorks operator console."""
    if not _is_loopback(address) and not os.environ.get("CHAT_PROXY_ADMIN_TOKEN"):
        # The console has no login of its own: on the LAN without a token, anyone who opens it
        # would press its buttons, which the proxy takes from loopback as the operator's.
        raise click.UsageError(
            f"--address {address} (not loopback) requires CHAT_PROXY_ADMIN_TOKEN, set for the "
            "proxy and the console alike; or keep the console on 127.0.0.1"
        )
    os.environ["IMAGEWORKS_CHAT_PROXY_URL"] = proxy_url
    args = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        # An operator tool: no "Deploy" button in the toolbar.
        "--client.toolbarMode",
        "viewer",
    ]
    os.execv(sys.executable, args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    main()
