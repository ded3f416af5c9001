"""Package layout, read from the source with `ast` (nothing is imported): the top level holds the
core modules and the capability packages, imports follow the layering, there is no import cycle
(module-level and function-level imports both count) and, outside cli/, no lazy imports of our
own modules. The package __init__ is the public front (README "Python API"): it sits on top of the
capability packages, loads them lazily (PEP 562), and nothing but cli/ imports it. A failure
lists every offending file, line and edge."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = "tokenflow_cli"
PKG_DIR = Path(__file__).resolve().parents[1] / ROOT

# the core modules
CORE = {"config", "checkpoint", "fileio", "device", "distributed", "weights", "hub", "errors", "pretrained", "version"}
PACKAGES = {"tokenizer", "generation", "understanding", "teacher", "train", "eval", "data", "cli"}
DATA_FOLDERS = {"assets", "recipes"}  # no Python inside, allowed at the top level
TOP_FILES = {"__init__.py", "__main__.py"} | {f"{name}.py" for name in CORE}
CAPABILITIES = {"tokenizer", "generation", "understanding", "teacher"}

# layer -> the layers it must never import ("core" may import only core: see _forbidden)
FORBIDDEN = {
    "data": CAPABILITIES | {"cli"},
    "train": CAPABILITIES | {"cli"},
    "eval": CAPABILITIES | {"cli"},
    "tokenizer": {"generation", "understanding", "teacher", "cli"},
    "generation": {"understanding", "teacher", "cli"},
    "understanding": {"generation", "teacher", "cli"},
    "teacher": {"generation", "understanding", "cli"},
    "cli": set(),
    "public": {"cli"},  # the package __init__: the public classes, over every capability
    "__main__": set(),  # the `python -m tokenflow_cli` entry point: it exists to start the CLI
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported tokenflow_cli module, dotted (the most specific existing module)
    path: Path
    line: int
    lazy: bool  # inside a function or method body

    def __str__(self) -> str:
        where = "function-level" if self.lazy else "module-level"
        return f"{self.source} -> {self.target}  ({self.path.relative_to(PKG_DIR.parent)}:{self.line}, {where})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in sorted(PKG_DIR.rglob("*.py")) if "__pycache__" not in p.parts}
    assert found, f"no modules under {PKG_DIR}"
    return found


def layer(module: str) -> str:
    """'public' for the package __init__, 'core' for the core modules, else the first name below
    tokenflow_cli."""
    parts = module.split(".")
    if len(parts) == 1:
        return "public"
    if len(parts) == 2 and parts[1] in CORE:
        return "core"
    return parts[1]


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """Dotted name -> the longest prefix that is one of our modules (None: not ours)."""
    if name != ROOT and not name.startswith(ROOT + "."):
        return None
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_in(source: str, path: Path, text: str, known: dict[str, Path]) -> list[Import]:
    """Every import of one of `known` in `text` (the module `source` at `path`)."""
    is_package = path.name == "__init__.py"
    package = source if is_package else source.rpartition(".")[0]
    found: list[Import] = []

    def add(name: str, node: ast.AST, lazy: bool) -> None:
        target = _resolve(name, known)
        imp = Import(source, target, path, node.lineno, lazy)
        if target is not None and imp not in found:  # `from m import a, b` is one edge
            found.append(imp)

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, lazy)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from . import x / from ..pkg import y
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                for alias in child.names:  # `from pkg import sub` imports the submodule pkg.sub
                    add(f"{stem}.{alias.name}" if alias.name != "*" else stem, child, lazy)
            elif (
                isinstance(child, ast.Call)
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
                and (
                    (isinstance(child.func, ast.Attribute) and child.func.attr == "import_module")
                    or (isinstance(child.func, ast.Name) and child.func.id in {"import_module", "__import__"})
                )
            ):
                add(child.args[0].value, child, lazy)
            visit(child, inner)

    visit(ast.parse(text, filename=str(path)), lazy=False)
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    known = modules()
    return tuple(
        imp
        for name, path in known.items()
        for imp in imports_in(name, path, path.read_text(encoding="utf-8"), known)
        if imp.target != imp.source
    )


def report(title: str, lines: list[str], count: int | None = None) -> str:
    text = f"{title}: {len(lines) if count is None else count}\n  " + "\n  ".join(lines)
    print(text)  # also in the captured output of the failing test
    return text


# ------------------------------------------------------------------------ the scanner itself


def test_scanner_resolves_absolute_relative_submodule_and_lazy_imports(tmp_path):
    known = {m: tmp_path for m in ("tokenflow_cli", "tokenflow_cli.config", "tokenflow_cli.tokenizer",
                                   "tokenflow_cli.tokenizer.model", "tokenflow_cli.tokenizer.config")}
    text = (
        "import os\n"
        "import tokenflow_cli.config\n"
        "from tokenflow_cli.tokenizer import model, not_a_module\n"
        "from . import config as _c\n"
        "from .config import TokenizerRecipe\n"
        "from .. import config\n"
        "class A:\n"
        "    from tokenflow_cli import config\n"
        "    def f(self):\n"
        "        from tokenflow_cli.tokenizer.model import build\n"
        "        import importlib\n"
        "        return importlib.import_module('tokenflow_cli.config'), lambda: __import__('os')\n"
    )
    path = tmp_path / "tokenflow_cli" / "tokenizer" / "model.py"
    got = [(i.target, i.line, i.lazy) for i in imports_in("tokenflow_cli.tokenizer.model", path, text, known)]
    assert got == [
        ("tokenflow_cli.config", 2, False),
        ("tokenflow_cli.tokenizer.model", 3, False),
        ("tokenflow_cli.tokenizer", 3, False),  # an attribute of the package: its __init__
        ("tokenflow_cli.tokenizer.config", 4, False),
        ("tokenflow_cli.tokenizer.config", 5, False),
        ("tokenflow_cli.config", 6, False),
        ("tokenflow_cli.config", 8, False),  # class bodies run at import time
        ("tokenflow_cli.tokenizer.model", 10, True),
        ("tokenflow_cli.config", 12, True),
    ]


def test_scanner_sees_the_package():
    names = modules()
    assert {"tokenflow_cli", "tokenflow_cli.config", "tokenflow_cli.cli.app"} <= set(names)
    assert any(i.source == "tokenflow_cli.__main__" and layer(i.target) == "cli" for i in all_imports())


# ------------------------------------------------------------------------------ the layout


def test_top_level_holds_only_core_modules_and_packages():
    unexpected = []
    for entry in sorted(PKG_DIR.iterdir()):
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            if entry.name in DATA_FOLDERS:
                if any(entry.rglob("*.py")):
                    unexpected.append(f"{entry.name}/ (a data folder holding Python modules)")
            elif entry.name not in PACKAGES:
                unexpected.append(f"{entry.name}/ (not one of {sorted(PACKAGES)})")
            elif not (entry / "__init__.py").is_file():
                unexpected.append(f"{entry.name}/ (no __init__.py)")
        elif entry.name not in TOP_FILES:
            unexpected.append(entry.name)
    assert not unexpected, report(f"unexpected entries at the top of {ROOT}/", unexpected)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for imp in all_imports():
        graph[imp.source].add(imp.target)
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    lines = []
    for n, component in enumerate(components, 1):
        inside = sorted(
            (imp for imp in all_imports() if imp.source in component and imp.target in component),
            key=lambda i: (i.source, i.line),
        )
        lines.append(f"cycle {n}, shortest loop:")
        lines += [f"  {imp}" for imp in shortest_loop(component, inside)]
        lines.append(f"  (the strongly connected set: {len(component)} modules {sorted(component)}, "
                     f"{len(inside)} edges among them)")
        lines += [f"    {imp}" for imp in inside]
    assert not components, report("import cycles", lines, count=len(components))


def shortest_loop(component: set[str], edges: list[Import]) -> list[Import]:
    """The shortest closed chain of `edges` (all inside one strongly connected `component`)."""
    out: dict[str, list[Import]] = {}
    for imp in edges:
        out.setdefault(imp.source, []).append(imp)
    best: list[Import] | None = None
    for start in sorted(component):
        paths: dict[str, list[Import]] = {start: []}
        frontier = [start]
        while frontier and start not in {imp.target for m in frontier for imp in out.get(m, [])}:
            nxt = []
            for m in frontier:
                for imp in out.get(m, []):
                    if imp.target not in paths:
                        paths[imp.target] = paths[m] + [imp]
                        nxt.append(imp.target)
            frontier = nxt
        closing = [paths[m] + [imp] for m in frontier for imp in out.get(m, []) if imp.target == start]
        if closing and (best is None or len(closing[0]) < len(best)):
            best = closing[0]
    return best or []


def _forbidden(source_layer: str, target_layer: str) -> bool:
    if source_layer == "core":
        return target_layer != "core"
    return target_layer in FORBIDDEN.get(source_layer, PACKAGES)


@pytest.mark.parametrize("source_layer", ["core", "data", "train", "eval", "tokenizer", "generation",
                                          "understanding", "teacher", "public"])
def test_layering(source_layer):
    bad = [
        f"[{source_layer} -> {layer(imp.target)}] {imp}"
        for imp in sorted(all_imports(), key=lambda i: (i.source, i.line))
        if layer(imp.source) == source_layer and _forbidden(source_layer, layer(imp.target))
    ]
    allowed = "core only" if source_layer == "core" else f"never {sorted(FORBIDDEN[source_layer])}"
    assert not bad, report(f"{source_layer} imports across the layering ({allowed})", bad)


def test_nothing_outside_cli_imports_cli():
    bad = [
        str(imp)
        for imp in sorted(all_imports(), key=lambda i: (i.source, i.line))
        if layer(imp.target) == "cli" and layer(imp.source) not in {"cli", "__main__"}
    ]
    assert not bad, report("imports of cli/ from outside it", bad)


def test_nothing_but_cli_imports_the_public_front():
    bad = [
        str(imp)
        for imp in sorted(all_imports(), key=lambda i: (i.source, i.line))
        if layer(imp.target) == "public" and layer(imp.source) not in {"cli", "__main__"}
    ]
    assert not bad, report("imports of the package __init__ (the public front) from the library", bad)


def test_no_lazy_imports_of_our_modules_outside_cli():
    bad = [
        str(imp)
        for imp in sorted(all_imports(), key=lambda i: (i.source, i.line))
        if imp.lazy and layer(imp.source) not in {"cli", "public"}  # public: PEP 562 __getattr__
    ]
    assert not bad, report("function-level imports of tokenflow_cli modules outside cli/", bad)
