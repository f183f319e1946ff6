"""The README's layout table names every module, and no module imports in a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "edge", "benchmarks")


def _layout_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def _named(path: str, rows: list[str]) -> bool:
    """Whether a row names ``path``: in full, or by file name in the row of its directory."""
    for row in rows:
        cells = row.split("|")
        quoted = re.findall(r"`([^`]+)`", row)
        if path in quoted:
            return True
        first = re.findall(r"`([^`]+)`", cells[1])
        directory, name = path.rsplit("/", 1)
        if f"{directory}/" in first and name in quoted:
            return True
    return False


def test_the_layout_table_names_every_module() -> None:
    rows = _layout_rows()
    modules = sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    )
    missing = [module for module in modules if not _named(module, rows)]
    assert not missing, f"README.md's layout table does not name: {', '.join(missing)}"


def test_the_layout_table_names_no_module_that_is_gone() -> None:
    rows = _layout_rows()
    named = {
        path
        for row in rows
        for path in re.findall(r"`((?:pipeline|edge|benchmarks)/[\w/]+\.py)`", row)
    }
    gone = sorted(path for path in named if not (ROOT / path).is_file())
    assert not gone, f"README.md's layout table names modules that do not exist: {gone}"


# --- import cycles -------------------------------------------------------------------------------
# The composition root (pipeline.runtime) imports the services to build them; the process-wide
# accessors kept for commands and scripts (connections.get_redis, acme_client.get_client,
# snapshot.publish, issuance.place_order ...) reach it lazily, from inside a function, and are
# the only imports allowed to point back at it. Imports under TYPE_CHECKING do not run.
ROOT_MODULE = "pipeline.runtime"


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("pipeline", "edge"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path, known: dict[str, Path]) -> set[tuple[str, bool]]:
    """(module imported, whether from inside a function) for every import that runs."""
    found: set[tuple[str, bool]] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.update((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.add((full if full in known else child.module, inner))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def _graph(*, allow_lazy_root: bool) -> dict[str, set[str]]:
    known = _modules()
    return {
        name: {
            target
            for target, lazy in _imports(path, known)
            if target in known
            and target != name
            and not (allow_lazy_root and lazy and target == ROOT_MODULE)
        }
        for name, path in known.items()
    }


def test_no_module_imports_in_a_cycle() -> None:
    assert _cycles(_graph(allow_lazy_root=True)) == []


def test_only_the_lazy_accessors_import_the_composition_root() -> None:
    graph = _graph(allow_lazy_root=False)
    importers = sorted(name for name, targets in graph.items() if ROOT_MODULE in targets)
    assert importers == [
        "pipeline.acme.client",
        "pipeline.celery",
        "pipeline.connections",
        "pipeline.distribution.publishing",
        "pipeline.issuance",
        "pipeline.tasks.issuance",
        "pipeline.tasks.maintenance",
    ]
    # ... and none of them at import time, except the tasks (the top of the worker).
    at_import = sorted(
        name
        for name, path in _modules().items()
        if (ROOT_MODULE, False) in _imports(path, _modules())
    )
    assert at_import == ["pipeline.tasks.issuance", "pipeline.tasks.maintenance"]


def test_the_edge_never_imports_the_pipelines_services() -> None:
    # The edge holds no database credentials: it reads envelopes, keys, signed statements.
    allowed = {
        "pipeline.distribution.layout",
        "pipeline.crypto.envelope",
        "pipeline.crypto.keys",
        "pipeline.logformat",
        "pipeline.outbound",
        "pipeline.redis_connect",
        "pipeline.redis_tls",
        "pipeline.settings",
        "pipeline.crypto.signing",
        "pipeline.version",
    }
    graph = _graph(allow_lazy_root=False)
    used = {t for name, targets in graph.items() if name.startswith("edge") for t in targets}
    assert {t for t in used if t.startswith("pipeline")} <= allowed
