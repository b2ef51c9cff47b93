"""The shape of a package, measured: import circles, climbs, module and function lengths.

    uv run python scripts/layout.py                 # chat_proxy, the report
    uv run python scripts/layout.py --json          # the same figures as JSON
    uv run python scripts/layout.py packages/proxy/src/imageworks/vllm_executor

What is counted (every import: top-level, inside a function and under ``TYPE_CHECKING`` alike,
since each is a dependency a reader has to follow):

- **module**: a ``.py`` file of the package; an import of a package means its ``__init__.py``,
  ``from pkg import name`` means the module ``pkg.name`` when there is one.
- **import circle**: a set of two or more modules that reach each other through imports (a
  strongly connected component of the module graph). Target: none.
- **room**: a direct child of a folder of the package, a module or a sub-folder (so
  ``chat_proxy/`` has the rooms ``app.py``, ``engines/``, ``arbiter/``, ...; ``engines/`` has
  ``slot.py``, ``lifecycle.py``, ``backends/``, ...). An arrow goes from room A to its sibling
  room B when some module inside A imports some module inside B.
- **floors**: in each folder, the order of its rooms (lowest floor first) that leaves the fewest
  import lines pointing from a lower room to a higher one. Rooms that do not import each other
  in a loop always get an order with none.
- **climb**: an arrow that still points up in that order: a room importing from a sibling that
  itself (directly or round a loop of siblings) imports it. Every circle makes climbs, but a
  climb need not be a circle: ``observe/metrics.py`` -> ``arbiter/gpu.py`` while
  ``arbiter/arbiter.py`` -> ``observe/metrics.py`` is a climb between the rooms ``observe/``
  and ``arbiter/`` without any module circle. Target: at most one.
- **module length**: its physical lines. Target: none over 400.
- **function length**: the lines from ``def`` to its last line, less its docstring and, in an
  ``__init__``, less the statements directly in its body that declare the instance's fields
  (``self.name = ...``): a constructor that declares thirty metrics is a table, not logic. A
  nested function counts in its parent too. Target: none over 60.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "packages/proxy/src/imageworks/chat_proxy"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_CLIMBS = 1


@dataclass
class Layout:
    package: str
    modules: dict[str, int] = field(default_factory=dict)  # module -> lines
    imports: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> {module: n}
    circles: list[list[str]] = field(default_factory=list)
    climbs: list[tuple[str, str, int]] = field(default_factory=list)  # (room, room, lines)
    functions: dict[str, int] = field(default_factory=dict)  # "module:qualname" -> lines

    def long_modules(self, limit: int = MAX_MODULE_LINES) -> dict[str, int]:
        return {m: n for m, n in self.modules.items() if n > limit}

    def long_functions(self, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
        return {f: n for f, n in self.functions.items() if n > limit}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _dotted_root(root: Path) -> str:
    """``imageworks.chat_proxy`` for packages/proxy/src/imageworks/chat_proxy."""
    parts = [root.name]
    here = root.parent
    while (here / "__init__.py").exists() or here.name == "imageworks":
        parts.insert(0, here.name)
        here = here.parent
    return ".".join(parts)


def _imported(tree: ast.AST, own: str, is_package: bool) -> list[str]:
    """Absolute dotted names imported by a module (``own``), including ``pkg.name`` guesses."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def _function_lengths(tree: ast.Module, module: str) -> dict[str, int]:
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                lengths[f"{module}:{name}"] = _length(child)
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return lengths


def _length(func: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    total = (func.end_lineno or func.lineno) - func.lineno + 1
    body = func.body
    first = body[0] if body else None
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if first is not None and docstring and isinstance(first.value.value, str):  # type: ignore[attr-defined]
        total -= (first.end_lineno or first.lineno) - first.lineno + 1
    if func.name == "__init__":
        for stmt in body:
            targets = (
                stmt.targets
                if isinstance(stmt, ast.Assign)
                else [stmt.target]
                if isinstance(stmt, ast.AnnAssign)
                else []
            )
            if targets and all(
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
                for t in targets
            ):
                total -= (stmt.end_lineno or stmt.lineno) - stmt.lineno + 1
    return total


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), the ones with two or more members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = itertools.count()

    def strong(v: str) -> None:
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def _room_of(module: str, folder: str) -> str | None:
    """The room of ``folder`` (a dotted folder, "" for the package) holding ``module``."""
    prefix = f"{folder}." if folder else ""
    if not module.startswith(prefix) or module == folder:
        return None
    return module[len(prefix) :].split(".")[0]


