"""The README's layout table names every module, and the import contracts hold."""

from __future__ import annotations

import re
import subprocess
import sys
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


# --- import direction -----------------------------------------------------------------------------
# Written as import-linter contracts in pyproject.toml ([tool.importlinter]): what the edge may
# import, settings as a leaf, no service importing the composition root, the layers, and no
# circle between sibling modules or packages. scripts/test runs lint-imports next to mypy; so
# does this test, so that a plain pytest run holds the contracts too.
def test_the_import_contracts_hold() -> None:
    # Beside the interpreter running the tests: the project's .venv, or CI's.
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
