"""Parse command lines with the real vLLM's own argument parser (run in the real-engines venv).

Reads a JSON list of argv lists (each what the executor would run, interpreter and ``-m
module`` first) on stdin; prints a JSON list with, for each, ``{"ok": true}`` or ``{"ok":
false, "error": "..."}``. Checks exactly what vLLM's server checks before it loads anything:
``make_arg_parser`` + ``validate_parsed_serve_args``, and the tool-call parser's
registration. Needs no GPU and loads no model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys


def check(argv: list[str]) -> dict[str, object]:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if argv[1:2] != ["-m"] or importlib.util.find_spec(argv[2]) is None:
        return {"ok": False, "error": f"vLLM has no module {argv[2:3]}"}
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm"))
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(argv[3:])
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