def _climbs(folder: str, imports: dict[str, dict[str, int]]) -> list[tuple[str, str, int]]:
    weights: dict[tuple[str, str], int] = defaultdict(int)
    for source, targets in imports.items():
        a = _room_of(source, folder)
        for target, n in targets.items():
            b = _room_of(target, folder)
            if a is not None and b is not None and a != b:
                weights[a, b] += n
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in weights:
        graph[a].add(b)
    climbs: list[tuple[str, str, int]] = []
    for loop in _components(graph):
        order = _best_order(loop, weights)
        floor = {room: i for i, room in enumerate(order)}  # 0: the ground floor
        for a, b in itertools.permutations(loop, 2):
            if (a, b) in weights and floor[b] > floor[a]:
                climbs.append((_join(folder, a), _join(folder, b), weights[a, b]))
    return climbs


def _best_order(rooms: list[str], weights: dict[tuple[str, str], int]) -> list[str]:
    """The floor order (ground first) with the fewest upward import lines; exact for small
    loops, greedy for large ones."""

    def cost(order: tuple[str, ...]) -> int:
        return sum(weights.get((a, b), 0) for i, a in enumerate(order) for b in order[i + 1 :])

    if len(rooms) <= 7:
        return list(min(itertools.permutations(sorted(rooms)), key=cost))
    order: list[str] = []
    left = set(rooms)
    while left:  # the room that imports least from the rest goes lowest
        best = min(sorted(left), key=lambda r: sum(weights.get((r, o), 0) for o in left))
        order.append(best)
        left.discard(best)
    return order


def _join(folder: str, room: str) -> str:
    return f"{folder}.{room}" if folder else room


def measure(root: Path = DEFAULT) -> Layout:
    root = root.resolve()
    dotted = _dotted_root(root)
    layout = Layout(dotted)
    trees: dict[str, tuple[ast.Module, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        module = _module_name(root, path)
        text = path.read_text()
        layout.modules[module or "__init__"] = len(text.splitlines())
        tree = ast.parse(text, str(path))
        trees[module] = (tree, path.name == "__init__.py")
        layout.functions.update(_function_lengths(tree, module or "__init__"))
    known = set(trees)
    for module, (tree, is_package) in trees.items():
        own = f"{dotted}.{module}" if module else dotted
        counts: dict[str, int] = defaultdict(int)
        for name in _imported(tree, own, is_package):
            if name != dotted and not name.startswith(f"{dotted}."):
                continue
            target = name.removeprefix(dotted).removeprefix(".")
            if target in known and target != module:
                counts[target] += 1
        layout.imports[module] = dict(counts)
    # ``from pkg import a`` also names ``pkg``: drop the package when a submodule was meant.
    for module, targets in layout.imports.items():
        for target in list(targets):
            if any(t.startswith(f"{target}.") for t in targets) and target != "":
                names = _from_names(trees[module][0], dotted, target)
                if names and all(f"{target}.{n}" in known for n in names):
                    del targets[target]
    graph = {m: set(t) for m, t in layout.imports.items()}
    layout.circles = _components(graph)
    folders = {""} | {m for m, (_, pkg) in trees.items() if pkg}
    for folder in sorted(folders):
        layout.climbs += _climbs(folder, layout.imports)
    return layout


def _from_names(tree: ast.Module, dotted: str, target: str) -> list[str]:
    full = f"{dotted}.{target}"
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == full:
            names += [a.name for a in node.names]
    return names


def report(layout: Layout, top: int = 10) -> str:
    lines = [f"package {layout.package}: {len(layout.modules)} modules"]
    lines.append(f"import circles: {len(layout.circles)}")
    lines += [f"  {' <-> '.join(c)}" for c in layout.circles]
    lines.append(f"climbs: {len(layout.climbs)}")
    lines += [f"  {a} -> {b} ({n} import lines)" for a, b, n in layout.climbs]
    longest = sorted(layout.modules.items(), key=lambda kv: -kv[1])
    lines.append(f"modules over {MAX_MODULE_LINES} lines: {len(layout.long_modules())}")
    lines += [f"  {n:5d}  {m}" for m, n in longest[:top]]
    funcs = sorted(layout.functions.items(), key=lambda kv: -kv[1])
    lines.append(f"functions over {MAX_FUNCTION_LINES} lines: {len(layout.long_functions())}")
    lines += [f"  {n:5d}  {f}" for f, n in funcs[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--top", type=int, default=10, help="how many longest to list")
    args = parser.parse_args(argv)
    layout = measure(args.root)
    print(json.dumps(asdict(layout), indent=1) if args.json else report(layout, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
