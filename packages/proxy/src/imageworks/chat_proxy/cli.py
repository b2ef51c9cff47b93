"""`imageworks-chat-proxy`: start the proxy under uvicorn (httptools and uvloop) by default, or
hypercorn. uvicorn is the default because it measured faster on every figure of the benchmark:
even a bare pass-through under hypercorn adds more to the time to first token than the 1 ms
budget allows (docs/performance.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from imageworks.chat_proxy.app import create_app
from imageworks.chat_proxy.arbiter.gpu import nvml_available
from imageworks.chat_proxy.arbiter.simgpu import SimGpu, SimGpuError
from imageworks.chat_proxy.config import ConfigError, ProxyConfig
from imageworks.chat_proxy.server.heap import give_big_blocks_back
from imageworks.chat_proxy.server.serving import serve_hypercorn, serve_uvicorn
from imageworks.model_loader.errors import RegistryError
from imageworks.model_loader.profiles import PROFILES_FILE, ProfileManager
from imageworks.model_loader.registry import build_registry

log = logging.getLogger(__name__)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", help="Bind address (CHAT_PROXY_HOST, default 127.0.0.1).")
@click.option("--port", type=int, help="Port (CHAT_PROXY_PORT, default 8100).")
@click.option(
    "--server",
    type=click.Choice(["uvicorn", "hypercorn"]),
    help="ASGI server (CHAT_PROXY_SERVER, default uvicorn).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def main(host: str | None, port: int | None, server: str | None, log_level: str) -> None:
    """Run the ImageWorks chat proxy. Configuration comes from CHAT_PROXY_* variables,
    .env.local and .env (see docs/configuration.md)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, Any] = {
        k: v for k, v in {"host": host, "port": port, "server": server}.items() if v
    }
    try:
        config = ProxyConfig.load(**overrides)
        # Fail before binding the port, with the registry's own one-line message.
        build_registry(config.registry_dir)
        ProfileManager(config.registry_dir / PROFILES_FILE, config.staging_dir)
        if config.gpu_probe == "nvml" and not nvml_available():
            raise ConfigError(
                "CHAT_PROXY_GPU_PROBE: nvml was asked for, but NVML is not usable "
                "here (no NVIDIA driver or GPU); use auto or none"
            )
        if config.gpu_probe == "sim":
            check_sim_gpu(config.gpu_sim)
    except (ConfigError, RegistryError) as exc:
        raise click.ClickException(str(exc)) from None
    give_big_blocks_back()
    app = create_app(config, freeze_heap=True)
    click.echo(
        f"imageworks-chat-proxy listening on http://{config.host}:{config.port} "
        f"({config.server}); Ctrl+C to stop",
        err=True,
    )
    serve = serve_uvicorn if config.server == "uvicorn" else serve_hypercorn
    serve(
        app,
        config.host,
        config.port,
        keep_alive_s=config.keep_alive_s,
        header_timeout_s=config.header_timeout_s,
        max_header_bytes=config.max_header_bytes,
    )


def check_sim_gpu(path: Path | None) -> None:
    """The simulated GPU's file, read once before binding: a broken one is a one-line error."""
    if path is None:
        raise ConfigError("CHAT_PROXY_GPU_PROBE=sim needs CHAT_PROXY_GPU_SIM (a file)")
    try:
        SimGpu(path).totals()
    except SimGpuError as exc:
        raise ConfigError(f"CHAT_PROXY_GPU_SIM: {exc}") from None


if __name__ == "__main__":
    main()
