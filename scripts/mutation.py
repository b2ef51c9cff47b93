"""Mutation testing (mutmut) of one module against a narrow test selection; not part of CI.

mutmut 3 expects code under ``./`` or ``src/`` and imports it by the path it mutated, while
this workspace keeps three packages under ``packages/*/src``. So each run works in a scratch
copy, ``build/mutation/<module>/``: the three ``src/imageworks`` trees merged into one ``src/``,
the test files of the selection at their usual paths, ``conftest.py``, ``testkit/`` and
``configs/``, and a ``pyproject.toml`` with the pytest options and the mutmut settings. The
repository itself is never touched.

    uv run python scripts/mutation.py auth            # one module (see MODULES)
    uv run python scripts/mutation.py --list
    nice -n 19 uv run python scripts/mutation.py payloads --max-children 1

It prints the score (killed / (killed + survived + timeouts + suspicious)) and writes the
surviving mutants' diffs to ``build/mutation/<module>/survivors.txt``; ``docs/testing.md``
records the scores and which survivors are equivalent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROXY = "src/imageworks/chat_proxy"
PT = "packages/proxy/tests"

# module -> (file to mutate, under the merged src/; the tests that judge it)
MODULES: dict[str, tuple[str, list[str]]] = {
    "auth": (f"{PROXY}/auth.py", [f"{PT}/test_auth.py"]),
    "leases": (
        f"{PROXY}/arbiter/leases.py",
        [f"{PT}/test_leases.py", f"{PT}/test_vram_arbiter.py"],
    ),
    "policy": (f"{PROXY}/arbiter/policy.py", [f"{PT}/test_eviction_policy.py"]),
    "errors": (f"{PROXY}/errors.py", [f"{PT}/test_errors.py"]),
    "payloads": (f"{PROXY}/request/payloads.py", [f"{PT}/test_payloads.py"]),
    "requestlog": (f"{PROXY}/observe/requestlog.py", [f"{PT}/test_requestlog.py"]),
    "process": (f"{PROXY}/supervision/process.py", [f"{PT}/test_process.py"]),
    "placement": (f"{PROXY}/arbiter/placement.py", [f"{PT}/test_placement.py"]),
    "ledger": (
        f"{PROXY}/arbiter/ledger.py",
        [f"{PT}/test_ledger.py", f"{PT}/test_vram_arbiter.py"],  # the arbiter's pure parts
    ),
    "simgpu": (f"{PROXY}/arbiter/simgpu.py", [f"{PT}/test_simgpu.py"]),
    "images": (f"{PROXY}/vision/images.py", [f"{PT}/test_images.py", f"{PT}/test_vision.py"]),
    "toolcalls": (
        f"{PROXY}/request/toolcalls.py",
        [f"{PT}/test_tool_calls.py", f"{PT}/test_images.py"],
    ),
    "lifting": (f"{PROXY}/vision/lifting.py", [f"{PT}/test_images.py"]),
    "history": (f"{PROXY}/vision/history.py", [f"{PT}/test_images.py"]),
    "ray_apps": (f"{PROXY}/engines/backends/ray_apps.py", [f"{PT}/test_ray_apps.py"]),
}

PYPROJECT = """\
[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
addopts = "-p no:cacheprovider --import-mode=importlib"
markers = ["subprocess: runs a real child process", "slow: minutes, not seconds"]
filterwarnings = ["error"]

[tool.mutmut]
source_paths = ["src"]
only_mutate = [{only}]
pytest_add_cli_args_test_selection = [{tests}]
also_copy = ["conftest.py", "testkit", "configs", "packages"]
"""


def prepare(module: str) -> Path:
    source, tests = MODULES[module]
    work = REPO / "build" / "mutation" / module
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for package in ("registry", "proxy", "gui"):
        shutil.copytree(
            REPO / "packages" / package / "src",
            work / "src",
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    shutil.copy(REPO / "conftest.py", work)
    for tree in ("testkit", "configs"):
        shutil.copytree(REPO / tree, work / tree, ignore=shutil.ignore_patterns("__pycache__"))
    for test in tests:
        (work / test).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / test, work / test)
    quoted = ", ".join(json.dumps(t) for t in tests)
    (work / "pyproject.toml").write_text(PYPROJECT.format(only=json.dumps(source), tests=quoted))
    return work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("module", nargs="?", choices=sorted(MODULES))
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--max-children", type=int, default=1)
    args = parser.parse_args()
    if args.list or not args.module:
        for name, (source, tests) in MODULES.items():
            print(f"{name:12} {source}  <- {' '.join(tests)}")
        return 0
    work = prepare(args.module)
    mutmut = Path(sys.executable).parent / "mutmut"
    with (work / "mutmut.log").open("w") as log:  # its progress line is long and redrawn
        subprocess.run(
            [str(mutmut), "run", "--max-children", str(args.max_children)],
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    subprocess.run([str(mutmut), "export-cicd-stats"], cwd=work, check=False)
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    judged = sum(stats.get(k, 0) for k in ("killed", "survived", "timeout", "suspicious"))
    score = 100 * stats.get("killed", 0) / judged if judged else 0.0
    print(json.dumps(stats))
    print(f"{args.module}: {stats.get('killed', 0)}/{judged} killed ({score:.1f}%)")
    results = subprocess.run(
        [str(mutmut), "results"], cwd=work, capture_output=True, text=True, check=False
    ).stdout
    survivors = [
        line.split(":")[0].strip()
        for line in results.splitlines()
        if line.strip().endswith(":") or "survived" in line
    ]
    with (work / "survivors.txt").open("w") as out:
        for name in survivors:
            shown = subprocess.run(
                [str(mutmut), "show", name], cwd=work, capture_output=True, text=True, check=False
            )
            out.write(f"### {name}\n{shown.stdout}\n")
    print(f"{len(survivors)} surviving mutants: {work / 'survivors.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
