"""No two modules of ``refdecoder`` depend on each other, directly or through others (the import graph is acyclic).

Every import counts, wherever it stands: at module level, inside a function, or under ``TYPE_CHECKING`` (a
type-only import is still a dependency a reader has to follow). ``from package import name`` depends on the module
``package.name`` when there is one, else on the package's ``__init__``. A package does not depend on its own
``__init__`` by being imported (Python runs parents first; no reader follows that). The backbone registry's lazy
built-ins (``"module:Class"`` strings) count as imports of those modules.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from refdecoder.backbones import registry

ROOT = Path(__file__).resolve().parents[1]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """``dotted.name -> file`` for every module of ``package`` under ``root`` (``__init__`` as the package)."""
    return {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in sorted((root / package).rglob("*.py"))
    }


def imported_modules(module: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` (module ``module``) imports anywhere in its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up (level - 1) packages from this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if name in modules else base)
    return (found & modules) - {module}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    files = module_files(root, package)
    return {module: imported_modules(module, path, set(files)) for module, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules that depend on each other: each strongly connected component of more than one module, sorted."""
    order, low, stack, cycles = {}, {}, [], []

    def visit(node: str) -> None:  # Tarjan's algorithm
        order[node] = low[node] = len(order)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return cycles


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through the component's first module, for the failure message (a breadth-first search)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                frontier.append(nxt)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_refdecoder_has_no_import_cycle():
    graph = import_graph(ROOT, "refdecoder")
    graph["refdecoder.backbones.registry"] |= {path.partition(":")[0] for path in registry.BUILTINS.values()}
    # The graph is the real one: the decode path's modules are in it with the edges a reader follows.
    assert {"refdecoder.conditioning", "refdecoder.hooks"} <= graph["refdecoder.model"]
    assert "refdecoder.backbones.wan.wan21" in graph["refdecoder.backbones.registry"]
    cycles = import_cycles(graph)
    described = [f"{c} (e.g. {' -> '.join(_closed_path(graph, set(c)))})" for c in cycles]
    assert cycles == [], "modules that depend on each other: " + "; ".join(described)


def test_the_cycle_check_finds_every_kind_of_import(tmp_path):
    """A package whose only cycles go through a type-only, a function-level, a relative and a `from package import
    module` import: each is found."""
    files = {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\nA = 1\n",
        "pkg/b.py": "def f():\n    from . import a\n",
        "pkg/c.py": "from .sub import d\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "import pkg.c\n",
        "pkg/e.py": "from pkg import a\n",  # depends on pkg.a only: no cycle with pkg/__init__
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.e"] == {"pkg.a"}
    assert sorted(import_cycles(graph)) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.d"]]
    assert _closed_path(graph, {"pkg.a", "pkg.b"}) == ["pkg.a", "pkg.b", "pkg.a"]
    assert import_cycles({"x": {"y"}, "y": set()}) == []


def adapter_references(source: str) -> list[str]:
    """The names in ``source``'s code (docstrings and comments aside) by which it could reach a backbone adapter:
    any name, attribute, parameter or import naming an adapter, its reference branch or the ``backbones`` package."""
    reaching = {"run_stage_on_reference", "conditioned_stage", "decode_window"}
    found = set()
    for node in ast.walk(ast.parse(source)):
        name = {
            ast.Name: lambda n: n.id,
            ast.Attribute: lambda n: n.attr,
            ast.arg: lambda n: n.arg,
            ast.alias: lambda n: n.name,
            ast.ImportFrom: lambda n: n.module or "",
        }.get(type(node), lambda n: "")(node)
        if "adapter" in name.lower() or name in reaching or name.startswith("refdecoder.backbones"):
            found.add(name)
    return sorted(found)


def test_the_conditioner_never_calls_back_into_the_adapter():
    """The adapter's loop calls the conditioner and carries the reference between stages itself: the conditioner
    holds no adapter and calls none of its methods (no callback cycle on the decode path)."""
    source = (ROOT / "refdecoder" / "conditioning.py").read_text()
    assert adapter_references(source) == []
    assert "run_stage_on_reference" in source  # the docstrings may say who runs it; the code never does


def test_the_callback_check_finds_each_way_back_to_the_adapter():
    source = (ROOT / "refdecoder" / "conditioning.py").read_text()
    mutants = {
        "self.adapter.run_stage_on_reference(index, features, ctx)": ["adapter", "run_stage_on_reference"],
        "from refdecoder.backbones.base import BackboneAdapter": ["BackboneAdapter", "refdecoder.backbones.base"],
        "def hold(owner: BackboneAdapter) -> None: ...": ["BackboneAdapter"],
        "def hold(backbone_adapter) -> None: ...": ["backbone_adapter"],
        "owner.conditioned_stage(0, x, None, hooks, ctx)": ["conditioned_stage"],
    }
    for line, names in mutants.items():
        assert adapter_references(f"{source}\n{line}\n") == names, line
