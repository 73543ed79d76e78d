"""The module structure: no import cycle among the agent's modules, counting imports made
only for type checking (an ``if TYPE_CHECKING:`` block) and a package's own ``__init__``; and
no module but the CLI that starts it imports ``agent.daemon`` (its parts receive what they
use through their constructors)."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"


def _modules() -> dict[str, Path]:
    found = {}
    for p in AGENT.rglob("*.py"):
        parts = p.relative_to(AGENT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return found


def _top_level_imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The agent modules ``name`` imports at its top level or under ``if TYPE_CHECKING:``
    (``from . import x`` also imports the package)."""
    deps: set[str] = set()
    body = ast.parse(path.read_text()).body
    nodes = [n for node in body for n in (node.body if isinstance(node, ast.If) else [node])]
    for node in nodes:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                deps.add(t)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_even_for_type_checking() -> None:
    mods = _modules()
    graph = {n: _top_level_imports(n, p, mods) for n, p in mods.items()}
    assert "agent.runs.registry" in graph["agent.daemon"]  # the parser sees imports at all
    assert _cycles(graph) == []


def test_only_the_cli_imports_the_daemon() -> None:
    users = sorted(n for n, p in _modules().items() if n not in ("agent.daemon", "agent.cli")
                   and "agent.daemon" in p.read_text().replace("agent.daemon.", ""))
    assert users == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
