"""Every package that pipeline/, edge/ and migrations/ import at run time is declared.

An import that works only because another dependency happens to pull its package in breaks
the day that dependency stops doing so (or pins an incompatible version): each is declared in
pyproject.toml's ``dependencies``. The imports are read with ``ast`` (every ``import`` and
``from … import``, at any depth, including those inside functions), mapped to distributions
with ``importlib.metadata.packages_distributions()``.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("pipeline", "edge", "migrations")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, set[str]]:
    """Top-level module name -> the files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for package in SHIPPED:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {
        _normalise(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0])
        for spec in project["dependencies"]
    }


def test_every_imported_package_is_declared() -> None:
    distributions = packages_distributions()
    missing: dict[str, set[str]] = {}
    for module, files in imported_modules().items():
        if module in sys.stdlib_module_names or module in SHIPPED or module == "__future__":
            continue
        owners = {_normalise(d) for d in distributions.get(module, [])}
        assert owners, f"{module} (imported by {sorted(files)}) is not installed at all"
        if not owners & declared():
            missing.setdefault(", ".join(sorted(owners)), set()).update(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_check_sees_what_it_checks() -> None:
    # The walk must find imports buried in functions, and names the declared list has.
    modules = imported_modules()
    assert {"celery", "sqlalchemy", "tornado", "cryptography", "alembic"} <= set(modules)
    assert {"celery", "sqlalchemy", "tornado", "psycopg"} <= declared()
