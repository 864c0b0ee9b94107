"""No import cycle among leapdecode's modules.

The graph is read from the source with `ast`, nothing is imported. It holds the imports that run when a
module is imported: statements at module level, also inside `if`, `try`, `with` and class bodies, but
not inside functions (they run later) nor under `if TYPE_CHECKING:` (they never run). An import names
the module whose code it needs: `import a.b` and `from a import b` need `a.b` when that is a module,
`from a.b import name` needs `a.b`. Parent packages, which Python initializes first, are not edges:
a package `__init__` that re-exports its submodules is no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import leapdecode

PACKAGE_ROOT = Path(leapdecode.__file__).parent


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package in folder `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module runs: functions' bodies and TYPE_CHECKING left out."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from import_nodes(node.orelse)
        else:
            for block in _blocks(node):
                yield from import_nodes(block)


def _blocks(node: ast.stmt) -> list[list[ast.stmt]]:
    """The blocks nested in a compound statement (if, try, with, for, while, class, match)."""
    blocks = [b for f in ("body", "orelse", "finalbody") if isinstance(b := getattr(node, f, None), list)]
    blocks += [handler.body for handler in getattr(node, "handlers", [])]
    return blocks + [case.body for case in getattr(node, "cases", [])]


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module a `from` import starts at (relative imports resolved against `name`)."""
    if not node.level:
        return node.module or ""
    parts = name.split(".") if is_package else name.split(".")[:-1]
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` (in file `path`) imports at module level."""
    found = set()
    for node in import_nodes(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
            continue
        origin = _absolute(node, name, path.name == "__init__.py")
        for alias in node.names:
            submodule = f"{origin}.{alias.name}"
            found.add(submodule if submodule in modules else origin)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph has none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_leapdecode_has_no_import_cycle():
    graph = import_graph(PACKAGE_ROOT)
    assert "leapdecode.engine" in graph and "leapdecode.model.llama" in graph  # the walk found the modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_the_checker_finds_a_cycle_through_every_kind_of_import(tmp_path):
    pkg = _write_package(
        tmp_path,
        {
            "__init__.py": "from pkg.a import A\n",  # a package re-exporting its module: no cycle
            "a.py": "from . import b\nA = 1\n",  # relative, and `b` is a submodule
            "sub/__init__.py": "",
            "b.py": "try:\n    from pkg.sub.c import C\nexcept ImportError:\n    C = None\n",
            "sub/c.py": "import pkg.a\nC = 2\n",
        },
    )
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_the_checker_ignores_imports_that_do_not_run_at_import_time(tmp_path):
    pkg = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from .b import B\n",
            "b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg.a import A\nelse:\n    import json\n"
                "def later():\n    from pkg import a\n"
                "B = 1\n"
            ),
        },
    )
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert find_cycle(graph) is None
