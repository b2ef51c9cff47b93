"""`imageworks-vllm`: the executor's admin API (default 127.0.0.1:8600)."""

from __future__ import annotations

import logging

import click

from imageworks.vllm_executor.config import ExecutorConfig, ExecutorConfigError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", help="Bind address (IMAGEWORKS_VLLM_HOST, default 127.0.0.1).")
@click.option("--port", type=int, help="Port (IMAGEWORKS_VLLM_PORT, default 8600).")
def main(host: str | None, port: int | None) -> None:
    """Run the vLLM executor: one vLLM server at a time, launched from the registry."""
    from imageworks.chat_proxy.server.serving import serve_hypercorn
    from imageworks.vllm_executor.app import create_app

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, object] = {k: v for k, v in {"host": host, "port": port}.items() if v}
    try:
        config = ExecutorConfig.load(None, **overrides)
    except ExecutorConfigError as exc:
        raise click.ClickException(str(exc)) from None
    serve_hypercorn(create_app(config), config.host, config.port)


if __name__ == "__main__":
    main()
